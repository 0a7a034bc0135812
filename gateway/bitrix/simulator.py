"""A portal emulator that behaves as a Bitrix24 portal's ``ai`` module does (see the protocol doc).

It sends completions requests in the portal's exact JSON (PHP escapes, ``auth: null``,
``bx_*`` keys), runs the registration check (``GET`` must answer exactly 200), and serves
the callback endpoints: each hash works once (``data:true``, then ``data:false``), expires
after its ``ttl``, and a body that is not JSON is read as an empty object, as PHP does.
Every callback is recorded, so tests can count deliveries.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.bitrix.protocol import encode_like_php
from gateway.bitrix.registration import BUILTIN_ENGINES
from gateway.config import ENGINE_CODE_RE
from gateway.tasks import Category

CALLBACK_PATH = "/bitrix/services/main/ajax.php"
CATEGORIES = tuple(category.value for category in Category)
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


@dataclass
class PortalFile:
    """A recording the portal serves at a URL without an extension, as CRM and chat files are."""

    data: bytes = b""
    content_type: str = "application/octet-stream"
    redirect: str | None = None
    """Answer 302 to this URL instead of serving bytes."""
    stream_bytes: int = 0
    """Serve this many bytes of silence-like filler in chunks, without a Content-Length."""
    downloads: int = 0
    bytes_sent: int = 0


class PortalEmulator:
    def __init__(self) -> None:
        self.url = ""
        self.jobs: dict[str, PortalJob] = {}
        self._changed = threading.Condition()
        self._fail_next: deque[int] = deque()
        self._late_answers: deque[float] = deque()
        self.app = Starlette(
            routes=[
                Route(CALLBACK_PATH, self._callback, methods=["POST"]),
                Route("/-/requests", self._create_request, methods=["POST"]),
                Route("/-/requests/{hash}", self._show_request, methods=["GET"]),
                Route("/-/wait", self._wait_many, methods=["POST"]),
                Route("/rest/{user}/{secret}/{method}", self._rest, methods=["POST"]),
                Route("/disk/file/{token}", self._file, methods=["GET"]),
                Route("/-/files", self._create_file, methods=["POST"]),
            ]
        )
        self.files: dict[str, PortalFile] = {}
        self.webhook_secret = secrets.token_hex(12)
        self.engines: dict[int, dict[str, Any]] = {}
        self.rest_calls: list[tuple[str, dict[str, Any]]] = []
        self._rest_fail_next: deque[tuple[int, str]] = deque()
        self._engine_ids = itertools.count(1)

    # -- the portal side of a request -------------------------------------------------
    def new_request(
        self, category: str = "text", prompt: Any = "Write a short greeting for our clients", ttl: int = 14400, **extra: Any
    ) -> tuple[str, dict[str, Any]]:
        """A fresh job hash and the JSON body the portal would POST for it."""
        assert self.url, "start the emulator's server and set .url first"
        job_hash = "".join(secrets.choice(HASH_ALPHABET) for _ in range(32))
        with self._changed:
            self.jobs[job_hash] = PortalJob(job_hash, category, ttl, time.time())
        body: dict[str, Any] = {
            "prompt": prompt,
            "payload_raw": prompt if isinstance(prompt, str) else prompt.get("file") if isinstance(prompt, dict) else None,
            "payload_provider": {"text": "text", "image": "styledpicture"}.get(category, "audio"),
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

    def add_file(self, data: bytes = b"", content_type: str = "application/octet-stream", *, redirect: str | None = None, stream_bytes: int = 0) -> str:
        """Serve a file; returns its URL, which has no extension (the MIME type goes in ``fields.type``)."""
        token = secrets.token_urlsafe(12)
        self.files[token] = PortalFile(data, content_type, redirect, stream_bytes)
        return f"{self.url}/disk/file/{token}"

    def file(self, url: str) -> PortalFile:
        return self.files[url.rsplit("/", 1)[-1]]

    def callback_url(self, action: str, job_hash: str) -> str:
        return f"{self.url}{CALLBACK_PATH}?{urlencode({'action': action, 'hash': job_hash})}"

    def send(self, completions_url: str, body: dict[str, Any], timeout: float = 65.0) -> httpx.Response:
        """POST as the portal does: PHP-encoded JSON, connect timeout 5 s, read 60 s, no retry."""
        job_hash = _hash_of(body)
        if job_hash in self.jobs:
            self.jobs[job_hash].sent_at = time.time()
        return httpx.post(
            completions_url,
            content=encode_like_php(body),
            headers={"Content-Type": "application/json"},
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

    def answer_late(self, seconds: float, count: int) -> None:
        """Take the next ``count`` callbacks at once (recorded, consumed) but answer each only
        after ``seconds``: a slow portal, whose answer may come after the sender gave up."""
        self._late_answers.extend([seconds] * count)

    # -- the REST API of ai.engine.* (an inbound webhook with scope ai_admin) -------------------
    @property
    def webhook(self) -> str:
        return f"{self.url}/rest/1/{self.webhook_secret}/"

    def rest_fail_next(self, *failures: tuple[int, str]) -> None:
        """Answer the next REST calls with (HTTP status, error code), e.g. (503, "QUERY_LIMIT_EXCEEDED")."""
        self._rest_fail_next.extend(failures)

    async def _rest(self, request: Request) -> Response:
        if request.path_params["secret"] != self.webhook_secret:
            return _rest_error(401, "NO_AUTH_FOUND", "Wrong authorization data")
        method = request.path_params["method"].removesuffix(".json")
        try:
            params = await request.json() if await request.body() else {}
        except ValueError:
            params = {}
        self.rest_calls.append((method, params))
        if self._rest_fail_next:
            status, code = self._rest_fail_next.popleft()
            return _rest_error(status, code, "scripted failure")
        handler = {"ai.engine.register": self._register, "ai.engine.list": self._list, "ai.engine.unregister": self._unregister}.get(method)
        if handler is None:
            return _rest_error(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        return await handler(params if isinstance(params, dict) else {})

    async def _register(self, params: dict[str, Any]) -> Response:
        for key, suffix in (("name", "NAME"), ("code", "CODE"), ("category", "CATEGORY"), ("completions_url", "COMPLETIONS_URL")):
            if not params.get(key):
                return _rest_error(400, f"ENGINE_REGISTER_ERROR_{suffix}", f"Parameter {key} is required")
        code, category, url = str(params["code"]), str(params["category"]), str(params["completions_url"])
        if not ENGINE_CODE_RE.match(code):
            return _rest_error(400, "ENGINE_REGISTER_ERROR_CODE_FORMAT", "Code may contain only latin letters, digits, _ and -")
        if category not in CATEGORIES:
            return _rest_error(400, "ENGINE_REGISTER_ERROR_CATEGORY_FORMAT", "Unknown category")
        taken = [*BUILTIN_ENGINES[category], *(e["code"] for e in self.engines.values() if e["category"] == category)]
        if any(other.lower() == code.lower() for other in taken):
            return _rest_error(400, "ENGINE_REGISTER_ERROR_CODE_UNIQUE", "Engine with this code already exists")
        try:
            async with httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=5.0)) as client:
                check = (await client.get(url)).status_code
        except httpx.HTTPError:
            check = None
        if check != 200:
            return _rest_error(400, "ENGINE_REGISTER_ERROR_COMPLETIONS_URL_FAIL", "Completions url is not available")
        settings = params.get("settings", {})
        if not isinstance(settings, (dict, list)):
            return _rest_error(400, "ENGINE_REGISTER_ERROR_SETTINGS_FORMAT", "Settings must be an array")
        engine_id = next(self._engine_ids)
        self.engines[engine_id] = {
            "id": engine_id,
            "app_code": None,
            "name": str(params["name"]),
            "code": code,
            "category": category,
            "completions_url": url,
            "settings": settings,
            "date_create": int(time.time()),
        }
        return _rest_result(engine_id)

    async def _list(self, params: dict[str, Any]) -> Response:
        wanted = {str(k).lower(): v for k, v in (params.get("filter") or {}).items()}
        items = [dict(e) for e in self.engines.values() if all(str(e.get(k)) == str(v) for k, v in wanted.items())]
        limit = params.get("limit")
        return _rest_result(items[: int(limit)] if limit else items)

    async def _unregister(self, params: dict[str, Any]) -> Response:
        code = str(params.get("code") or "")
        doomed = [i for i, e in self.engines.items() if e["code"].lower() == code.lower()]
        for engine_id in doomed:
            del self.engines[engine_id]
        return _rest_result(bool(doomed))

    async def _file(self, request: Request) -> Response:
        served = self.files.get(request.path_params["token"])
        if served is None:
            return Response("Not found", 404)
        served.downloads += 1
        if served.redirect:
            return Response(status_code=302, headers={"Location": served.redirect})
        if served.stream_bytes:

            async def chunks() -> AsyncIterator[bytes]:
                chunk = b"\0" * 65536
                while served.bytes_sent < served.stream_bytes and not await request.is_disconnected():
                    served.bytes_sent += len(chunk)
                    yield chunk

            return StreamingResponse(chunks(), media_type=served.content_type)
        served.bytes_sent += len(served.data)
        return Response(served.data, media_type=served.content_type)

    # -- control API, for driving an emulator that runs in another process -------------------
    async def _create_file(self, request: Request) -> Response:
        """``POST /-/files`` with the file as the body -> ``{url}``, served with the request's Content-Type."""
        url = self.add_file(await request.body(), request.headers.get("content-type", "application/octet-stream"))
        return JSONResponse({"url": url})

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
        while not job.consumed and time.monotonic() < deadline:  # noqa: ASYNC110 -- callbacks arrive on other requests; a test aid, polled briefly
            await asyncio.sleep(0.005)
        return JSONResponse(
            {
                "hash": job.hash,
                "consumed": job.consumed,
                "callbacks": [_callback_json(c) for c in job.callbacks],
            }
        )

    async def _wait_many(self, request: Request) -> Response:
        """``POST /-/wait {hashes, timeout}``: every job's callbacks once all were delivered."""
        spec = await request.json()
        jobs = [self.jobs[h] for h in spec["hashes"] if h in self.jobs]
        deadline = time.monotonic() + float(spec.get("timeout", 30))
        while not all(job.consumed for job in jobs) and time.monotonic() < deadline:  # noqa: ASYNC110 -- as above
            await asyncio.sleep(0.005)
        return JSONResponse({job.hash: [_callback_json(c) for c in job.callbacks] for job in jobs})

    # -- the callback endpoints ---------------------------------------------------------
    async def _callback(self, request: Request) -> Response:
        if self._fail_next:
            status = self._fail_next.popleft()
            return Response("Service Unavailable", status)
        delay = self._late_answers.popleft() if self._late_answers else 0.0
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
        if delay:
            await asyncio.sleep(delay)
        return _answer("success", accepted, [])


def _rest_result(result: Any) -> JSONResponse:
    now = time.time()
    return JSONResponse({"result": result, "time": {"start": now, "finish": now, "duration": 0.0}})


def _rest_error(status: int, code: str, description: str) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status)


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
