"""Outbound URL policy: the request body names URLs the gateway will contact, so they are untrusted.

Two checks, both needed. :meth:`OutboundPolicy.check_url` runs at accept time and costs
no network call: the scheme, the host against ``security.allowed_portals`` and literal
IP addresses. The gateway's HTTP transport (``gateway.http.transport(policy)``) checks
again at connect time, on every address the name resolves to, and connects to the
address it checked, so a portal name that resolves to a private address (or is
re-pointed after acceptance) is still refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit


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
        self._host_refusal: dict[str, str] = {}

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

    def check_url(self, url: str | SplitResult) -> None:
        parts = urlsplit(url) if isinstance(url, str) else url
        if parts.scheme not in ("http", "https"):
            raise URLRefused(f"scheme {parts.scheme!r} is not allowed; only http and https")
        if "@" in parts.netloc:
            raise URLRefused("URLs with credentials are not contacted")
        host = parts.hostname
        if not host:
            raise URLRefused("the URL has no host")
        refusal = self._host_refusal.get(host)
        if refusal is None:
            refusal = self._refuse_host(host)
            if len(self._host_refusal) < 4096:  # portals are few; a flood of names is not cached
                self._host_refusal[host] = refusal
        if refusal:
            raise URLRefused(refusal)

    def _refuse_host(self, host: str) -> str:
        """Why the host may not be contacted, or "" if it may (before name resolution)."""
        if not self.host_allowed(host):
            return f"host {host} is not in security.allowed_portals; add it there if it is your portal"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return ""
        try:
            self.check_address(host, host)
        except URLRefused as exc:
            return str(exc)
        return ""
