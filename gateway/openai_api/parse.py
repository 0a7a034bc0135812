"""Request bodies of the OpenAI-compatible API -> checked, typed requests.

Every input is hostile: a body is a JSON object or a 400, every field has its type and range
checked, sizes and counts are bounded, and every refusal names the field (``param``) in
OpenAI's error shape. Nothing here raises anything but :class:`~gateway.openai_api.errors.APIError`
(property-tested in ``tests/test_openai_parse.py``). Fields OpenAI defines that the gateway
cannot honour (tools, several choices, log probabilities) are refused by name rather than
silently ignored; fields with no effect on the answer (``user``, ``metadata``) are accepted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import OpenAIApiSettings
from gateway.openai_api.errors import invalid
from gateway.tasks import Message

MAX_MODEL_CHARS = 200
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 500
MAX_IMAGE_PROMPT_CHARS = 32000
MAX_IMAGES = 10
MAX_TRANSCRIPTION_PROMPT_CHARS = 4096
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Message roles -> the role the model sees (``developer`` is the newer name of ``system``)."""
CHAT_PASS_THROUGH = ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "response_format")
"""Client parameters handed to the adapter (over the route target's ``params``)."""
CHAT_NO_EFFECT = frozenset(
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice", "function_call", "safety_identifier", "prompt_cache_key"}
)
CHAT_UNSUPPORTED = frozenset(
    {"tools", "functions", "logit_bias", "top_logprobs", "modalities", "audio", "prediction", "web_search_options", "reasoning_effort"}
)
CHAT_KEYS = frozenset(
    {"model", "messages", "stream", "stream_options", "temperature", "max_tokens", "max_completion_tokens", "n", "logprobs", *CHAT_PASS_THROUGH}
)
IMAGE_KEYS = frozenset({"model", "prompt", "n", "size", "response_format", "quality", "style", "user"})
IMAGE_RESPONSE_FORMATS = ("url", "b64_json")
_SIZE_RE = re.compile(r"^\d{2,5}x\d{2,5}$")
TRANSCRIPTION_FIELDS = frozenset(
    {"model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]", "timestamp_granularities", "stream"}
)
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
_LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z]{2,4})?$")
INT64 = 2**63


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    """The client's own parameters for the provider (:data:`CHAT_PASS_THROUGH`)."""


@dataclass(frozen=True)
class ImagesRequest:
    model: str
    prompt: str
    n: int = 1
    size: str | None = None
    """``WIDTHxHEIGHT``, or None for the engine's square size."""
    response_format: str = "url"
    params: Mapping[str, Any] = field(default_factory=dict)
    """``quality`` and ``style``, passed to the provider."""


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: float | None = None


def read_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object: 400 for anything else (no NaN, no Infinity, no deep nesting)."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(body, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise invalid(None, f"the body is not valid JSON: {exc.msg} at position {exc.pos}", "invalid_json") from None
    except UnicodeDecodeError:
        raise invalid(None, "the body is not valid UTF-8 text", "invalid_json") from None
    except RecursionError:
        raise invalid(None, "the body's JSON is nested too deeply", "invalid_json") from None
    except ValueError as exc:  # NaN, Infinity, an integer of more than 4,300 digits
        raise invalid(None, f"the body's JSON cannot be read: {str(exc)[:120]}", "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(None, f"the body must be a JSON object, got {_kind(data)}", "invalid_json")
    return data


def parse_chat(data: Mapping[str, Any], limits: OpenAIApiSettings) -> ChatRequest:
    """A ``/v1/chat/completions`` body."""
    _check_keys(data, CHAT_KEYS | CHAT_NO_EFFECT, CHAT_UNSUPPORTED)
    if data.get("tools") not in (None, []):
        raise invalid("tools", "tools (function calling) are not supported by this gateway", "unsupported_parameter")
    model = _model(data)
    messages = _messages(data.get("messages"), limits)
    stream = _flag(data, "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(options, Mapping) or any(k != "include_usage" for k in options):
            raise invalid("stream_options", "stream_options must be an object with at most include_usage")
        include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    if data.get("n") not in (None, 1):
        raise invalid("n", "n must be 1: this gateway answers one choice per request", "unsupported_value")
    if data.get("logprobs") not in (None, False):
        raise invalid("logprobs", "logprobs are not supported by this gateway", "unsupported_value")
    max_tokens = _integer(data, "max_completion_tokens", 1, 1_000_000)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1, 1_000_000)
    params: dict[str, Any] = {}
    for name, low, high in (("top_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
        value = _number(data, name, low, high)
        if value is not None:
            params[name] = value
    seed = _integer(data, "seed", -INT64, INT64 - 1)
    if seed is not None:
        params["seed"] = seed
    stop = _stop(data.get("stop"))
    if stop is not None:
        params["stop"] = stop
    response_format = data.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, Mapping) or response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid("response_format", 'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}')
        params["response_format"] = dict(response_format)
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        temperature=_number(data, "temperature", 0.0, 2.0),
        max_tokens=max_tokens,
        params=params,
    )


def parse_images(data: Mapping[str, Any]) -> ImagesRequest:
    """A ``/v1/images/generations`` body."""
    _check_keys(data, IMAGE_KEYS, frozenset())
    model = _model(data)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("prompt", "prompt is required: a non-empty string")
    if len(prompt) > MAX_IMAGE_PROMPT_CHARS:
        raise invalid("prompt", f"prompt is longer than {MAX_IMAGE_PROMPT_CHARS} characters")
    _unicode(prompt, "prompt")
    n = _integer(data, "n", 1, MAX_IMAGES)
    size = data.get("size")
    if size is not None and (not isinstance(size, str) or (size != "auto" and not _SIZE_RE.match(size))):
        raise invalid("size", "size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto")
    response_format = data.get("response_format") or "url"
    if response_format not in IMAGE_RESPONSE_FORMATS:
        raise invalid("response_format", "response_format must be url or b64_json")
    params: dict[str, Any] = {}
    for name in ("quality", "style"):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not 0 < len(value) <= 32:
            raise invalid(name, f"{name} must be a short string, e.g. standard or hd")
        params[name] = value
    _short_text(data, "user")
    return ImagesRequest(model, prompt, n or 1, None if size in (None, "auto") else size, response_format, params)


def parse_transcription(fields: Mapping[str, str]) -> TranscriptionRequest:
    """The form fields of a ``/v1/audio/transcriptions`` upload (the file is checked by the endpoint)."""
    unknown = sorted(k for k in fields if k not in TRANSCRIPTION_FIELDS)
    if unknown:
        raise invalid(_printable(unknown[0]), f"unrecognized request argument supplied: {_printable(unknown[0])}", "unknown_parameter")
    model = _model(fields)
    language = fields.get("language") or None
    if language is not None and not _LANGUAGE_RE.match(language):
        raise invalid("language", "language must be an ISO-639-1 code such as en or de")
    prompt = fields.get("prompt") or None
    if prompt is not None and len(prompt) > MAX_TRANSCRIPTION_PROMPT_CHARS:
        raise invalid("prompt", f"prompt is longer than {MAX_TRANSCRIPTION_PROMPT_CHARS} characters")
    response_format = fields.get("response_format") or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise invalid("response_format", f"response_format must be one of {', '.join(TRANSCRIPTION_FORMATS)}")
    temperature = None
    if fields.get("temperature"):
        try:
            temperature = float(fields["temperature"])
        except ValueError:
            raise invalid("temperature", "temperature must be a number between 0 and 1") from None
        if not math.isfinite(temperature) or not 0 <= temperature <= 1:
            raise invalid("temperature", "temperature must be a number between 0 and 1")
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        if fields.get(name) not in (None, "", "segment"):
            raise invalid(name, "only segment timestamps are supported by this gateway", "unsupported_value")
    if fields.get("stream") not in (None, "", "false", "False"):
        raise invalid("stream", "streamed transcriptions are not supported by this gateway", "unsupported_value")
    return TranscriptionRequest(model, language.lower() if language else None, prompt, response_format, temperature)


# -- fields ---------------------------------------------------------------------------------
def _check_keys(data: Mapping[str, Any], known: frozenset[str], unsupported: frozenset[str]) -> None:
    for key in data:
        if key in unsupported and data[key] not in (None, [], {}):
            raise invalid(key, f"{key} is not supported by this gateway", "unsupported_parameter")
        if key not in known and key not in unsupported:
            name = _printable(str(key))
            raise invalid(name, f"unrecognized request argument supplied: {name}", "unknown_parameter")


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model", "model is required: the code of an engine (GET /v1/models lists them)")
    if len(model) > MAX_MODEL_CHARS:
        raise invalid("model", f"model is longer than {MAX_MODEL_CHARS} characters")
    return model


def _messages(raw: Any, limits: OpenAIApiSettings) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "messages is required: a non-empty list of {role, content}")
    if len(raw) > limits.max_messages:
        raise invalid("messages", f"too many messages: {len(raw)}, at most {limits.max_messages}", "too_many_messages")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, Mapping):
            raise invalid(where, f"{where} must be an object with role and content")
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            if role in ("tool", "function"):
                raise invalid(f"{where}.role", f"{where}.role {role!r}: tool messages are not supported by this gateway", "unsupported_value")
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
        if item.get("tool_calls") not in (None, []):
            raise invalid(f"{where}.tool_calls", "tool calls are not supported by this gateway", "unsupported_value")
        content = _content(item.get("content"), f"{where}.content")
        _unicode(content, f"{where}.content")
        if len(content) > limits.max_message_chars:
            raise invalid(f"{where}.content", f"{where}.content is longer than {limits.max_message_chars} characters", "message_too_long")
        messages.append(Message(ROLES[role], content))
    if messages[-1].role != "user":
        raise invalid(f"messages[{len(raw) - 1}].role", "the last message must have role user: the model answers it")
    return tuple(messages)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) and isinstance(part.get("type"), str) else None
                problem = f"parts of type {_printable(kind)!r} are not supported by this gateway" if kind else 'each part must be {"type": "text", "text": ...}'
                raise invalid(f"{where}[{j}]", f"{where}[{j}]: {problem}", "unsupported_value" if kind else None)
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(where, f"{where} must be a string or a list of text parts")


def _flag(data: Mapping[str, Any], name: str, param: str | None = None) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(param or name, f"{param or name} must be true or false")
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise invalid(name, f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _integer(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, f"{name} must be a whole number from {low} to {high}")
    return value


def _stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items):
        raise invalid("stop", f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} characters")
    return value if isinstance(value, str) else list(items)


def _short_text(data: Mapping[str, Any], name: str) -> None:
    value = data.get(name)
    if value is not None and (not isinstance(value, str) or len(value) > 256):
        raise invalid(name, f"{name} must be a string of at most 256 characters")


def _unicode(text: str, param: str) -> None:
    """Refuse text UTF-8 cannot carry (lone surrogates, which JSON's ``\\ud800`` escapes let in)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(param, f"{param} is not valid Unicode text (it holds a lone surrogate)") from None


def _printable(text: str) -> str:
    """A client's key name fit for a message: printable, short."""
    return text[:64] if text[:64].isprintable() else repr(text[:64])


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)
