"""A portal emulator that behaves as a Bitrix24 portal's ``ai`` module does (see the protocol doc).

It sends completions requests in the portal's exact JSON (PHP escapes, ``auth: null``,
``bx_*`` keys), runs the registration check (``GET`` must answer exactly 200), and serves
the callback endpoints: each hash works once (``data:true``, then ``data:false``), expires
after its ``ttl``, and a body that is not JSON is read as an empty object, as PHP does.
Every callback is recorded, so tests can count deliveries.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.bitrix.protocol import encode_like_php

CALLBACK_PATH = "/bitrix/services/main/ajax.php"
SUCCESS_ACTION = "ai.controller.integration.thirdparty.callbackSuccess"
ERROR_ACTION = "ai.controller.integration.thirdparty.callbackError"
HASH_ALPHABET = string.ascii_letters + string.digits


@dataclass
class Callback:
    kind: str  # "success" or "error"
    body: Any
    accepted: bool  # the portal answered data:true
    at: float


@dataclass
class PortalJob:
    hash: str
    category: str
    ttl: int
    created: float
    sent_at: float = 0.0
    consumed: bool = False
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def delivered(self) -> list[Callback]:
        return [c for c in self.callbacks if c.accepted]


class PortalEmulator:
    def __init__(self) -> None:
        self.url = ""
        self.jobs: dict[str, PortalJob] = {}
        self._changed = threading.Condition()
        self._fail_next: deque[int] = deque()
        self.app = Starlette(routes=[
            Route(CALLBACK_PATH, self._callback, methods=["POST"]),
            Route("/-/requests", self._create_request, methods=["POST"]),
            Route("/-/requests/{hash}", self._show_request, methods=["GET"]),
            Route("/-/wait", self._wait_many, methods=["POST"]),
        ])

    # -- the portal side of a request -------------------------------------------------
    def new_request(self, category: str = "text", prompt: Any = "Write a short greeting for our clients", ttl: int = 14400, **extra: Any) -> tuple[str, dict[str, Any]]:
        """A fresh job hash and the JSON body the portal would POST for it."""
        assert self.url, "start the emulator's server and set .url first"
        job_hash = "".join(secrets.choice(HASH_ALPHABET) for _ in range(32))
        with self._changed:
            self.jobs[job_hash] = PortalJob(job_hash, category, ttl, time.time())
        body: dict[str, Any] = {
            "prompt": prompt,
            "payload_raw": prompt if isinstance(prompt, str) else None,
            "payload_provider": "text" if category == "text" else "audio",
            "payload_role": "You are a helpful assistant.",
            "context": [],
            "payload_markers": {"language": "English"},
            "payload_prompt_text": None,
            "auth": None,
            "category": category,
            "ttl": ttl,
            "callbackUrl": self.callback_url(SUCCESS_ACTION, job_hash),
            "errorCallbackUrl": self.callback_url(ERROR_ACTION, job_hash),
            "bx_module": "crm",
            "bx_context": "crm_activity",
        }
        body.update(extra)
        return job_hash, body

    def callback_url(self, action: str, job_hash: str) -> str:
        return f"{self.url}{CALLBACK_PATH}?{urlencode({'action': action, 'hash': job_hash})}"

    def send(self, completions_url: str, body: dict[str, Any], timeout: float = 65.0) -> httpx.Response:
        """POST as the portal does: PHP-encoded JSON, connect timeout 5 s, read 60 s, no retry."""
        job_hash = _hash_of(body)
        if job_hash in self.jobs:
            self.jobs[job_hash].sent_at = time.time()
        return httpx.post(
            completions_url, content=encode_like_php(body), headers={"Content-Type": "application/json"},
            timeout=httpx.Timeout(min(timeout, 60.0), connect=5.0),
        )

    @staticmethod
    def check_completions_url(url: str) -> int:
        """The registration check: GET, redirects followed; the portal requires exactly 200."""
        return httpx.get(url, follow_redirects=True, timeout=httpx.Timeout(60.0, connect=5.0)).status_code

    def wait(self, job_hash: str, timeout: float = 30.0) -> PortalJob:
        """Block until the job has a delivered callback (or the timeout passes); returns the job."""
        deadline = time.monotonic() + timeout
        with self._changed:
            job = self.jobs[job_hash]
            while not job.consumed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return job

    def fail_next(self, *statuses: int) -> None:
        """Answer the next callbacks with these HTTP statuses (as a portal in trouble would)."""
        self._fail_next.extend(statuses)

    # -- control API, for driving an emulator that runs in another process -------------------
    async def _create_request(self, request: Request) -> Response:
        """``POST /-/requests {category, prompt, ttl, extra}`` -> ``{hash, body}``."""
        spec = await request.json()
        job_hash, body = self.new_request(spec.get("category", "text"), spec.get("prompt", "Hello"), int(spec.get("ttl", 14400)), **spec.get("extra", {}))
        return JSONResponse({"hash": job_hash, "body": body})

    async def _show_request(self, request: Request) -> Response:
        """``GET /-/requests/{hash}?wait=SECONDS``: the job's callbacks, waiting until one is delivered."""
        job = self.jobs.get(request.path_params["hash"])
        if job is None:
            return JSONResponse({"error": "unknown hash"}, 404)
        deadline = time.monotonic() + float(request.query_params.get("wait", 0))
        while not job.consumed and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return JSONResponse({
            "hash": job.hash, "consumed": job.consumed,
            "callbacks": [_callback_json(c) for c in job.callbacks],
        })

    async def _wait_many(self, request: Request) -> Response:
        """``POST /-/wait {hashes, timeout}``: every job's callbacks once all were delivered."""
        spec = await request.json()
        jobs = [self.jobs[h] for h in spec["hashes"] if h in self.jobs]
        deadline = time.monotonic() + float(spec.get("timeout", 30))
        while not all(job.consumed for job in jobs) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return JSONResponse({job.hash: [_callback_json(c) for c in job.callbacks] for job in jobs})

    # -- the callback endpoints ---------------------------------------------------------
    async def _callback(self, request: Request) -> Response:
        if self._fail_next:
            status = self._fail_next.popleft()
            return Response("Service Unavailable", status)
        action, job_hash = request.query_params.get("action"), request.query_params.get("hash", "")
        if action not in (SUCCESS_ACTION, ERROR_ACTION):
            return _answer("error", None, [{"message": "Action not found", "code": 0}])
        raw = await request.body()
        body: Any = {}
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
        if action == SUCCESS_ACTION and (not isinstance(body, dict) or not body):
            body = {"result": "[]"}  # PHP reads a non-JSON body as an empty array and stores "[]"
        with self._changed:
            job = self.jobs.get(job_hash)
            now = time.time()
            accepted = job is not None and not job.consumed and now <= job.created + job.ttl
            if job is not None:
                job.callbacks.append(Callback("success" if action == SUCCESS_ACTION else "error", body, accepted, now))
                if accepted:
                    job.consumed = True
                self._changed.notify_all()
        return _answer("success", accepted, [])


def _callback_json(callback: Callback) -> dict[str, Any]:
    return {"kind": callback.kind, "body": callback.body, "accepted": callback.accepted, "at": callback.at}


def _answer(status: str, data: Any, errors: list[Any]) -> JSONResponse:
    return JSONResponse({"status": status, "data": data, "errors": errors})


def _hash_of(body: dict[str, Any]) -> str:
    url = str(body.get("callbackUrl", ""))
    return url.rsplit("hash=", 1)[-1] if "hash=" in url else ""


def main() -> None:
    """``python -m gateway.bitrix.simulator --port 8002``: a standalone emulator with its control API."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    emulator = PortalEmulator()
    emulator.url = f"http://127.0.0.1:{args.port}"
    uvicorn.run(emulator.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
