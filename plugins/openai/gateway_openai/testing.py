"""A scriptable OpenAI-compatible server for tests and benchmarks of anything that talks to one.

By default it answers every chat completion with ``echo: <last user message>``. Queue
behaviours with :meth:`FakeOpenAI.script` to make the next requests fail:
``"500"`` / ``"429"`` (that status), ``"delay:2.5"`` (answer after 2.5 s), ``"drop"``
(close the connection in the middle of the answer), ``"ok"`` (a normal answer).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
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
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])

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
        if behaviour == "drop":
            return _DroppingResponse()
        last_user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        return JSONResponse({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {last_user}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        })


class _DroppingResponse:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        payload = json.dumps({"choices": []}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload) * 4).encode())]})
        await send({"type": "http.response.body", "body": payload[:5], "more_body": True})
        raise DroppedConnection("scripted drop")


def main() -> None:
    """``python -m gateway_openai.testing --port 8001 --delay 0.05``: serve the fake for benchmarks."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(FakeOpenAI(delay=args.delay).app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
