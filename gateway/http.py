"""Outbound HTTP for the gateway and its plugins: httpx as the API, aiohttp underneath.

:func:`transport` returns an httpx transport (the documented ``AsyncBaseTransport`` extension
point) that sends each request with an aiohttp ``ClientSession``: httpx keeps the client API,
cookies, redirects, auth, timeouts and response decoding; aiohttp does the connections. httpcore's
pool rescans every connection for every queued request (O(requests x connections)) and sends
headers and body in separate writes: at 50 requests in flight it cost ~6x the CPU per request
(docs/performance.md, docs/decisions.md).

The outbound policy (:class:`~gateway.netguard.OutboundPolicy`) is applied where the connection
is made, so the address checked is the address connected to:

- the host name against ``allowed_portals``, before each request;
- a name: :class:`PolicyResolver` resolves it and refuses any address the policy refuses
  (aiohttp connects only to the addresses the resolver returned; no DNS cache, so every new
  connection resolves again: a name re-pointed after acceptance is caught);
- a literal IP host (aiohttp connects to it without asking the resolver): checked before the request;
- and every socket aiohttp opens is checked once more in its socket factory, whatever the path.

A refusal is raised as :class:`~gateway.netguard.URLRefused`; aiohttp's errors become the httpx
errors httpcore's would have been (:func:`httpx_error_from_aiohttp`). HTTP/2 and connect
``retries`` have no aiohttp counterpart: with either, :func:`transport` builds the httpcore
transport of earlier versions (:class:`Transport` on :class:`AsyncioBackend`), which checks the
policy in its backend's ``connect_tcp``.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import aiohttp
import httpcore
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.netguard import OutboundPolicy, URLRefused

SocketOption = tuple[int, int, Any]
ClientCertificate = str | tuple[str, str] | tuple[str, str, str]  # a file, or (cert file, key file[, password]): httpx's ``cert``
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own default
READ_LIMIT = 2**16


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no data within {timeout} s") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout(f"could not send within {timeout} s") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"TLS handshake took longer than {timeout} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked of idle pooled connections: true once the server has closed its side.
            return self._reader.at_eof() or self._writer.transport.is_closing()
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: OutboundPolicy | None = None) -> None:
        self.policy = policy

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.policy is not None and not self.policy.host_allowed(host):
            raise URLRefused(f"host {host} is not in security.allowed_portals")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                if self.policy is not None:
                    for info in infos:
                        self.policy.check_address(host, str(info[4][0]))
                return await self._connect_first(infos, local_address, socket_options or ())
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} took longer than {timeout} s") from None
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from exc
        except UnicodeError:  # the resolver's IDNA encoding: an empty label, or one over 63 characters
            raise httpcore.ConnectError(f"cannot resolve {host}: not a valid host name") from None

    @staticmethod
    async def _connect_first(infos: list[Any], local_address: str | None, options: Iterable[SocketOption]) -> AsyncioStream:
        """Try each resolved address in turn; the first that accepts the connection wins."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                for option in options:
                    sock.setsockopt(*option)
                if local_address:
                    sock.bind((local_address, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                errors.append(f"{address[0]}: {exc.strerror or exc}")
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
            return AsyncioStream(reader, writer)
        raise httpcore.ConnectError("; ".join(errors) or "no address to connect to")

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported by the gateway's HTTP transport")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# httpcore's errors and the httpx errors they become: the table httpx's own transport uses.
HTTPCORE_TO_HTTPX: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}


def httpx_error(exc: Exception) -> httpx.TransportError | None:
    """The httpx error an httpcore error becomes, the most specific that fits (``ReadTimeout``,
    not ``TimeoutException``); None for any other exception (e.g. :class:`URLRefused`), which is raised as it is."""
    for kind in type(exc).__mro__:
        mapped = HTTPCORE_TO_HTTPX.get(kind)
        if mapped is not None:
            return mapped(str(exc))
    return None


class ResponseStream(httpx.AsyncByteStream):
    """A response body read from the pool, its httpcore errors raised as httpx ones."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._body:
                yield part
        except Exception as exc:
            mapped = httpx_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def aclose(self) -> None:
        close = getattr(self._body, "aclose", None)
        if close is not None:
            await close()


class Transport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore connection pool on :class:`AsyncioBackend`."""

    def __init__(self, pool: httpcore.AsyncConnectionPool) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("the gateway's HTTP transport serves httpx.AsyncClient only (the request body is not an async stream)")
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self.pool.handle_async_request(core_request)
        except Exception as exc:
            mapped = httpx_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        if not isinstance(response.stream, AsyncIterable):  # httpcore's async pool always streams asynchronously
            raise TypeError("httpcore returned a synchronous response body to an async pool")
        return httpx.Response(status_code=response.status, headers=response.headers, stream=ResponseStream(response.stream), extensions=response.extensions)

    async def aclose(self) -> None:
        await self.pool.aclose()


# -- the aiohttp transport -----------------------------------------------------------------------

_CONNECT_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar("gateway_http_connect_timeout", default=None)
"""The request's connect timeout, for the resolver: aiohttp resolves in the requesting task but
bounds only the TCP and TLS part by ``sock_connect`` (httpcore's connect timeout also covered the lookup)."""

SMALL_BODY = 2**16
"""A request body up to this size goes to aiohttp as bytes, written with the headers in one call
that never waits (aiohttp drains only above 64 KiB); a larger or streamed one is handed over in
pieces, each within the write timeout."""

UNCHANGED_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
"""Headers aiohttp would add when httpx sent none: the request goes out as httpx built it."""


def _looks_like_ip(host: str) -> bool:
    """aiohttp's own test for "connect to the host as an address, skip the resolver" (``helpers.is_ip_address``)."""
    return ":" in host or host.replace(".", "").isdigit()


class PolicyResolver(AbstractResolver):
    """Resolves names itself and refuses every address the policy refuses: aiohttp connects only
    to the addresses returned, so the address checked is the address connected to."""

    def __init__(self, policy: OutboundPolicy | None) -> None:
        self.policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        timeout = _CONNECT_TIMEOUT.get()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took longer than {timeout} s") from None
        except socket.gaierror as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc.strerror}") from exc
        except UnicodeError:  # the resolver's IDNA encoding: an empty label, or one over 63 characters
            raise httpx.ConnectError(f"cannot resolve {host}: not a valid host name") from None
        results: list[ResolveResult] = []
        for info_family, _, proto, _, address in infos:
            if self.policy is not None:
                self.policy.check_address(host, str(address[0]))
            if info_family == socket.AF_INET6 and len(address) < 3:
                continue  # an IPv6 answer on a Python built without IPv6
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(address[0]),
                    port=int(address[1]),
                    family=info_family,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise httpx.ConnectError(f"cannot resolve {host}: no address to connect to")
        return results

    async def close(self) -> None:
        pass


def httpx_error_from_aiohttp(exc: BaseException, url: httpx.URL, timeouts: dict[str, float | None] | None = None) -> Exception | None:
    """The httpx error an aiohttp error becomes: the one httpcore raised in the same situation
    (a refused connection is ``ConnectError``, a server gone after the request went out
    ``RemoteProtocolError``, a stalled read ``ReadTimeout``), so callers classify failures as
    before (the deliverer's ``SENT_THEN_LOST``, a download's 502 or 504). None: raise it as it is
    (:class:`URLRefused`, httpx's own errors, anything else)."""
    if isinstance(exc, URLRefused | httpx.HTTPError):
        return None
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(f"connecting to {url.host}:{url.port or ''} took longer than {(timeouts or {}).get('connect')} s")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(f"no data within {(timeouts or {}).get('read')} s")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.TimeoutException(str(exc) or "timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, TLS handshake or certificate
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("Server disconnected without sending a response.")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"peer closed connection without sending complete message body ({exc})")
    if isinstance(exc, aiohttp.ClientResponseError):  # an answer that is not valid HTTP/1.1
        return httpx.RemoteProtocolError(str(exc))
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(str(exc))
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientError):  # reset, broken pipe, closed while sending
        return httpx.ReadError(str(exc) or type(exc).__name__)
    if isinstance(exc, ValueError):  # a header aiohttp will not send (a line break in a value): h11 refused it too
        return httpx.LocalProtocolError(str(exc))
    return None


class AiohttpResponseStream(httpx.AsyncByteStream):
    """A response body read from aiohttp, its errors raised as httpx ones; closing it frees the
    connection (back to the pool when the body was read to the end, closed otherwise)."""

    def __init__(self, response: aiohttp.ClientResponse, url: httpx.URL, slot: asyncio.Semaphore | None, timeouts: dict[str, float | None]) -> None:
        self._response, self._url, self._slot, self._timeouts = response, url, slot, timeouts
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._response.content.iter_any():
                yield part
        except Exception as exc:
            mapped = httpx_error_from_aiohttp(exc, self._url, self._timeouts)
            if mapped is None:
                raise
            raise mapped from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._response.release()
            if self._slot is not None:
                self._slot.release()


class _PiecewiseBody:
    """A request body handed to aiohttp piece by piece; aiohttp asks for the next piece once the
    previous one is written, so each ask re-arms the write timeout (aiohttp has none of its own)."""

    def __init__(self, body: AsyncIterable[bytes] | bytes, deadline: asyncio.Timeout, timeout: float | None) -> None:
        self._body, self._deadline, self._timeout = body, deadline, timeout
        self.active = True
        """False once the response has come (the server may answer before reading all the body):
        the deadline is then left, and rescheduling it would fail."""

    def _arm(self) -> None:
        if self._timeout is not None and self.active:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._timeout)

    def _disarm(self) -> None:
        if self.active:
            self._deadline.reschedule(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if isinstance(self._body, bytes):
            for start in range(0, len(self._body), SMALL_BODY):
                self._arm()
                yield self._body[start : start + SMALL_BODY]
        else:
            async for piece in self._body:  # waiting for the caller's stream is not writing: not timed
                self._arm()
                yield piece
                self._disarm()
        self._disarm()  # sent: what follows is the read timeout's


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport on an aiohttp ``ClientSession`` whose connections obey ``policy``.

    The session is made on the first request (aiohttp binds it to the running loop) and closed
    by :meth:`aclose`. Connection limits are httpx's: at most ``max_connections`` requests hold a
    connection at once (a request waits for one up to its pool timeout, then ``PoolTimeout``);
    aiohttp keeps idle connections up to that same cap (httpx's ``max_keepalive_connections``
    has no aiohttp counterpart; 0 turns keep-alive off)."""

    def __init__(
        self,
        policy: OutboundPolicy | None,
        *,
        ssl_context: ssl.SSLContext,
        limits: httpx.Limits,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> None:
        self.policy, self.ssl_context, self.limits = policy, ssl_context, limits
        self.local_address = local_address
        self.socket_options = tuple(socket_options or ())
        self._slots = asyncio.Semaphore(limits.max_connections) if limits.max_connections else None
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The aiohttp session once a request has been sent (for tests and diagnostics)."""
        return self._session

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """Every socket aiohttp opens: the last check of the address it will connect to."""
        family, kind, proto, _, address = addr_info
        if self.policy is not None:
            self.policy.check_address(str(address[0]), str(address[0]))
        sock = socket.socket(family, kind, proto)
        try:
            for option in self.socket_options:
                sock.setsockopt(*option)
        except BaseException:
            sock.close()
            raise
        return sock

    def _new_session(self) -> aiohttp.ClientSession:
        keep_alive = self.limits.max_keepalive_connections != 0
        connector = aiohttp.TCPConnector(
            ssl=self.ssl_context,
            limit=self.limits.max_connections or 0,
            limit_per_host=0,
            force_close=not keep_alive,
            keepalive_timeout=self.limits.keepalive_expiry if keep_alive else None,
            local_addr=(self.local_address, 0) if self.local_address else None,
            resolver=PolicyResolver(self.policy),
            use_dns_cache=False,  # every new connection resolves and checks again
            happy_eyeballs_delay=None,  # one address after the other, as httpcore did
            socket_factory=self._socket,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies; aiohttp must not add its own
            skip_auto_headers=UNCHANGED_HEADERS,
            auto_decompress=False,  # httpx decodes
            trust_env=False,  # no proxy, no netrc: the policy checks the real peer
            timeout=aiohttp.ClientTimeout(),
            max_line_size=16384,  # h11's limit for a header block, so aiohttp refuses no answer httpcore took
            max_field_size=16384,
        )

    def _check(self, host: str) -> None:
        """The policy's checks aiohttp cannot make for us: the host name, and a literal address (no resolver)."""
        if self.policy is None:
            return
        if not self.policy.host_allowed(host):
            raise URLRefused(f"host {host} is not in security.allowed_portals")
        if _looks_like_ip(host):
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:  # 127.1, 2130706433: the platform would still map these onto an address
                raise URLRefused(f"host {host} is not a canonical IP address; write the address in full (e.g. 127.0.0.1)") from None
            self.policy.check_address(host, address)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        self._check(url.raw_host.decode("ascii"))
        session = self._session
        if session is None:
            session = self._session = self._new_session()
        timeouts = request.extensions.get("timeout", {})
        connect, read, write, pool = (timeouts.get(k) for k in ("connect", "read", "write", "pool"))
        slots = self._slots
        if slots is not None:
            if slots.locked():
                try:
                    async with asyncio.timeout(pool):
                        await slots.acquire()
                except TimeoutError:
                    raise httpx.PoolTimeout(f"no connection free within {pool} s (limits.max_connections={self.limits.max_connections})") from None
            else:
                await slots.acquire()
        headers = request.headers.multi_items()
        body: Any
        try:
            body = request.content
        except httpx.RequestNotRead:  # a streamed body: aiohttp chooses the framing from Content-Length
            body = request.stream
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        deadline = asyncio.timeout(None)
        piecewise = None
        if not isinstance(body, bytes) or len(body) > SMALL_BODY:
            body = piecewise = _PiecewiseBody(body, deadline, write)
        elif not body:
            body = None
        token = _CONNECT_TIMEOUT.set(connect)
        try:
            async with deadline:
                response = await session.request(
                    request.method,
                    URL(str(url), encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(sock_connect=connect, sock_read=read),
                    server_hostname=request.extensions.get("sni_hostname"),
                )
        except BaseException as exc:
            if slots is not None:
                slots.release()
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise httpx.WriteTimeout(f"could not send the request body within {write} s") from None
            mapped = httpx_error_from_aiohttp(exc, url, timeouts) if isinstance(exc, Exception) else None
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            _CONNECT_TIMEOUT.reset(token)
            if piecewise is not None:
                piecewise.active = False
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(
            status_code=response.status, headers=response.raw_headers, stream=AiohttpResponseStream(response, url, slots, timeouts), extensions=extensions
        )

    async def aclose(self) -> None:
        """Close the connections; a later request opens new ones, as httpcore's pool did: one
        transport may serve several httpx clients (the tenants' portal clients), each closing it."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def transport(
    policy: OutboundPolicy | None = None,
    *,
    verify: ssl.SSLContext | str | bool = True,
    cert: ClientCertificate | None = None,
    trust_env: bool = True,
    http1: bool = True,
    http2: bool = False,
    limits: httpx.Limits = DEFAULT_LIMITS,
    local_address: str | None = None,
    retries: int = 0,
    socket_options: Iterable[SocketOption] | None = None,
) -> httpx.AsyncBaseTransport:
    """An httpx transport for outbound HTTP; the options are ``httpx.AsyncHTTPTransport``'s (no
    ``proxy`` or ``uds``: the gateway connects directly, so the policy checks the real peer;
    ``trust_env`` applies to the TLS settings only, as before).

    With ``policy``, every connection is checked against it (for URLs taken from requests);
    without, any address may be reached (for providers the administrator configured).
    HTTP/1.1 on aiohttp (:class:`AiohttpTransport`); with ``http2`` or ``retries`` (no aiohttp
    counterpart), the httpcore transport (:class:`Transport`).
    """
    ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    if http1 and not http2 and not retries:
        return AiohttpTransport(policy, ssl_context=ssl_context, limits=limits, local_address=local_address, socket_options=socket_options)
    pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=http1,
        http2=http2,
        local_address=local_address,
        retries=retries,
        socket_options=socket_options,
        network_backend=AsyncioBackend(policy),
    )
    return Transport(pool)
