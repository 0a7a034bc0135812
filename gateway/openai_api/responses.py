"""Results -> OpenAI's answer bodies: chat completions and their stream chunks, images,
transcriptions in each ``response_format``, the model list.

The ``model`` of every answer is the engine code the client asked for: which provider
answered stays the gateway's business (it is in the logs and metrics).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse

from gateway.adapters import Segment, Transcript, Usage

SSE_DONE = b"data: [DONE]\n\n"


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage_json(usage: Usage | None) -> dict[str, int]:
    """OpenAI's usage object; zeros where the provider reported nothing (the SDK expects the numbers)."""
    prompt = int(usage.prompt_tokens or 0) if usage else 0
    completion = int(usage.completion_tokens or 0) if usage else 0
    total = int(usage.total_tokens or prompt + completion) if usage else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def chat_completion(id: str, model: str, text: str, usage: Usage | None, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_json(usage),
        "system_fingerprint": None,
    }


def chunk_event(id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    """One server-sent event of a streamed chat completion."""
    body = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return sse(body)


def usage_event(id: str, model: str, created: int, usage: Usage | None) -> bytes:
    """The last chunk when the client asked for ``stream_options.include_usage``: no choices, the usage."""
    return sse({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage_json(usage)})


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json_bytes(body) + b"\n\n"


def json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON; escaped ASCII when the text holds what UTF-8 cannot encode (a
    provider's lone surrogate), so that no answer fails to encode."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":")).encode()


class Answer(JSONResponse):
    """A JSON answer rendered by :func:`json_bytes`."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def images(items: Iterable[dict[str, str]], usage: Usage | None) -> dict[str, Any]:
    body: dict[str, Any] = {"created": int(time.time()), "data": list(items)}
    if usage is not None and (usage.prompt_tokens or usage.total_tokens):
        body["usage"] = {"input_tokens": usage.prompt_tokens or 0, "output_tokens": usage.completion_tokens or 0, "total_tokens": usage.total_tokens or 0}
    return body


def transcription(transcript: Transcript, response_format: str) -> tuple[str | dict[str, Any], str]:
    """The answer body and its media type for ``response_format`` (json, text, verbose_json, srt, vtt)."""
    if response_format == "text":
        return transcript.text + "\n", "text/plain; charset=utf-8"
    if response_format == "srt":
        return _cues(transcript, srt=True), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return "WEBVTT\n\n" + _cues(transcript, srt=False), "text/vtt; charset=utf-8"
    if response_format == "verbose_json":
        return {
            "task": "transcribe",
            "language": transcript.language or "",
            "duration": transcript.duration if transcript.duration is not None else (_segments(transcript)[-1].end if _segments(transcript) else 0.0),
            "text": transcript.text,
            "segments": [
                {
                    "id": i,
                    "seek": 0,
                    "start": s.start,
                    "end": s.end,
                    "text": s.text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": 0.0,
                    "compression_ratio": 0.0,
                    "no_speech_prob": 0.0,
                }
                for i, s in enumerate(_segments(transcript))
            ],
        }, "application/json"
    return {"text": transcript.text}, "application/json"


def models(codes: Iterable[str], created: int = 0) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": code, "object": "model", "created": created, "owned_by": "bitrix24-ai-gateway"} for code in codes]}


def _segments(transcript: Transcript) -> tuple[Segment, ...]:
    """The timed segments, or the whole text as one when the provider gave none."""
    if transcript.segments:
        return transcript.segments
    return (Segment(0.0, transcript.duration or 0.0, transcript.text),) if transcript.text else ()


def _cues(transcript: Transcript, *, srt: bool) -> str:
    def stamp(seconds: float) -> str:
        ms = round(max(0.0, seconds) * 1000)
        h, rest = divmod(ms, 3600_000)
        m, rest = divmod(rest, 60_000)
        s, ms = divmod(rest, 1000)
        return f"{h:02d}:{m:02d}:{s:02d}{',' if srt else '.'}{ms:03d}"

    cues = []
    for i, segment in enumerate(_segments(transcript), 1):
        number = f"{i}\n" if srt else ""
        cues.append(f"{number}{stamp(segment.start)} --> {stamp(segment.end)}\n{segment.text}\n")
    return "\n".join(cues)
