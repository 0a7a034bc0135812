"""The Bitrix24 wire protocol: portal request -> typed task, outcome -> callback body, portal answer.

The only module that reads the portal's keys: past it, a request is a :class:`~gateway.tasks.Task`
with a typed prompt (:class:`~gateway.tasks.TextPrompt`, ``ImagePrompt``, ``AudioPrompt``, ``CallPrompt``).

See ``bitrix24-protocol.md``: unknown keys are accepted and ignored, nulls are
tolerated, and nothing the portal sends is trusted beyond its shape.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.adapters import HostedImages, Result, Segment, TextResult, Transcript
from gateway.outcomes import DeliveryOutcome
from gateway.tasks import IMAGE_FORMATS, AudioPrompt, CallPrompt, Category, ImagePrompt, Message, Prompt, Task, TextPrompt, audio_hint

CONSUMED_KEYS = frozenset(
    {
        "prompt",
        "payload_role",
        "context",
        "temperature",
        "max_tokens",
        "category",
        "ttl",
        "callbackUrl",
        "errorCallbackUrl",
        "auth",
        "collect_context",
    }
)
_HASH_RE = re.compile(r"[?&]hash=([^&#]*)")
ASSISTANT_ROLES = frozenset({"assistant", "bot", "ai", "model"})

# Bounds on what the portal may send. The portal itself sends ttl 14,400 (840 on old
# portals), temperatures in 0..1 and URLs of about 150 characters.
TTL_RANGE = (1, 86_400)
TEMPERATURE_RANGE = (0.0, 2.0)
MAX_TOKENS_RANGE = (1, 1_048_576)
IMAGES_NUMBER_RANGE = (1, 100)
MAX_URL_LENGTH = 4096
MAX_EXTRA_DEPTH = 16
"""Unknown keys are kept for plugins (``Task.extra``) only down to this depth."""
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_URL_FORBIDDEN = re.compile("[\x00-\x20\x7f\ud800-\udfff]")
"""Control characters, spaces and lone surrogates: no portal URL has them, and httpx
refuses some of them only when it is about to send."""
_AFTER_AUTHORITY = re.compile(r"[/?#]")
TRUE_WORDS = frozenset({"true", "1", "y", "yes"})


class ProtocolError(Exception):
    """A completions request the gateway refuses, for whatever reason (a malformed body, an
    unknown engine, a callback the policy refuses, a queue that cannot store it): the accept
    handler answers ``status`` with ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class CompletionRequest:
    task: Task
    callback_url: str
    error_callback_url: str
    idempotency_key: str
    """A digest of the portal's job ``hash``: the same request sent twice maps to one job."""
    outbound_urls: tuple[tuple[str, httpx.URL], ...]
    """Every URL the gateway will contact for this job (callbacks, the recording), by field
    name, parsed by httpx as delivery will parse them, for the outbound policy. The
    strings above are POSTed as received."""


def _invalid(field: str, problem: str) -> ProtocolError:
    return ProtocolError(422, "invalid_field", f"{field}: {problem}")


def _show(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return "a number of more than 18 digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested about 1,000 deep, or holding an integer of 4,300+ digits
        return f"a {type(value).__name__} too deep or too large to show"
    return text if len(text) <= 40 else text[:37] + "..."


def _text(value: Any, field: str) -> str:
    """A string with no lone UTF-16 surrogate (JSON allows ``\\ud800``; UTF-8 and SQL do not)."""
    if not isinstance(value, str):
        raise _invalid(field, f"must be a string, got {type(value).__name__}")
    if _LONE_SURROGATE.search(value):
        raise _invalid(field, "contains a lone UTF-16 surrogate (an escape such as \\ud800 with no pair); send valid Unicode text")
    return value


def _optional_text(data: Mapping[str, Any], key: str, field: str) -> str | None:
    value = data.get(key)
    return None if value is None else _text(value, field)


def _number(data: Mapping[str, Any], key: str, kind: type, bounds: tuple[float, float], field: str | None = None) -> Any:
    """A finite number within ``bounds``, or None when absent; numeric strings are accepted."""
    field = field or key
    value = data.get(key)
    if value is None or value == "":
        return None
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _invalid(field, f"must be a number, got {_show(value)}")
    if isinstance(value, str):
        try:
            if len(value) > 32:
                raise ValueError
            number: float | int = float(value)
        except ValueError:
            raise _invalid(field, f"must be a number, got {_show(value)}") from None
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise _invalid(field, f"must be a finite number, got {_show(value)}")
    if not low <= number <= high:  # compared before any conversion: 10**5000 and 1e308 are fine here
        raise _invalid(field, f"must be between {low} and {high}, got {_show(value)}")
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise _invalid(field, f"must be a whole number, got {_show(value)}")
        return int(number)
    return float(number)


@functools.lru_cache(maxsize=1024)
def _parse_origin(origin: str) -> httpx.URL:
    """``scheme://host:port`` parsed by httpx, remembered: a portal's callbacks share one origin.
    httpx URLs are immutable; the cache is bounded (least recently used go first) and failures are not kept."""
    url = httpx.URL(origin)
    url.host  # noqa: B018 -- decodes an IDNA name ("xn--...") and raises on a malformed one, as sending would
    return url


def parse_outbound_url(value: Any, field: str) -> httpx.URL:
    """Check an absolute http(s) URL the gateway will send to; return its origin (scheme,
    host, port) as httpx parses it, for the outbound policy and the portal's host name.

    Whatever would fail when the gateway contacts the URL (a port out of range, a host
    httpx or the resolver refuses, a character httpx refuses, a surrogate that cannot be
    encoded) fails here, at accept. Only the origin goes through httpx's parser: it is
    where parsing can fail, and httpx scans the whole URL character by character in
    Python (about 100 µs for a callback URL). The path and query have passed the
    character check below, which leaves nothing there that httpx refuses (the property
    tests send every URL accepted here through ``httpx.Request``)."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(field, "must be an absolute http(s) URL")
    value = value.strip()
    if len(value) > MAX_URL_LENGTH:
        raise _invalid(field, f"is longer than {MAX_URL_LENGTH} characters")
    if bad := _URL_FORBIDDEN.search(value):
        raise _invalid(field, f"contains {_show(bad.group())} at position {bad.start()}; URLs may not hold spaces, control characters or lone surrogates")
    scheme_end = value.find("://")
    if scheme_end < 0:
        raise _invalid(field, "must be an absolute http(s) URL")
    rest = _AFTER_AUTHORITY.search(value, scheme_end + 3)
    try:
        url = _parse_origin(value[: rest.start()] if rest else value)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:  # idna's errors are UnicodeErrors
        raise _invalid(field, f"is not a valid URL ({str(exc)[:100]})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise _invalid(field, "must be an absolute http(s) URL")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise _invalid(field, f"port {url.port} is out of range (1-65535)")
    host = url.raw_host.decode("ascii")
    if not host.startswith("["):  # a name, not an IPv6 literal: encoded as the resolver will encode it
        try:
            host.encode("idna")
        except UnicodeError:
            raise _invalid(field, "the host name has an empty label or one longer than 63 characters") from None
    return url


def _callback_url(data: Mapping[str, Any], key: str) -> httpx.URL:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(422, "missing_callback_url", f"{key} is missing: the gateway could not return the result")
    return parse_outbound_url(value, key)


def _wants_context(raw: Any) -> bool:
    """``collect_context`` as PHP may send it: true, 1, "Y", "true"."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)):
        return raw == 1
    return isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS


def _context(raw: Any) -> list[Message]:
    if raw is None:
        return []
    if isinstance(raw, Mapping):  # PHP encodes an array with non-sequential keys as an object
        raw = list(raw.values())
    if not isinstance(raw, list):
        raise _invalid("context", "must be a list of {role, content} objects")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise _invalid(f"context[{i}]", "must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if content is None or content == "":
            continue
        content = _text(content, f"context[{i}].content")
        role = _text(role, f"context[{i}].role").lower() if isinstance(role, str) else "user"
        role = "assistant" if role in ASSISTANT_ROLES else role if role in ("system", "user") else "user"
        messages.append(Message(role, content))
    return messages


def keepable(value: Any, depth: int = 0) -> bool:
    """Whether a value the gateway does not read may be kept for plugins and stored:
    shallow, finite, with storable text. Anything else is dropped, as unknown keys are
    ignored: it must not make the request fail."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        return not _LONE_SURROGATE.search(value)
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= MAX_EXTRA_DEPTH:
        return False
    if isinstance(value, list):
        return all(keepable(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(_keepable_key(k) and keepable(v, depth + 1) for k, v in value.items())
    return False


def _keepable_key(key: str) -> bool:
    return not _LONE_SURROGATE.search(key)


def _kept(items: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The entries of an object the gateway does not read, minus those that cannot be stored."""
    return {k: v for k, v in items.items() if k not in skip and _keepable_key(k) and keepable(v, 1)}


def _image_prompt(prompt: Mapping[str, Any]) -> ImagePrompt:
    """``{"prompt", "style", "format", "images_number"}``, checked, with nulls and blanks as None."""
    text = prompt.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise _invalid("prompt.prompt", "an image request needs a non-empty description")
    text = _text(text, "prompt.prompt")
    style = _optional_text(prompt, "style", "prompt.style")
    fmt = prompt.get("format")
    if fmt not in (None, "", *IMAGE_FORMATS):
        raise _invalid("prompt.format", f"must be one of {', '.join(IMAGE_FORMATS)}, got {_show(fmt)}")
    count = _number(prompt, "images_number", int, IMAGES_NUMBER_RANGE, "prompt.images_number")
    return ImagePrompt(text=text, style=style or None, format=fmt or None, images_number=count)


def _audio_prompt(prompt: Mapping[str, Any], category: Category) -> tuple[AudioPrompt, httpx.URL]:
    """``{"file", "fields", "fileExtension"}``, checked: the worker downloads ``file`` later."""
    url = prompt.get("file")
    if not isinstance(url, str) or not url.strip():
        raise _invalid("prompt.file", "an audio request needs the URL of the recording")
    parsed = parse_outbound_url(url, "prompt.file")
    fields = prompt.get("fields")
    if fields is None or fields == []:  # PHP encodes an empty array as []
        fields = {}
    if not isinstance(fields, Mapping):
        raise _invalid("prompt.fields", "must be an object")
    mime = _optional_text(fields, "type", "prompt.fields.type")
    hint = _optional_text(fields, "prompt", "prompt.fields.prompt")
    extension = _optional_text(prompt, "fileExtension", "prompt.fileExtension")
    audio_type = CallPrompt if category is Category.CALL else AudioPrompt
    return audio_type(file_url=url.strip(), mime=mime, hint=audio_hint(hint), extension=extension or None, fields=_kept(fields)), parsed


def parse_completion_request(
    data: Any,
    *,
    engine: str,
    category: Category,
    default_ttl: int,
    job_id: str,
    now: float,
    context: str = "when_requested",
) -> CompletionRequest:
    """The portal's decoded JSON body -> a task and the URLs to contact, or a ProtocolError
    naming the field. ``context`` is the engine's setting: ``always`` puts the portal's
    ``context`` into the messages, ``when_requested`` only with ``collect_context: true``,
    as the portal's own engines do."""
    if not isinstance(data, dict):
        raise ProtocolError(400, "invalid_json", "the request body must be a JSON object")
    sent_category = data.get("category")
    if sent_category not in (None, "") and sent_category != category.value:
        raise ProtocolError(422, "wrong_category", f"engine {engine!r} serves category {category.value!r}, the request is for {_show(sent_category)}")
    callback = _callback_url(data, "callbackUrl")
    error_callback = _callback_url(data, "errorCallbackUrl")
    outbound: list[tuple[str, httpx.URL]] = [("callbackUrl", callback), ("errorCallbackUrl", error_callback)]

    raw_prompt = data.get("prompt")
    prompt: Prompt
    if category is Category.TEXT:
        if not isinstance(raw_prompt, str) or not raw_prompt.strip():
            raise _invalid("prompt", "a text request needs a non-empty string prompt")
        prompt = TextPrompt(_text(raw_prompt, "prompt"))
    elif not isinstance(raw_prompt, Mapping):
        article = "a" if category is Category.CALL else "an"
        raise _invalid("prompt", f"{article} {category.value} request needs a prompt object")
    elif category is Category.IMAGE:
        prompt = _image_prompt(raw_prompt)
    else:
        prompt, file_url = _audio_prompt(raw_prompt, category)
        outbound.append(("prompt.file", file_url))

    system = _optional_text(data, "payload_role", "payload_role")
    ttl = _number(data, "ttl", int, TTL_RANGE)
    ttl = default_ttl if ttl is None else ttl
    max_tokens = _number(data, "max_tokens", int, MAX_TOKENS_RANGE)
    markers = data.get("payload_markers")
    language = markers.get("language") if isinstance(markers, Mapping) else None
    if isinstance(language, str):
        language = _text(language, "payload_markers.language")
    use_context = context == "always" or _wants_context(data.get("collect_context"))

    task = Task(
        job_id=job_id,
        engine=engine,
        category=category,
        prompt=prompt,
        system=system or None,
        context=_context(data.get("context")) if use_context else [],
        temperature=_number(data, "temperature", float, TEMPERATURE_RANGE),
        max_tokens=max_tokens,
        language=language if isinstance(language, str) and language else None,
        ttl=ttl,
        accepted_at=now,
        deadline=now + ttl,
        portal=callback.host,
        extra=_kept(data, CONSUMED_KEYS),
    )
    raw_callback = data["callbackUrl"].strip()
    found = _HASH_RE.search(raw_callback)
    portal_hash = found.group(1) if found else raw_callback
    key = hashlib.sha256(f"{engine}\n{portal_hash}".encode()).hexdigest()
    return CompletionRequest(task, raw_callback, data["errorCallbackUrl"].strip(), key, tuple(outbound))


def success_body(result: Result, category: Category) -> dict[str, Any]:
    if isinstance(result, TextResult):
        return {"result": result.text}
    if isinstance(result, HostedImages):
        return {"result": list(result.urls)}  # the portal shows the first
    if isinstance(result, Transcript):
        if category is Category.CALL:
            return {"result": [call_transcription(result)]}
        return {"result": result.text}
    raise TypeError(f"no callback format for result {type(result).__name__}")


def format_offset(seconds: float) -> str:
    """``MM:SS``, or ``HH:MM:SS`` from one hour on, as the portal's own call engine writes times."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def call_transcription(transcript: Transcript, user_id: int = 0) -> dict[str, Any]:
    """The object the portal's call engine produces: timed phrases and the language code.

    A call track belongs to one participant, but the portal's request names none that
    the gateway could read, so ``user_id`` is 0 unless a caller knows better."""
    segments = transcript.segments or (Segment(0.0, transcript.duration or 0.0, transcript.text),)
    return {
        "transcriptions": [
            {"user_id": user_id, "start_time_formatted": format_offset(s.start), "end_time_formatted": format_offset(s.end), "text": s.text.strip()}
            for s in segments
            if s.text.strip()
        ],
        "language": transcript.language or "",
    }


def error_body(message: str, code: int | str) -> dict[str, Any]:
    """``api_request_completed: false`` tells the portal to give the user's quota back."""
    return {"message": message, "code": code, "api_request_completed": False}


def encode_like_php(data: Any) -> bytes:
    """JSON as PHP's ``json_encode`` writes it by default: ``\\uXXXX`` escapes and ``\\/``."""
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/").encode()


@dataclass(frozen=True)
class PortalAnswer:
    outcome: DeliveryOutcome
    detail: str


def read_callback_answer(status: int, body: bytes) -> PortalAnswer:
    """Classify the portal's answer to a callback POST."""
    if status in (408, 425, 429) or status >= 500:
        return PortalAnswer(DeliveryOutcome.RETRY, f"portal answered HTTP {status}")
    if 300 <= status < 400:
        return PortalAnswer(DeliveryOutcome.REJECTED, f"portal answered with a redirect (HTTP {status}); redirects are not followed")
    if status >= 400:
        return PortalAnswer(DeliveryOutcome.REJECTED, f"portal refused the callback with HTTP {status}")
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return PortalAnswer(DeliveryOutcome.RETRY, f"portal answered HTTP {status} with a body that is not JSON")
    if not isinstance(answer, Mapping):
        return PortalAnswer(DeliveryOutcome.RETRY, "portal answered with JSON that is not an object")
    if answer.get("status") == "success":
        if answer.get("data") is True:
            return PortalAnswer(DeliveryOutcome.DELIVERED, "portal answered data:true (it took the callback)")
        return PortalAnswer(DeliveryOutcome.GONE, "portal answered data:false (job unknown, already consumed or expired)")
    errors = answer.get("errors")
    items = errors if isinstance(errors, list) else [errors] if errors else []
    messages = "; ".join(_error_message(e) for e in items[:10])[:300]
    return PortalAnswer(DeliveryOutcome.REJECTED, f"portal answered status {_show(answer.get('status'))}: {messages or 'no detail'}")


def _error_message(error: Any) -> str:
    """One entry of the portal's ``errors``: its ``message`` when it has one (any shape, shown safely)."""
    message = error.get("message", error) if isinstance(error, Mapping) else error
    return message if isinstance(message, str) else _show(message)
