"""The Starlette application: the completions endpoint, health, metrics and the plugin listing.

The accept path is: authenticate, read the body within the limit, parse, check the
callback URLs, persist, answer 202. No provider code and no network call runs on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.bitrix.protocol import ProtocolError, parse_completion_request
from gateway.config import Config
from gateway.engines import Engine
from gateway.jobs.model import Job, new_job_id
from gateway.jobs.queue import QueueItemError, QueueStoreError
from gateway.netguard import URLRefused
from gateway.openai_api.routes import OpenAIEndpoints
from gateway.plugins import call_registration_hook, list_plugins
from gateway.runtime import Runtime
from gateway.tenants.events import MAX_EVENT_BYTES
from gateway.tenants.model import Tenant, TenantStatus

log = logging.getLogger("gateway.accept")
ACCEPTED = {"result": "OK"}


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(413, "body_too_large", f"the request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProtocolError(413, "body_too_large", f"the request body exceeds {limit} bytes")
    return bytes(body)


def _engine_path(request: Request) -> str:
    """The request path with the token masked: the log must not learn a valid token."""
    code = str(request.path_params.get("code", "?"))
    if not code.isprintable() or len(code) > 64:  # percent-decoded from the URL: no forged log lines
        code = repr(code[:64])
    return f"/engines/{code}/…/completions"


def check_tenant_request(tenant: Tenant, data: Any, urls: Any) -> None:
    """A request on an installed portal's URL: its ``auth`` (when the portal sends one) must name
    that portal, and its callbacks and files must be on that portal's domain."""
    auth = data.get("auth") if isinstance(data, dict) else None
    if isinstance(auth, dict) and str(auth.get("member_id") or "") != tenant.member_id:
        raise ProtocolError(403, "wrong_portal", "the request's auth names another portal than this URL's")
    for name, url in urls:
        if netloc_of(str(url)) != tenant.domain:
            code_name = "file_not_allowed" if name == "prompt.file" else "callback_not_allowed"
            raise ProtocolError(422, code_name, f"{name}: not on this portal's domain")


def netloc_of(url: str) -> str:
    """``host[:port]`` of a URL, lower-case, without the scheme's default port (as a tenant's domain is kept)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port
    return host if port is None or port == {"http": 80, "https": 443}.get(parts.scheme) else f"{host}:{port}"


async def app_events(request: Request) -> Response:
    """Install and uninstall events from portals (app mode); 404 when app mode is off."""
    rt: Runtime = request.app.state.runtime
    if rt.tenants is None:
        return JSONResponse({"error": "not_found", "error_description": "app mode is off (no `app:` in the configuration)"}, 404)
    try:
        body = await read_limited_body(request, MAX_EVENT_BYTES)
    except ProtocolError as exc:
        return JSONResponse({"error": exc.code, "error_description": exc.message}, exc.status)
    except ClientDisconnect:
        return Response(status_code=400)
    try:
        answer = await rt.tenants.handle_event(body)
    except QueueStoreError as exc:
        log.error("app event could not be stored: %s", exc)
        return JSONResponse({"error": "unavailable", "error_description": "the gateway cannot store the event right now"}, 503)
    except Exception:  # a bug: logged with its traceback here, a plain answer there
        log.exception("internal error while handling an app event")
        return JSONResponse({"error": "internal_error", "error_description": "the gateway failed to handle the event"}, 500)
    return JSONResponse(answer.body, answer.status)


async def admin_off(request: Request) -> Response:
    return JSONResponse({"error": "not_found", "error_description": "the admin dashboard is off (no `admin:` in the configuration)"}, 404)


class CompletionsEndpoint:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._metrics: dict[tuple[str, str], tuple[Any, Any]] = {}

    def _engine_metrics(self, code: str, category: str) -> tuple[Any, Any]:
        """(accepted counter, accept latency histogram) for an engine; looked up once, not per request."""
        children = self._metrics.get((code, category))
        if children is None:
            m = self.runtime.metrics
            children = self._metrics[(code, category)] = (m.accepted.labels(code, category), m.accept_latency.labels(code, category))
        return children

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            return await self.accept(request, started)
        except ProtocolError as exc:
            self.runtime.metrics.rejected.labels(exc.code).inc()
            log.info("rejected %s %s: %s %s", request.method, _engine_path(request), exc.status, exc.message)
            return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status)
        except ClientDisconnect:  # the client went away (or its body timed out): nobody to answer
            log.info("client disconnected while sending a request for %s; nothing was stored", _engine_path(request))
            self.runtime.metrics.rejected.labels("client_disconnected").inc()
            return Response(status_code=400)
        except Exception:  # a bug, not the client's fault: a JSON answer the portal shows as a failure, no traceback to the client
            log.exception("internal error while accepting a request for %s", _engine_path(request))
            self.runtime.metrics.rejected.labels("internal_error").inc()
            return JSONResponse({"error": {"code": "internal_error", "message": "the gateway failed to accept the request; it was not stored"}}, 500)

    async def _engine(self, request: Request) -> tuple[Engine, Tenant | None]:
        """The engine a completions URL names, and the installed portal (app mode) whose URL it is.
        One answer for an unknown code, a wrong token and an unknown tenant: no probing."""
        rt = self.runtime
        code = request.path_params["code"]
        unknown = ProtocolError(
            404, "unknown_engine", "no engine at this URL (unknown engine code or wrong token); copy the completions URL from `gateway engines list`"
        )
        if "tenant" not in request.path_params:
            engine = rt.engines.authenticate(code, request.path_params["token"])
            if engine is None:
                raise unknown
            return engine, None
        if rt.tenants is None or rt.config.app is None:
            raise unknown
        tenant = await rt.tenants.tenant_for(request.path_params["tenant"], request.path_params["secret"])
        config = rt.config.engine(code)
        if tenant is None or config is None or code not in rt.config.app.engines:
            raise unknown
        if tenant.status is TenantStatus.DISABLED:
            raise ProtocolError(403, "tenant_disabled", "this portal's use of the gateway is turned off by its operator")
        return Engine(config, tenant.url_secret, rt.config.public_url + tenant.completions_path(code)), tenant

    async def accept(self, request: Request, started: float) -> Response:
        rt = self.runtime
        engine, tenant = await self._engine(request)
        code = engine.code
        if request.method in ("GET", "HEAD"):  # the portal's registration check: exactly 200
            return JSONResponse({"result": "OK", "engine": code})

        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise ProtocolError(415, "unsupported_media_type", f"expected Content-Type application/json, got {content_type or 'none'}")
        body = await read_limited_body(request, rt.config.max_body_bytes)
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ProtocolError(400, "invalid_json", f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from None
        except UnicodeDecodeError:
            raise ProtocolError(400, "invalid_json", "the body is not valid UTF-8 text") from None
        except RecursionError:
            raise ProtocolError(400, "invalid_json", "the body's JSON is nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise ProtocolError(400, "invalid_json", f"the body's JSON cannot be read: {str(exc)[:120]}") from None
        now = time.time()
        parsed = parse_completion_request(
            data,
            engine=code,
            category=engine.config.category,
            default_ttl=rt.config.default_ttl,
            job_id=new_job_id(),
            now=now,
            context=engine.config.context,
        )
        if tenant is not None:
            check_tenant_request(tenant, data, parsed.outbound_urls)
        for name, url in parsed.outbound_urls:
            try:
                rt.policy.check_url(str(url))
            except URLRefused as exc:
                code_name = "file_not_allowed" if name == "prompt.file" else "callback_not_allowed"
                raise ProtocolError(422, code_name, f"{name}: {exc}") from None

        task = parsed.task
        if tenant is not None:
            task.tenant = tenant.key
        job = Job(task, parsed.callback_url, parsed.error_callback_url, tenant=tenant.member_id if tenant is not None else "")
        accepted_counter, latency_histogram = self._engine_metrics(code, task.category.value)
        try:
            stored, created = await rt.submit(job, parsed.idempotency_key)
        except QueueItemError as exc:  # this request's values, not the queue: retrying will not help
            log.warning("could not store a request for engine %s: %s", code, exc)
            raise ProtocolError(422, "invalid_field", f"the request cannot be stored: {exc}") from None
        except QueueStoreError as exc:
            log.error("could not persist a request for engine %s: %s", code, exc)
            raise ProtocolError(503, "queue_unavailable", "the gateway cannot store the request right now") from None
        if created:
            accepted_counter.inc()
            log.debug("accepted job %s engine=%s category=%s ttl=%s", stored.id, code, task.category.value, task.ttl)
        else:
            rt.metrics.duplicates.labels(code).inc()
            log.info("repeated request for job %s engine=%s: answered 202, no new job", stored.id, code)
        latency_histogram.observe(time.perf_counter() - started)
        return JSONResponse(ACCEPTED, 202)


def create_app(config: Config, runtime: Runtime | None = None) -> Starlette:
    """The app serving ``runtime`` (one built from ``config`` if none is given), prepared: its engines
    known and models loaded (:meth:`Runtime.prepare`, which ``gateway serve`` has run already)."""
    rt = runtime or Runtime(config)
    rt.prepare()

    async def health(request: Request) -> Response:
        """200 ``{"status": "ok", "queue_depth": N}``; 503 while the queue cannot answer or a
        background loop is down (waiting to be restarted), naming the loops."""
        down = rt.loops.down()
        if down:
            return JSONResponse({"status": "error", "error": f"background loop(s) down: {', '.join(sorted(down))}", "loops_down": down}, 503)
        try:
            depth = await asyncio.wait_for(rt.queue.depth(), 5.0)  # a stuck queue is an answer too: 503, not a hang
        except Exception as exc:
            return JSONResponse({"status": "error", "error": f"queue: {type(exc).__name__}"}, 503)
        return JSONResponse({"status": "ok", "queue_depth": depth})

    async def metrics(request: Request) -> Response:
        with contextlib.suppress(Exception):
            rt.metrics.queue_depth.set(await rt.queue.depth())
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def plugins(request: Request) -> Response:
        return JSONResponse(list_plugins(rt.pm))

    async def hosted_file(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            stored = await rt.files.read(name)
        except QueueStoreError:  # the shared database is down: the file exists, most likely
            return JSONResponse({"error": {"code": "storage_unavailable", "message": "the file cannot be read right now"}}, 503, headers={"Retry-After": "5"})
        if stored is None:
            return JSONResponse({"error": {"code": "not_found", "message": "no such file"}}, 404)
        # Files never change once written and their names are unique: the name is a strong ETag.
        headers = {
            "ETag": f'"{name}"',
            "Cache-Control": f"public, max-age={int(rt.config.files.retention_days * 86400)}, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("if-none-match") in (headers["ETag"], "*"):
            return Response(status_code=304, headers=headers)
        if stored.path is not None:
            return FileResponse(stored.path, media_type=stored.content_type, headers=headers)
        return Response(stored.data, media_type=stored.content_type, headers=headers)

    completions = CompletionsEndpoint(rt)
    routes: list[BaseRoute] = [
        Route("/engines/{code}/{token}/completions", completions.handle, methods=["GET", "POST"]),
        Route("/app/{tenant}/{secret}/engines/{code}/completions", completions.handle, methods=["GET", "POST"]),
        Route("/app/events", app_events, methods=["POST"]),
        Route("/-/health", health),
        Route("/metrics", metrics),
        Route("/-/plugins.json", plugins),
        Route("/files/{name}", hosted_file),
        *OpenAIEndpoints(rt).routes(),  # /v1: the OpenAI-compatible API (404 in OpenAI's shape when no api_keys are configured)
    ]
    if config.admin is not None:
        from gateway.admin.site import AdminSite  # Jinja2 and the pages load only when the dashboard is on

        routes += AdminSite(rt, config.admin).routes()
    else:
        routes.append(Route("/admin{rest:path}", admin_off))
    call_registration_hook(
        rt.pm.hook.register_routes,
        lambda plugin: {"routes": routes},
        lambda: len(routes),
        "append Starlette routes (starlette.routing.Route) to the `routes` list the hook is given (an async hook is awaited)",
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await rt.start(app)
        try:
            yield
        finally:
            await rt.stop(app)

    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # a redirect would turn the portal's POST into a GET
    app.state.runtime = rt
    return app
