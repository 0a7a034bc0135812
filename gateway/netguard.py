"""Outbound URL policy: the request body names URLs the gateway will contact, so they are untrusted.

Two checks, both needed. :meth:`OutboundPolicy.check_url` runs at accept time and costs
no network call: the scheme, the host against ``security.allowed_portals`` and literal
IP addresses. The guarded transport checks again at connect time, on every address the
name resolves to, and connects to the address it checked, so a portal name that
resolves to a private address (or is re-pointed after acceptance) is still refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx


class URLRefused(Exception):
    """The URL is not one the gateway may contact; the message says which rule and the fix."""


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


class OutboundPolicy:
    def __init__(self, allowed_hosts: Iterable[str], allow_private_networks: bool = False) -> None:
        self.allowed_hosts = tuple(h.lower().rstrip(".") for h in allowed_hosts)
        self.allow_private_networks = allow_private_networks

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False

    def check_address(self, host: str, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if _is_private(ip) and not self.allow_private_networks:
            raise URLRefused(
                f"{host} resolves to the non-public address {ip}; "
                "set security.allow_private_networks: true only if the portal is on a private network"
            )

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise URLRefused(f"scheme {parts.scheme!r} is not allowed; only http and https")
        host = parts.hostname
        if not host:
            raise URLRefused("the URL has no host")
        if parts.username or parts.password:
            raise URLRefused("URLs with credentials are not contacted")
        if not self.host_allowed(host):
            raise URLRefused(f"host {host} is not in security.allowed_portals; add it there if it is your portal")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return
        self.check_address(host, host)

    def transport(self, **kwargs: Any) -> httpx.AsyncHTTPTransport:
        """An httpx transport whose every connection passes :meth:`check_address`."""
        transport = httpx.AsyncHTTPTransport(**kwargs)
        # httpx does not take httpcore's network_backend as an option; the new pool has no
        # connection yet, so swapping its backend puts resolution and the check in one place.
        transport._pool._network_backend = _GuardedBackend(self)
        return transport


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: OutboundPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        if not self._policy.host_allowed(host):
            raise URLRefused(f"host {host} is not in security.allowed_portals")
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            self._policy.check_address(host, address)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address, socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise URLRefused("unix sockets are not contacted")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
