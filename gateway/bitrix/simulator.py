"""A portal emulator that behaves as a Bitrix24 portal's ``ai`` module does (see the protocol doc).

It sends completions requests in the portal's exact JSON (PHP escapes, ``auth: null``,
``bx_*`` keys), runs the registration check (``GET`` must answer exactly 200), and serves
the callback endpoints: each hash works once (``data:true``, then ``data:false``), expires
after its ``ttl``, and a body that is not JSON is read as an empty object, as PHP does.
Every callback is recorded, so tests can count deliveries.

App mode (``bitrix24-app-mode.md``): :meth:`PortalEmulator.install` installs an app whose tokens come
from an :class:`~gateway.bitrix.oauth_emulator.OAuthEmulator` and POSTs the form-encoded
``ONAPPINSTALL``; the OAuth REST API at ``{client_endpoint}{method}`` (``auth`` token) serves
``ai.engine.*`` scoped to the app's code, ``event.bind/unbind/get`` and ``app.info``;
:meth:`~PortalEmulator.uninstall` deletes the app's engines, revokes its tokens and sends
``ONAPPUNINSTALL`` to the handlers bound for it; :meth:`~PortalEmulator.rename_to` makes the old
address answer REST calls with 302.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.bitrix.oauth_emulator import OAuthEmulator
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


@dataclass
class InstalledApp:
    """The app installed on this portal: its OAuth client, its ``CODE`` (the engines' ``app_code``)."""

    id: int
    client_id: str
    client_secret: str
    app_code: str
    status: str
    application_token: str
    handler_url: str
    user_id: int
    installed: bool = True


@dataclass
class EventBinding:
    id: int
    """Sent as ``event_handler_id``."""
    event: str
    handler: str
    app_code: str
    auth_type: int = 0
    event_type: str = "online"


@dataclass
class SentEvent:
    """An event the portal POSTed; ``status`` is None when the handler could not be reached (events are not retried)."""

    url: str
    fields: dict[str, Any]
    status: int | None


KNOWN_EVENTS = frozenset({"ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPUPDATE", "ONAPPPAYMENT", "ONAPPTEST", "ONAPPMETHODCONFIRM", "ONOFFLINEEVENT"})
EVENT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


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
                Route("/rest/{method}", self._app_rest, methods=["GET", "POST"]),
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
        # app mode
        self.member_id = secrets.token_hex(16)
        self.oauth: OAuthEmulator | None = None
        self.installed_app: InstalledApp | None = None
        self.event_bindings: dict[int, EventBinding] = {}
        self.sent_events: list[SentEvent] = []
        self.rest_denied: list[tuple[str, str]] = []
        """OAuth REST calls refused for their token: (method, error code); they are not in ``rest_calls``."""
        self._application_tokens: dict[str, str] = {}
        self._binding_ids = itertools.count(1)
        self._app_ids = itertools.count(1)
        self._old_hosts: set[str] = set()

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
        moved = self._moved(request)
        if moved is not None:
            return moved
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
        return await handler(params if isinstance(params, dict) else {}, None)

    async def _register(self, params: dict[str, Any], app_code: str | None) -> Response:
        """``app_code``: the calling app's code, None for a webhook (§5: stored on the engine)."""
        for key, suffix in (("name", "NAME"), ("code", "CODE"), ("category", "CATEGORY"), ("completions_url", "COMPLETIONS_URL")):
            if not params.get(key):
                return _rest_error(400, f"ENGINE_REGISTER_ERROR_{suffix}", f"Parameter {key} is required")
        code, category, url = str(params["code"]), str(params["category"]), str(params["completions_url"])
        if not ENGINE_CODE_RE.fullmatch(code):
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
            "app_code": app_code,
            "name": str(params["name"]),
            "code": code,
            "category": category,
            "completions_url": url,
            "settings": settings,
            "date_create": int(time.time()),
        }
        return _rest_result(engine_id)

    async def _list(self, params: dict[str, Any], app_code: str | None) -> Response:
        """An app sees only its own engines (the filter is forced); a webhook sees all and may filter by ``APP_CODE``."""
        wanted = {str(k).lower(): v for k, v in (params.get("filter") or {}).items()}
        if app_code is not None:
            wanted["app_code"] = app_code
        items = [dict(e) for e in self.engines.values() if all(str(e.get(k)) == str(v) for k, v in wanted.items())]
        limit = params.get("limit")
        return _rest_result(items[: int(limit)] if limit else items)

    async def _unregister(self, params: dict[str, Any], app_code: str | None) -> Response:
        """Deletes only the caller's own engine (a webhook's are those with ``app_code`` null); else ``false``."""
        code = str(params.get("code") or "")
        doomed = [i for i, e in self.engines.items() if e["code"].lower() == code.lower() and e["app_code"] == app_code]
        for engine_id in doomed:
            del self.engines[engine_id]
        return _rest_result(bool(doomed))

    # -- app mode: install, uninstall, events, the OAuth REST API -----------------------------
    @property
    def domain(self) -> str:
        """The portal's host:port, as ``auth[domain]`` names it."""
        return urlsplit(self.url).netloc

    @property
    def client_endpoint(self) -> str:
        return f"{self.url}/rest/"

    def attach(self, oauth: OAuthEmulator) -> None:
        """Validate OAuth REST tokens with this OAuth server (both run in this process)."""
        self.oauth = oauth

    def install(
        self,
        oauth: OAuthEmulator,
        handler_url: str,
        *,
        status: str | None = None,
        user_id: int = 1,
        send: bool = True,
        client_id: str | None = None,
        app_code: str | None = None,
    ) -> tuple[dict[str, Any], int | None]:
        """Install the app as a portal admin does; returns the ``ONAPPINSTALL`` fields (nested:
        ``payload["auth"]["member_id"]``) and the handler's HTTP status (None: not sent, or unreachable).

        ``status="L"`` installs a new local app (``client_id`` = ``local.…`` issued for this portal only,
        credentials in :attr:`installed_app`); ``client_id`` picks a registered app (a local one's status
        is ``L``); otherwise the Marketplace app ``oauth.client_id`` (status ``F``), whose engines carry
        ``app_code`` (default: the client id). The install URL becomes an ``ONAPPINSTALL`` handler, as
        the portal does for API-only apps."""
        assert self.url, "start the emulator's server and set .url first"
        self.attach(oauth)
        if client_id is None and status == "L":
            client = oauth.local_app(self.member_id)
        else:
            client = oauth.clients[client_id or oauth.client_id]
        code = client.client_id if client.portal is not None else (app_code or client.client_id)
        status = status or ("L" if client.portal is not None else "F")
        pair = oauth.issue(self.member_id, client_id=client.client_id, portal_url=self.url, status=status, user_id=user_id)
        application_token = self._application_tokens.setdefault(client.client_id, secrets.token_hex(16))
        self.installed_app = InstalledApp(next(self._app_ids), client.client_id, client.client_secret, code, status, application_token, handler_url, user_id)
        binding = self._bind("ONAPPINSTALL", handler_url, code)
        return self._send_install(binding, pair.access_token, pair.refresh_token, pair.expires, user_id, send)

    def reinstall(self, *, send: bool = True) -> tuple[dict[str, Any], int | None]:
        """The local app's "reinstall": ``ONAPPINSTALL`` again, same ``application_token``, new tokens."""
        app = self._app()
        assert self.oauth is not None
        pair = self.oauth.issue(self.member_id, client_id=app.client_id, portal_url=self.url, status=app.status, user_id=app.user_id)
        binding = self._bind("ONAPPINSTALL", app.handler_url, app.app_code)
        return self._send_install(binding, pair.access_token, pair.refresh_token, pair.expires, app.user_id, send)

    def uninstall(self, clean: bool = False) -> list[int | None]:
        """Uninstall as the portal does: the ai module deletes the app's engines, every token is revoked,
        the app's handlers are removed, and ``ONAPPUNINSTALL`` (no tokens) goes only to handlers bound
        for it with ``event.bind``. Returns each handler's HTTP status (None: unreachable)."""
        app = self._app()
        assert self.oauth is not None
        for engine_id in [i for i, e in self.engines.items() if e["app_code"] == app.app_code]:
            del self.engines[engine_id]
        mine = [b for b in self.event_bindings.values() if b.app_code == app.app_code]
        for binding in mine:
            del self.event_bindings[binding.id]
        self.oauth.revoke(self.member_id)
        app.installed = False
        statuses: list[int | None] = []
        for binding in mine:
            if binding.event == "ONAPPUNINSTALL" and binding.event_type == "online":
                fields = {
                    "event": "ONAPPUNINSTALL",
                    "event_handler_id": str(binding.id),
                    "data": {"LANGUAGE_ID": "en", "CLEAN": "1" if clean else "0"},
                    "ts": str(int(time.time())),
                    "auth": {
                        "domain": self.domain,
                        "server_endpoint": self.oauth.server_endpoint,
                        "client_endpoint": self.client_endpoint,
                        "member_id": self.member_id,
                        "application_token": app.application_token,
                    },
                }
                statuses.append(self._deliver(binding.handler, fields))
        return statuses

    def send_event(self, handler_url: str, fields: dict[str, Any]) -> httpx.Response:
        """POST any event form as the portal's queue server does (PHP bracket keys), e.g. a forged one."""
        return httpx.post(
            handler_url,
            content=urlencode(php_form(fields)),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=EVENT_TIMEOUT,
        )

    def app_auth(self, user_id: int = 1) -> dict[str, Any]:
        """The ``auth`` object the portal puts in completions requests for the app's engines: a token
        of the current user (a fresh pair, apart from the installer's), no ``application_token``."""
        app = self._app()
        assert self.oauth is not None
        pair = self.oauth.user_tokens(self.member_id, user_id)
        return {
            "access_token": pair.access_token,
            "expires": int(pair.expires),
            "expires_in": math.ceil(self.oauth.access_ttl),
            "scope": "ai_admin",
            "domain": self.domain,
            "server_endpoint": self.oauth.server_endpoint,
            "status": app.status,
            "client_endpoint": self.client_endpoint,
            "member_id": self.member_id,
            "refresh_token": pair.refresh_token,
            "user_id": user_id,
            "client_id": app.client_id,
        }

    def rename_to(self, new_url: str) -> None:
        """The portal was renamed: REST calls (webhook and OAuth) that reach it by an old host answer
        302 to the same path on ``new_url``; everything else (callbacks, files) keeps working. One
        emulator serves both names: serve :attr:`app` on a second server and pass its URL, e.g.
        ``portal.rename_to(LoopbackServer(portal.app).start().url)``. ``url``, ``domain`` and the
        OAuth server's ``client_endpoint`` switch to the new name."""
        new_url = new_url.rstrip("/")
        self._old_hosts.add(self.domain)
        self._old_hosts.discard(urlsplit(new_url).netloc)
        self.url = new_url
        if self.oauth is not None:
            self.oauth.moved(self.member_id, new_url)

    def _app(self) -> InstalledApp:
        if self.installed_app is None or not self.installed_app.installed:
            raise RuntimeError("no app is installed on this portal emulator: call install() first")
        return self.installed_app

    def _bind(self, event: str, handler: str, app_code: str, auth_type: int = 0, event_type: str = "online") -> EventBinding:
        for binding in self.event_bindings.values():
            if (binding.event, binding.handler, binding.app_code, binding.auth_type, binding.event_type) == (event, handler, app_code, auth_type, event_type):
                return binding
        binding = EventBinding(next(self._binding_ids), event, handler, app_code, auth_type, event_type)
        self.event_bindings[binding.id] = binding
        return binding

    def _send_install(
        self, binding: EventBinding, access_token: str, refresh_token: str, expires: float, user_id: int, send: bool
    ) -> tuple[dict[str, Any], int | None]:
        app = self._app()
        assert self.oauth is not None
        fields: dict[str, Any] = {
            "event": "ONAPPINSTALL",
            "event_handler_id": str(binding.id),
            "data": {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
            "ts": str(int(time.time())),
            "auth": {
                "access_token": access_token,
                "expires": str(int(expires)),
                "expires_in": str(math.ceil(self.oauth.access_ttl)),
                "scope": "ai_admin",
                "domain": self.domain,
                "server_endpoint": self.oauth.server_endpoint,
                "status": app.status,
                "client_endpoint": self.client_endpoint,
                "member_id": self.member_id,
                "user_id": str(user_id),
                "refresh_token": refresh_token,
                "application_token": app.application_token,
            },
        }
        if not send:
            return fields, None
        status = self._deliver(binding.handler, fields)
        for other in [b for b in self.event_bindings.values() if b.event == "ONAPPINSTALL" and b.app_code == app.app_code and b.id != binding.id]:
            self._deliver(other.handler, {**fields, "event_handler_id": str(other.id)})
        return fields, status

    def _deliver(self, url: str, fields: dict[str, Any]) -> int | None:
        try:
            status: int | None = self.send_event(url, fields).status_code
        except httpx.HTTPError:
            status = None
        self.sent_events.append(SentEvent(url, fields, status))
        return status

    def _moved(self, request: Request) -> Response | None:
        if request.headers.get("host", "") not in self._old_hosts:
            return None
        query = f"?{request.url.query}" if request.url.query else ""
        return Response(status_code=302, headers={"Location": f"{self.url}{request.url.path}{query}"})

    async def _app_rest(self, request: Request) -> Response:
        """``{client_endpoint}{method}`` with an OAuth access token (``auth`` in the body or the query)."""
        moved = self._moved(request)
        if moved is not None:
            return moved
        method = request.path_params["method"].removesuffix(".json")
        params = await _rest_params(request)
        token = params.get("auth") or request.query_params.get("auth") or ""
        state, pair = self.oauth.check(str(token)) if self.oauth is not None else ("invalid", None)
        app = self.installed_app
        if state == "expired":
            self.rest_denied.append((method, "expired_token"))
            return _rest_error(401, "expired_token", "The access token provided has expired.")
        if pair is None or state != "valid" or pair.member_id != self.member_id or app is None or not app.installed or pair.client_id != app.client_id:
            self.rest_denied.append((method, "NO_AUTH_FOUND"))
            return _rest_error(401, "NO_AUTH_FOUND", "Wrong authorization data")
        self.rest_calls.append((method, params))
        if self._rest_fail_next:
            status, code = self._rest_fail_next.popleft()
            return _rest_error(status, code, "scripted failure")
        if method in ("ai.engine.register", "ai.engine.list", "ai.engine.unregister"):
            engine_method = {"ai.engine.register": self._register, "ai.engine.list": self._list, "ai.engine.unregister": self._unregister}[method]
            return await engine_method(params, app.app_code)
        if method == "event.bind":
            return self._event_bind(params, app)
        if method == "event.unbind":
            return self._event_unbind(params, app)
        if method == "event.get":
            mine = [b for b in self.event_bindings.values() if b.app_code == app.app_code]
            return _rest_result(
                [{"event": b.event, "handler": b.handler, "auth_type": str(b.auth_type), "offline": int(b.event_type == "offline")} for b in mine]
            )
        if method == "app.info":
            return _rest_result(
                {
                    "ID": app.id,
                    "CODE": app.app_code,
                    "VERSION": 1,
                    "STATUS": app.status,
                    "INSTALLED": app.installed,
                    "PAYMENT_EXPIRED": "N",
                    "DAYS": None,
                    "LANGUAGE_ID": "en",
                }
            )
        return _rest_error(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")

    def _event_bind(self, params: dict[str, Any], app: InstalledApp) -> Response:
        event = str(params.get("event") or "").upper()
        if event not in KNOWN_EVENTS:
            return _rest_error(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
        handler = str(params.get("handler") or "")
        parts = urlsplit(handler)
        if handler and parts.scheme not in ("http", "https"):
            return _rest_error(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported event handler protocol")
        if not parts.hostname:
            return _rest_error(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
        auth_type = int(params.get("auth_type") or 0)
        event_type = "offline" if str(params.get("event_type") or "").lower() == "offline" else "online"
        key = (event, handler, app.app_code, auth_type, event_type)
        if any((b.event, b.handler, b.app_code, b.auth_type, b.event_type) == key for b in self.event_bindings.values()):
            return _rest_error(400, "ERROR_CORE", "Unable to set event handler: Handler already binded")
        self._bind(event, handler, app.app_code, auth_type, event_type)
        return _rest_result(True)

    def _event_unbind(self, params: dict[str, Any], app: InstalledApp) -> Response:
        event = str(params.get("event") or "").upper()
        handler = str(params.get("handler") or "")
        auth_type = int(params.get("auth_type") or 0)
        doomed = [
            b.id
            for b in self.event_bindings.values()
            if b.app_code == app.app_code and b.event == event and (not handler or b.handler == handler) and b.auth_type == auth_type
        ]
        for binding_id in doomed:
            del self.event_bindings[binding_id]
        return _rest_result({"count": len(doomed)})

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


async def _rest_params(request: Request) -> dict[str, Any]:
    """A REST call's parameters: a JSON object body, or a form body, over the query string."""
    params: dict[str, Any] = dict(request.query_params)
    raw = await request.body()
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/x-www-form-urlencoded":
        params.update((await request.form()).items())
    elif raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            params.update(body)
    return params


def php_form(fields: Mapping[Any, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested fields into PHP bracket keys (``auth[member_id]``), as ``http_build_query`` does."""
    pairs: list[tuple[str, str]] = []
    for key, value in fields.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, dict):
            pairs.extend(php_form(value, name))
        elif isinstance(value, (list, tuple)):
            pairs.extend(php_form(dict(enumerate(value)), name))
        elif isinstance(value, bool):
            pairs.append((name, "1" if value else "0"))
        elif value is not None:
            pairs.append((name, str(value)))
    return pairs


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
