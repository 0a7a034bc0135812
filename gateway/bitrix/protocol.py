"""The Bitrix24 wire protocol: portal request -> task, outcome -> callback body, portal answer.

See ``bitrix24-protocol.md``: unknown keys are accepted and ignored, nulls are
tolerated, and nothing the portal sends is trusted beyond its shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from gateway.adapters import IMAGE_FORMATS, HostedImages, Result, Segment, TextResult, Transcript
from gateway.tasks import Category, Message, Task

CONSUMED_KEYS = frozenset({
    "prompt", "payload_role", "context", "temperature", "max_tokens", "category", "ttl",
    "callbackUrl", "errorCallbackUrl", "auth",
})
_HASH_RE = re.compile(r"(?:^|&)hash=([^&]*)")
ASSISTANT_ROLES = frozenset({"assistant", "bot", "ai", "model"})


class ProtocolError(Exception):
    """The portal's request cannot be accepted; ``status`` is the HTTP status to answer."""

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
    callback_parts: SplitResult
    error_callback_parts: SplitResult
    """The two URLs parsed once, for the checks; the strings above are POSTed as received."""


def _invalid(field: str, problem: str) -> ProtocolError:
    return ProtocolError(422, "invalid_field", f"{field}: {problem}")


def _number(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _invalid(key, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _invalid(key, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _invalid(key, f"must be a finite number, got {value!r}")
    if kind is int:
        if not number.is_integer():
            raise _invalid(key, f"must be a whole number, got {value!r}")
        return int(number)
    return number


def _url(data: Mapping[str, Any], key: str) -> SplitResult:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(422, "missing_callback_url", f"{key} is missing: the gateway could not return the result")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _invalid(key, "must be an absolute http(s) URL")
    return parts


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
        if not isinstance(content, str):
            raise _invalid(f"context[{i}].content", "must be a string")
        role = str(role or "user").lower()
        role = "assistant" if role in ASSISTANT_ROLES else role if role in ("system", "user") else "user"
        messages.append(Message(role, content))
    return messages


def _image_prompt(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "style", "format", "images_number"}``, checked and with nulls dropped."""
    text = prompt.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise _invalid("prompt.prompt", "an image request needs a non-empty description")
    style = prompt.get("style")
    if style is not None and not isinstance(style, str):
        raise _invalid("prompt.style", "must be a string")
    fmt = prompt.get("format")
    if fmt not in (None, "", *IMAGE_FORMATS):
        raise _invalid("prompt.format", f"must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    count = _number(prompt, "images_number", int)
    if count is not None and count < 1:
        raise _invalid("prompt.images_number", f"must be at least 1, got {count}")
    return {"prompt": text, "style": style or None, "format": fmt or None, "images_number": count}


def _audio_prompt(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """``{"file", "fields", "fileExtension"}``, checked: the worker downloads ``file`` later."""
    url = prompt.get("file")
    if not isinstance(url, str) or not url.strip():
        raise _invalid("prompt.file", "an audio request needs the URL of the recording")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _invalid("prompt.file", "must be an absolute http(s) URL")
    fields = prompt.get("fields")
    if fields is None or fields == []:  # PHP encodes an empty array as []
        fields = {}
    if not isinstance(fields, Mapping):
        raise _invalid("prompt.fields", "must be an object")
    for key in ("type", "prompt"):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            raise _invalid(f"prompt.fields.{key}", "must be a string")
    extension = prompt.get("fileExtension")
    if extension is not None and not isinstance(extension, str):
        raise _invalid("prompt.fileExtension", "must be a string")
    return {"file": url.strip(), "fields": dict(fields), "fileExtension": extension or None}


def parse_completion_request(data: Any, *, engine: str, category: Category, default_ttl: int, job_id: str, now: float) -> CompletionRequest:
    if not isinstance(data, dict):
        raise ProtocolError(400, "invalid_json", "the request body must be a JSON object")
    sent_category = data.get("category")
    if sent_category not in (None, "") and sent_category != category.value:
        raise ProtocolError(422, "wrong_category", f"engine {engine!r} serves category {category.value!r}, the request is for {sent_category!r}")
    callback = _url(data, "callbackUrl")
    error_callback = _url(data, "errorCallbackUrl")

    prompt = data.get("prompt")
    if category is Category.TEXT:
        if not isinstance(prompt, str) or not prompt.strip():
            raise _invalid("prompt", "a text request needs a non-empty string prompt")
    elif not isinstance(prompt, Mapping):
        raise _invalid("prompt", f"a {category.value} request needs a prompt object")
    elif category is Category.IMAGE:
        prompt = _image_prompt(prompt)
    else:
        prompt = _audio_prompt(prompt)

    system = data.get("payload_role")
    if system is not None and not isinstance(system, str):
        raise _invalid("payload_role", "must be a string")
    ttl = _number(data, "ttl", int)
    ttl = default_ttl if ttl is None else ttl
    if ttl <= 0:
        raise _invalid("ttl", f"must be positive, got {ttl}")
    max_tokens = _number(data, "max_tokens", int)
    if max_tokens is not None and max_tokens <= 0:
        raise _invalid("max_tokens", f"must be positive, got {max_tokens}")
    markers = data.get("payload_markers")
    language = markers.get("language") if isinstance(markers, Mapping) else None

    task = Task(
        job_id=job_id,
        engine=engine,
        category=category,
        prompt=prompt,
        system=system or None,
        context=_context(data.get("context")),
        temperature=_number(data, "temperature", float),
        max_tokens=max_tokens,
        language=language if isinstance(language, str) and language else None,
        ttl=ttl,
        accepted_at=now,
        deadline=now + ttl,
        portal=callback.hostname or "",
        extra={k: v for k, v in data.items() if k not in CONSUMED_KEYS},
    )
    found = _HASH_RE.search(callback.query)
    portal_hash = found.group(1) if found else callback.geturl()
    key = hashlib.sha256(f"{engine}\n{portal_hash}".encode()).hexdigest()
    return CompletionRequest(task, data["callbackUrl"], data["errorCallbackUrl"], key, callback, error_callback)


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
            for s in segments if s.text.strip()
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
    outcome: Literal["delivered", "gone", "retry", "rejected"]
    detail: str


def read_callback_answer(status: int, body: bytes) -> PortalAnswer:
    """Classify the portal's answer to a callback POST."""
    if status in (408, 425, 429) or status >= 500:
        return PortalAnswer("retry", f"portal answered HTTP {status}")
    if 300 <= status < 400:
        return PortalAnswer("rejected", f"portal answered with a redirect (HTTP {status}); redirects are not followed")
    if status >= 400:
        return PortalAnswer("rejected", f"portal refused the callback with HTTP {status}")
    try:
        answer = json.loads(body)
    except ValueError:
        return PortalAnswer("retry", f"portal answered HTTP {status} with a body that is not JSON")
    if not isinstance(answer, Mapping):
        return PortalAnswer("retry", "portal answered with JSON that is not an object")
    if answer.get("status") == "success":
        if answer.get("data") is True:
            return PortalAnswer("delivered", "portal accepted the result")
        return PortalAnswer("gone", "portal answered data:false (job unknown, already consumed or expired)")
    errors = answer.get("errors") or []
    messages = "; ".join(str(e.get("message", e)) if isinstance(e, Mapping) else str(e) for e in errors)[:300]
    return PortalAnswer("rejected", f"portal answered status {answer.get('status')!r}: {messages or 'no detail'}")
