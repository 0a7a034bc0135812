"""The dashboard's frame: its routes under ``/admin``, login and logout, the session and CSRF checks
every page goes through, and rendering with the headers every page carries.

Links are built from ``public_url``'s path, so the dashboard works behind a reverse proxy that
serves the gateway under a prefix (``https://example.com/ai`` → the proxy strips ``/ai``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import jinja2
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.admin.passwords import PasswordBook
from gateway.admin.sessions import Session, SessionSigner, session_key
from gateway.admin.throttle import LoginThrottle
from gateway.config import AdminSettings
from gateway.jobs.queue import QueueStoreError
from gateway.runtime import Runtime

log = logging.getLogger("gateway.admin")
SESSION_COOKIE = "gw_admin"
LOGIN_COOKIE = "gw_admin_login"
FLASH_COOKIE = "gw_admin_flash"
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 20
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Chromium send `Origin: null` on form POSTs
    "Cache-Control": "no-store",
}
NAV = (
    ("overview", "Overview", "/"),
    ("jobs", "Jobs", "/jobs"),
    ("engines", "Engines", "/engines"),
    ("portals", "Portals", "/portals"),
    ("usage", "Usage", "/usage"),
    ("plugins", "Plugins", "/plugins"),
)

Handler = Callable[[Request, Session], Awaitable[Response]]


class FormTooLarge(Exception):
    """A form larger than any the dashboard sends."""


def safe_next(target: str) -> str:
    """Where to go after login: a path inside the dashboard, never another site (``//evil``, ``/\\evil``, a scheme)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or len(target) > 500 or not target.isprintable():
        return "/"
    return target


def origin_of(scheme: str, netloc: str) -> str:
    """``scheme://host[:port]`` as browsers send it in ``Origin``: host lower-case, the scheme's default port left out."""
    scheme = scheme.lower()
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a Host header that is no host: matches no Origin a browser sends
        return f"{scheme}://{netloc}"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port and port != {"http": 80, "https": 443}.get(scheme) else "")


def client_address(request: Request) -> str:
    """The client the login throttle counts: an IPv6 address by its /64 (one host commonly holds a whole /64)."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(ipaddress.ip_network(f"{address}/64", strict=False)) if address.version == 6 else host


class AdminSite:
    """Everything under ``/admin``: built by the app when ``admin:`` is configured."""

    def __init__(self, runtime: Runtime, settings: AdminSettings) -> None:
        from gateway.admin.pages import Pages  # the pages use the site's helpers; the site routes to them

        self.rt = runtime
        self.settings = settings
        self.base = urlsplit(runtime.config.public_url).path.rstrip("/") + "/admin"
        self.secure = runtime.config.public_url.startswith("https://")
        key = session_key(settings, runtime.config.data_dir)
        self.passwords = PasswordBook(settings.users, key)
        self.sessions = SessionSigner(key, settings.session_hours, self.passwords.fingerprint)
        self._checking = asyncio.Semaphore(2)  # password checks (scrypt) at once, in threads: a login flood cannot take every core
        self.throttle = LoginThrottle()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.admin", "templates"), autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
        )
        self.pages = Pages(self)

    # -- routes -----------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        p = self.pages
        guarded: list[tuple[str, Handler, list[str]]] = [
            ("/", p.overview, ["GET"]),
            ("/overview/live", p.overview_live, ["GET"]),
            ("/jobs", p.jobs, ["GET"]),
            ("/jobs/{job_id}", p.job, ["GET"]),
            ("/jobs/{job_id}/{action}", p.job_action, ["POST"]),
            ("/engines", p.engines, ["GET"]),
            ("/engines/{code}/url", p.engine_url, ["POST"]),
            ("/engines/{code}/{action}", p.engine_action, ["POST"]),
            ("/portals", p.portals, ["GET"]),
            ("/portals/{tenant}/{action}", p.portal_action, ["POST"]),
            ("/usage", p.usage, ["GET"]),
            ("/usage.csv", p.usage_csv, ["GET"]),
            ("/plugins", p.plugins, ["GET"]),
            ("/logout", self.logout, ["POST"]),
        ]
        static = Path(__file__).with_name("static")
        return [
            Route("/admin", lambda request: RedirectResponse(self.base + "/", 308)),
            Route("/admin/login", self.login, methods=["GET", "POST"]),
            Mount("/admin/static", StaticFiles(directory=static), name="admin-static"),
            *(Route("/admin" + path, self._guard(handler), methods=methods) for path, handler, methods in guarded),
        ]

    # -- rendering --------------------------------------------------------------------------
    def render(
        self, request: Request, session: Session | None, template: str, status: int = 200, *, headers: dict[str, str] | None = None, **context: Any
    ) -> Response:
        flash = self.sessions.unseal(request.cookies.get(FLASH_COOKIE))
        text = self.templates.get_template(template).render(
            base=self.base,
            user=session.user if session else None,
            csrf=self.sessions.csrf_token(session.id) if session else "",
            nav=NAV,
            active=context.pop("active", ""),
            flash=flash[1:] if flash else None,
            flash_kind=("error" if flash.startswith("!") else "ok") if flash else None,
            **context,
        )
        response = HTMLResponse(text, status, headers={**SECURITY_HEADERS, **(headers or {})})
        if flash:
            response.delete_cookie(FLASH_COOKIE, path=self.base)
        return response

    def redirect(self, path: str, *, flash: str | None = None, error: bool = False) -> Response:
        """303 to an admin path (Post/Redirect/Get), with a signed one-time message."""
        response = RedirectResponse(self.base + path, 303, headers=SECURITY_HEADERS)
        if flash:
            response.set_cookie(
                FLASH_COOKIE,
                self.sessions.seal(("!" if error else " ") + flash),
                max_age=60,
                path=self.base,
                httponly=True,
                secure=self.secure,
                samesite="strict",
            )
        return response

    def error_page(self, request: Request, session: Session | None, status: int, title: str, message: str) -> Response:
        return self.render(request, session, "error.html", status, title=title, message=message)

    # -- the guard every page passes --------------------------------------------------------
    def _guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self.sessions.read(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if request.method != "GET":
                    return self.error_page(request, None, 401, "Logged out", "Your session has ended. Log in again, then repeat the action.")
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"{self.base}/login?next={quote(self._local(target))}", 303, headers=SECURITY_HEADERS)
            try:
                if request.method == "POST":
                    refused = await self._refuse_forgery(request, session)
                    if refused is not None:
                        return refused
                return await handler(request, session)
            except QueueStoreError as exc:
                log.warning("admin %s: the store cannot answer: %s", request.url.path, exc)
                return self.error_page(
                    request, session, 503, "Store unavailable", "The job store cannot answer right now. This page works again once it is back."
                )
            except (ClientDisconnect, FormTooLarge):
                return self.error_page(request, session, 400, "Bad request", "The request was cut off or too large.")
            except Exception:  # a bug: one line in the log with its traceback, a plain page to the user
                log.exception("admin: internal error on %s", request.url.path)
                return self.error_page(request, session, 500, "Internal error", "The dashboard failed to build this page; the gateway's log has the details.")

        return endpoint

    def _local(self, path: str) -> str:
        """The path inside the dashboard (what ``next`` keeps), never another site."""
        if path.startswith("/admin"):
            return path[len("/admin") :] or "/"
        return "/"

    async def _refuse_forgery(self, request: Request, session: Session) -> Response | None:
        """A POST must come from a dashboard page: the CSRF token (form field or header) and, when the browser
        sends one, an Origin equal to this site's."""
        origin = request.headers.get("origin")
        if origin is not None and origin not in self._origins(request):
            return self.error_page(request, session, 403, "Refused", "This action came from another site (Origin mismatch); CSRF protection refused it.")
        token = request.headers.get("x-csrf-token")
        if token is None:
            form = await self.form(request)
            token = form.get("csrf")
        if not self.sessions.check_csrf(session.id, token):
            return self.error_page(request, session, 403, "Refused", "The form's CSRF token is missing or wrong. Reload the page and try again.")
        return None

    def _origins(self, request: Request) -> set[str]:
        """Where this site's pages are: the public URL's origin (behind a proxy) and the host the browser reached,
        spelled as a browser spells an Origin (lower-case host, no default port)."""
        public = urlsplit(self.rt.config.public_url)
        return {origin_of(public.scheme, public.netloc), origin_of(request.url.scheme, request.headers.get("host", ""))}

    async def form(self, request: Request) -> dict[str, str]:
        """The POSTed form (url-encoded, bounded; read once and kept on the request)."""
        cached = request.scope.get("gateway.admin.form")
        if cached is not None:
            return dict(cached)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise FormTooLarge
        try:
            fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)) if body else {}
        except ValueError:  # more fields than any dashboard form has
            raise FormTooLarge from None
        request.scope["gateway.admin.form"] = fields
        return dict(fields)

    # -- login and logout -------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        fresh = not (16 <= len(nonce) <= 64 and nonce.isalnum())
        if fresh:
            nonce = secrets.token_hex(16)
        next_path = safe_next(request.query_params.get("next", "/"))
        if request.method == "GET":
            return self._login_form(request, nonce, fresh, next_path)
        try:
            form = await self.form(request)
        except (ClientDisconnect, FormTooLarge):
            return self._login_form(request, nonce, fresh, next_path, status=400, error="The form was cut off or too large.")
        if fresh or not self.sessions.check_csrf("login:" + nonce, form.get("csrf")):
            return self._login_form(request, nonce, fresh, next_path, status=403, error="The login form expired (CSRF check). Try again.")
        user, password = form.get("username", "")[:64], form.get("password", "")[:1024]
        client = client_address(request)
        wait = self.throttle.retry_after(client, user)
        if wait > 0:
            seconds = math.ceil(wait)
            log.warning("admin: login refused for %r from %s: too many failures", user, client)
            return self._login_form(
                request, nonce, fresh, next_path, status=429, error=f"Too many failed logins. Try again in {seconds} s.", headers={"Retry-After": str(seconds)}
            )
        self.throttle.failed(client, user)  # counted before the check: parallel guesses cannot all slip under the limit
        async with self._checking:
            matched = await asyncio.to_thread(self.passwords.check, user, password)
        if not matched:
            log.warning("admin: failed login for %r from %s", user, client)
            return self._login_form(request, nonce, fresh, next_path, status=401, error="Wrong user name or password.")
        self.throttle.succeeded(client, user)
        cookie, _ = self.sessions.issue(user)
        log.info("admin: %s logged in from %s", user, client)
        response = RedirectResponse(self.base + next_path, 303, headers=SECURITY_HEADERS)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=int(self.sessions.lifetime), path=self.base, httponly=True, secure=self.secure, samesite="strict")
        response.delete_cookie(LOGIN_COOKIE, path=self.base + "/login")
        return response

    def _login_form(
        self, request: Request, nonce: str, fresh: bool, next_path: str, *, status: int = 200, error: str = "", headers: dict[str, str] | None = None
    ) -> Response:
        response = self.render(
            request, None, "login.html", status, headers=headers, csrf_login=self.sessions.csrf_token("login:" + nonce), next=next_path, error=error
        )
        if fresh:
            response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=self.base + "/login", httponly=True, secure=self.secure, samesite="strict")
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        self.sessions.revoke(session)
        log.info("admin: %s logged out", session.user)
        response = RedirectResponse(self.base + "/login", 303, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path=self.base)
        return response
