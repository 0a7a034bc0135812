"""A scriptable OpenAI-compatible upstream for tests and benchmarks of anything that talks to one.

It stands in for a provider in tests (the ``upstream`` fixture serves one on 127.0.0.1);
it is a test server, not a vendor SDK.

By default it answers every chat completion with ``echo: <last user message>``. Queue
behaviours with :meth:`FakeOpenAI.script` to make the next requests fail:
``"500"`` / ``"429"`` (that status), ``"delay:2.5"`` (answer after 2.5 s), ``"drop"``
(close the connection in the middle of the answer), ``"json:{...}"`` (answer 200 with
that body), ``"ok"`` (a normal answer).

A chat completion with ``stream: true`` answers server-sent events, a word of the answer per
chunk (``stream_delay`` seconds apart), with the usage last when ``stream_options.include_usage``
asks for it. ``"slowstream:N:D"`` streams N chunks D seconds apart; ``"streamfail"`` sends two
chunks and then drops the connection. :attr:`FakeOpenAI.streams` counts streams
``finished`` and ``cancelled`` (the client closed the connection before the end).

Transcriptions (``/v1/audio/transcriptions``, multipart) record their form fields and the
uploaded file in :attr:`FakeOpenAI.uploads` and answer ``transcript of <name> (<n> bytes)``,
with timed segments for ``verbose_json``; ``transcription_mode = "json-only"`` makes the
server refuse ``verbose_json`` with HTTP 400, as some compatible servers do.

Image generations answer with real PNG pictures (:func:`make_png`), as ``b64_json`` or,
with ``image_mode = "url"``, as URLs this server serves; ``image_mode = "garbage"`` returns
bytes that are not an image.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import struct
import threading
import zlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send


class DroppedConnection(Exception):
    """Raised after the response started: uvicorn then closes the connection mid-answer."""


class FakeOpenAI:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.url = ""  # set by whoever serves ``app``
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._script: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self.image_mode = "b64"
        self.pictures: list[bytes] = []  # every picture handed out, in order
        self.transcription_mode = "verbose"
        self.uploads: list[dict[str, Any]] = []
        self.stream_delay = 0.0
        self.streams = {"started": 0, "finished": 0, "cancelled": 0}
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/images/generations", self._images, methods=["POST"]),
                Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
                Route("/pictures/{index:int}.png", self._picture),
            ]
        )

    def script(self, *behaviours: str) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def _next(self) -> str:
        with self._lock:
            return self._script.popleft() if self._script else "ok"

    async def _chat(self, request: Request) -> Any:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
        behaviour = self._next()
        delay = self.delay
        if behaviour.startswith("delay:"):
            delay = float(behaviour.split(":", 1)[1])
        if delay:
            await asyncio.sleep(delay)
        if behaviour.isdigit():
            status = int(behaviour)
            return JSONResponse({"error": {"message": f"scripted failure {status}", "type": "test"}}, status)
        if behaviour.startswith("json:"):
            return JSONResponse(json.loads(behaviour[5:]))
        if behaviour == "drop":
            return _DroppingResponse()
        last_user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        if body.get("stream"):
            words = f"echo: {last_user}".split(" ")
            pause = self.stream_delay
            if behaviour.startswith("slowstream:"):
                count, pause_text = behaviour.split(":")[1:3]
                words, pause = [f"w{i} " for i in range(int(count))], float(pause_text)
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream(body.get("model"), words, pause, usage, fail=behaviour == "streamfail"), media_type="text/event-stream")
        return JSONResponse(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {last_user}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        )

    async def _stream(self, model: Any, words: list[str], pause: float, usage: bool, *, fail: bool) -> Any:
        def event(body: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(body)}\n\n".encode()

        base = {"id": f"chatcmpl-s{len(self.requests)}", "object": "chat.completion.chunk", "created": 0, "model": model}
        with self._lock:
            self.streams["started"] += 1
        try:
            for i, word in enumerate(words):
                if i and pause:
                    await asyncio.sleep(pause)
                if fail and i == 2:
                    raise DroppedConnection("scripted drop mid-stream")
                text = word if i == len(words) - 1 or word.endswith(" ") else word + " "
                yield event({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            yield event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if usage:
                yield event({**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}})
            yield b"data: [DONE]\n\n"
            with self._lock:
                self.streams["finished"] += 1
        except (asyncio.CancelledError, GeneratorExit):
            with self._lock:
                self.streams["cancelled"] += 1
            raise

    async def _images(self, request: Request) -> Any:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
        behaviour = self._next()
        if behaviour.isdigit():
            return JSONResponse({"error": {"message": f"scripted failure {behaviour}"}}, int(behaviour))
        if behaviour.startswith("json:"):
            return JSONResponse(json.loads(behaviour[5:]))
        width, height = (int(v) for v in str(body.get("size", "1024x1024")).split("x"))
        data = []
        for _ in range(int(body.get("n", 1))):
            picture = b"this is not an image at all" if self.image_mode == "garbage" else make_png(width // 128, height // 128, len(self.pictures))
            with self._lock:
                self.pictures.append(picture)
                index = len(self.pictures) - 1
            if self.image_mode == "url":
                data.append({"url": f"{self.url}/pictures/{index}.png"})
            else:
                data.append({"b64_json": base64.b64encode(picture).decode()})
        return JSONResponse({"created": 0, "data": data})

    async def _transcriptions(self, request: Request) -> Any:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return JSONResponse({"error": {"message": "file is required"}}, 400)
        content = await upload.read()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        with self._lock:
            self.uploads.append({"fields": fields, "filename": upload.filename, "content_type": upload.content_type, "content": content})
        behaviour = self._next()
        if behaviour.isdigit():
            return JSONResponse({"error": {"message": f"scripted failure {behaviour}"}}, int(behaviour))
        if behaviour.startswith("json:"):
            return JSONResponse(json.loads(behaviour[5:]))
        text = f"transcript of {upload.filename} ({len(content)} bytes)"
        response_format = fields.get("response_format", "json")
        if response_format == "verbose_json":
            if self.transcription_mode == "json-only":
                return JSONResponse({"error": {"message": "response_format 'verbose_json' is not supported", "type": "invalid_request_error"}}, 400)
            return JSONResponse(
                {
                    "task": "transcribe",
                    "language": "english",
                    "duration": 75.5,
                    "text": text,
                    "segments": [
                        {"id": 0, "start": 0.0, "end": 61.2, "text": f" transcript of {upload.filename}"},
                        {"id": 1, "start": 61.2, "end": 75.5, "text": f" ({len(content)} bytes)"},
                    ],
                }
            )
        return JSONResponse({"text": text})

    async def _picture(self, request: Request) -> Response:
        index = request.path_params["index"]
        if index >= len(self.pictures):
            return Response(status_code=404)
        return Response(self.pictures[index], media_type="image/png")


def make_png(width: int, height: int, seed: int = 0) -> bytes:
    """A valid RGB PNG whose pixels depend on ``seed``, so every picture is different."""
    rows = b"".join(b"\x00" + bytes((x * 37 + seed * 11) % 256 for x in range(width * 3)) for _ in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class _DroppingResponse:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        payload = json.dumps({"choices": []}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload) * 4).encode())]  # promises more than it sends
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload[:5], "more_body": True})
        raise DroppedConnection("scripted drop")


def main() -> None:
    """``python -m gateway.testing --port 8001 --delay 0.05``: serve the fake for benchmarks."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(FakeOpenAI(delay=args.delay).app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
