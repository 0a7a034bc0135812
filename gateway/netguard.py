"""Outbound URL policy: the request body names URLs the gateway will contact, so they are untrusted.

Two checks, both needed. :meth:`OutboundPolicy.check_url` runs at accept time and costs
no network call: the scheme, the host against ``security.allowed_portals`` and literal
IP addresses. The gateway's HTTP transport (``gateway.http.transport(policy)``) checks
again at connect time, on every address the name resolves to, and connects to the
address it checked, so a portal name that resolves to a private address (or is
re-pointed after acceptance) is still refused.

An IPv6 address can stand for an IPv4 one (``::ffff:127.0.0.1``, NAT64 ``64:ff9b::a00:1``,
6to4, Teredo, ...): such an address is judged by the IPv4 address(es) it embeds, so no
spelling of a private address passes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 ranges whose last 32 bits are an IPv4 address the packets end up at (RFC 4291, 2765, 6052).
# IPv4-mapped (::ffff:0:0/96) is ipaddress's ``ipv4_mapped``, 6to4 and Teredo its ``sixtofour`` and ``teredo``.
_LAST_32_BITS_ARE_IPV4 = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), e.g. ::127.0.0.2
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT), e.g. ::ffff:0:10.0.0.1
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix
)
# NAT64 local-use prefix (RFC 8215): the translator's prefix length (/48 ... /96), hence where the IPv4
# address sits, is a local choice the gateway cannot know; IANA lists the range as not globally reachable.
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


class URLRefused(Exception):
    """The URL is not one the gateway may contact; the message says which rule and the fix."""


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address stands for (mapped, compatible, translated, NAT64,
    6to4, Teredo's server and client), or ``()`` for a native IPv6 address."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if any(address in network for network in _LAST_32_BITS_ARE_IPV4):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo  # (server, client); ipaddress undoes the client's obfuscation
    return ()


def _non_public(address: IPAddress) -> str:
    """Why ``address`` is not a public unicast address (naming the embedded IPv4 address that is not), or ""."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL_USE:
            return f"the non-public local-use NAT64 address {address} (64:ff9b:1::/48, whose IPv4 layout is a local choice)"
        embedded = embedded_ipv4(address)
        if embedded:  # judged by what it embeds only: ipaddress calls the Teredo prefix itself not global
            inner = next((inner for inner in embedded if _non_public(inner)), None)
            return f"{address}, which embeds the non-public IPv4 address {inner}" if inner else ""
    if not address.is_global or address.is_multicast:
        return f"the non-public address {address}"
    return ""


class OutboundPolicy:
    def __init__(self, allowed_hosts: Iterable[str], allow_private_networks: bool = False) -> None:
        self.allowed_hosts = tuple(h.lower().rstrip(".") for h in allowed_hosts)
        self.allow_private_networks = allow_private_networks
        self._host_refusal: dict[str, str] = {}
        self.portal_hosts: frozenset[str] = frozenset()
        """Hosts allowed beside ``allowed_hosts`` that change while the gateway runs: in app mode,
        the domains of the installed portals (:meth:`set_portal_hosts`, by the tenant service)."""

    def set_portal_hosts(self, hosts: Iterable[str]) -> None:
        new = frozenset(h.lower().rstrip(".") for h in hosts)
        if new != self.portal_hosts:
            self.portal_hosts = new
            self._host_refusal.clear()  # a host refused before may be a portal now, and the reverse

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.portal_hosts:
            return True
        for pattern in self.allowed_hosts:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False

    def check_address(self, host: str, address: str | IPAddress) -> None:
        """Refuse an address that is not public unicast, whatever its spelling (unless private networks are allowed)."""
        if self.allow_private_networks:
            return
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
        except ValueError:
            raise URLRefused(f"{host} resolves to {address!r}, which is not an IP address") from None
        reason = _non_public(ip)
        if reason:
            raise URLRefused(f"{host} resolves to {reason}; set security.allow_private_networks: true only if the portal is on a private network")

    def check_url(self, url: str | SplitResult) -> None:
        """Refuse, with :class:`URLRefused` only, a URL the gateway may not contact (no network call)."""
        try:
            parts = urlsplit(url) if isinstance(url, str) else url
        except ValueError:  # the text may hold credentials: not repeated in the message
            raise URLRefused("the URL cannot be parsed: check the brackets around an IPv6 host and the characters of the host name") from None
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
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return ""  # a name: its addresses are checked at connect time
        try:
            self.check_address(host, ip)
        except URLRefused as exc:
            return str(exc)
        return ""
