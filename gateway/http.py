"""Outbound HTTP for the gateway and its plugins: an httpx transport on an asyncio-native
network backend.

httpcore's default backend goes through anyio, which wraps every socket read and write in
a cancel scope and answers its connection pool's per-request "is this idle socket still
open?" question through typed-attribute lookups and a ``select`` call. Under load that
doubles the CPU each request costs (measured: 2.0 ms -> 1.1 ms per request at 50
concurrent). httpcore documents network backends as an extension point; this one uses
asyncio streams directly.

The backend also resolves names itself, so an :class:`~gateway.netguard.OutboundPolicy`
can check every address a name resolves to and the connection goes to the address checked.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from gateway.netguard import OutboundPolicy, URLRefused

SocketOption = tuple[int, int, Any]
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


def transport(policy: OutboundPolicy | None = None, **kwargs: Any) -> httpx.AsyncHTTPTransport:
    """An httpx transport on :class:`AsyncioBackend`; ``kwargs`` are ``AsyncHTTPTransport``'s.

    With ``policy``, every connection is checked against it (for URLs taken from requests);
    without, any address may be reached (for providers the administrator configured).
    """
    http_transport = httpx.AsyncHTTPTransport(**kwargs)
    # AsyncHTTPTransport takes no network_backend option; its pool is new and holds no
    # connection yet, so setting the backend here is safe.
    http_transport._pool._network_backend = AsyncioBackend(policy)
    return http_transport
