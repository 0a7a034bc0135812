"""A reverse proxy that serves the gateway under a path prefix, as nginx ``location /gw/ { proxy_pass http://gw/; }`` does.

For tests of everything that must work behind such a proxy (the admin dashboard, completions URLs):
``/PREFIX/rest`` is forwarded to ``target + /rest`` with the method, query, headers (cookies included)
and body unchanged; the answer's status, headers (every ``Set-Cookie``, ``Location`` of a redirect) and
bytes come back unchanged too: no redirect is followed and nothing is rewritten, so a page that links
outside the prefix gets this proxy's 404, as it would in production. Served with
:class:`gateway.loopback.LoopbackServer`; :attr:`PrefixProxy.requests` records what went through.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

# Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection and are not forwarded; Host is the target's.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"})
OWN_HEADERS = frozenset({"date", "server"})
"""Set by the server this proxy runs in (uvicorn): the target's would be sent twice."""
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class Forwarded:
    """One request the proxy saw: the path asked for (prefix included) and the status answered."""

    method: str
    path: str
    status: int


class PrefixProxy:
    """``PrefixProxy("/gw")``; set :attr:`target` (``http://127.0.0.1:PORT``) before the first request.

    The target may be set after the proxy started: a gateway behind it needs the proxy's port
    in its ``public_url`` before it starts."""

    def __init__(self, prefix: str, target: str = "") -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r}: write it as /NAME (a leading slash, no trailing one)")
        self.prefix = prefix
        self.target = target
        self.requests: list[Forwarded] = []
        self._client: httpx.AsyncClient | None = None
        self.app = Starlette(
            routes=[Route(prefix + "/{path:path}", self._forward, methods=METHODS), Route("/{path:path}", self._outside, methods=METHODS)],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # No environment proxies, no redirects followed, no timeout shorter than a test's.
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            self._client = client
            yield
            self._client = None

    async def _forward(self, request: Request) -> Response:
        if self._client is None or not self.target:
            return PlainTextResponse("the proxy has no target yet: set PrefixProxy.target", 502)
        url = self.target + "/" + request.path_params["path"]
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers += [("x-forwarded-for", request.client.host if request.client else ""), ("x-forwarded-proto", request.url.scheme)]
        upstream = await self._client.send(self._client.build_request(request.method, url, headers=headers, content=await request.body()), stream=True)
        try:
            body = b"".join([chunk async for chunk in upstream.aiter_raw()])  # still encoded: Content-Encoding and Content-Length stay true
        finally:
            await upstream.aclose()
        response = Response(body, upstream.status_code)
        response.raw_headers = [(k, v) for k, v in upstream.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP | OWN_HEADERS]
        if "content-length" not in upstream.headers and request.method != "HEAD":  # it came chunked: the whole body is here now
            response.raw_headers.append((b"content-length", str(len(body)).encode()))
        self.requests.append(Forwarded(request.method, request.url.path, upstream.status_code))
        return response

    async def _outside(self, request: Request) -> Response:
        self.requests.append(Forwarded(request.method, request.url.path, 404))
        return PlainTextResponse(f"not found: this proxy serves only {self.prefix}/...", 404)

    def outside(self) -> list[Forwarded]:
        """Requests that missed the prefix: a page linked or redirected to a URL without it."""
        return [r for r in self.requests if not r.path.startswith(self.prefix + "/")]
