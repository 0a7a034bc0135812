import ipaddress

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway import http
from gateway.loopback import LoopbackServer
from gateway.netguard import OutboundPolicy, URLRefused


def test_host_patterns():
    policy = OutboundPolicy(["acme.bitrix24.com", "*.bitrix24.de"])
    assert policy.host_allowed("acme.bitrix24.com") and policy.host_allowed("ACME.bitrix24.com.")
    assert policy.host_allowed("x.bitrix24.de") and not policy.host_allowed("bitrix24.de.evil.com")
    assert not policy.host_allowed("evilbitrix24.de") and not policy.host_allowed("other.bitrix24.com")
    assert OutboundPolicy(["*"]).host_allowed("anything.example")


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://acme.bitrix24.com/x", "scheme"),
        ("https://evil.example.com/x", "allowed_portals"),
        ("https://u:p@acme.bitrix24.com/x", "credentials"),
        ("http://10.0.0.5/x", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/x", "non-public"),
        ("http://[::ffff:127.0.0.1]/x", "non-public"),
        ("http://[::1/x", "cannot be parsed"),
        ("http://[acme.bitrix24.com]/x", "cannot be parsed"),
    ],
)
def test_refused_urls(url, reason):
    policy = OutboundPolicy(["acme.bitrix24.com", "10.0.0.5", "169.254.169.254", "::1", "::ffff:127.0.0.1"])
    with pytest.raises(URLRefused, match=reason):
        policy.check_url(url)


def test_private_addresses_allowed_when_configured():
    OutboundPolicy(["10.0.0.5"], allow_private_networks=True).check_url("http://10.0.0.5/x")
    OutboundPolicy(["acme.bitrix24.com"]).check_url("https://acme.bitrix24.com/x")


@pytest.mark.anyio
async def test_resolved_address_is_checked_at_connect_time():
    """``localhost`` passes the name check but resolves to loopback: refused before connecting."""
    hits = []

    async def hit(request):
        hits.append(1)
        return PlainTextResponse("ok")

    with LoopbackServer(Starlette(routes=[Route("/", hit)])) as server:
        url = f"http://localhost:{server.port}/"
        guarded = OutboundPolicy(["localhost"])
        guarded.check_url(url)  # a name: nothing to check without resolving it
        async with httpx.AsyncClient(transport=http.transport(guarded)) as client:
            with pytest.raises(URLRefused, match="non-public address"):
                await client.get(url)
        assert hits == []
        open_policy = OutboundPolicy(["localhost"], allow_private_networks=True)
        async with httpx.AsyncClient(transport=http.transport(open_policy)) as client:
            assert (await client.get(url)).text == "ok"
        assert hits == [1]


# IPv6 spellings of IPv4 addresses -------------------------------------------------------------

PUBLIC_V4 = ipaddress.IPv4Address("8.8.8.8")
TEREDO_SERVER = ipaddress.IPv4Address("65.54.227.120")  # a public Teredo server


def teredo(server: ipaddress.IPv4Address, client: ipaddress.IPv4Address, flags: int = 0x8000, port: int = 40000) -> ipaddress.IPv6Address:
    """2001:0:SERVER:FLAGS:PORT:CLIENT with the port and client obfuscated (bits inverted), as RFC 4380 writes them."""
    return ipaddress.IPv6Address((0x20010000 << 96) | (int(server) << 64) | (flags << 48) | ((port ^ 0xFFFF) << 32) | (int(client) ^ 0xFFFFFFFF))


def spellings(a: ipaddress.IPv4Address, tail: int = 1, flags: int = 0x8000, port: int = 40000) -> dict[str, ipaddress.IPv6Address]:
    """Every IPv6 form that embeds ``a`` (``tail``: the 80 free bits of a 6to4 address)."""
    v4 = int(a)
    return {
        "mapped": ipaddress.IPv6Address((0xFFFF << 32) | v4),
        "compatible": ipaddress.IPv6Address(v4),
        "translated": ipaddress.IPv6Address((0xFFFF << 48) | v4),
        "nat64": ipaddress.IPv6Address((0x64FF9B << 96) | v4),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | tail),
        "teredo client": teredo(TEREDO_SERVER, a, flags, port),
        "teredo server": teredo(a, PUBLIC_V4, flags, port),
    }


def test_teredo_helper_writes_what_ipaddress_reads():
    assert teredo(TEREDO_SERVER, ipaddress.IPv4Address("192.0.2.45")) == ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    assert spellings(PUBLIC_V4)["teredo client"].teredo == (TEREDO_SERVER, PUBLIC_V4)


NON_PUBLIC_V4 = ["127.0.0.1", "10.1.2.3", "192.168.1.1", "169.254.169.254"]
REFUSED = list(
    dict.fromkeys(
        [
            "::127.0.0.2",
            "::7f00:1",
            "::10.0.0.1",
            "::ffff:0:10.0.0.1",
            "::ffff:0:7f00:1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::192.168.1.1",
            "64:ff9b:1::8.8.8.8",
            "64:ff9b:1:7f00:1::",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101:1::5",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo, client 192.0.2.45 (documentation range)
        ]
        + [str(address) for a in NON_PUBLIC_V4 for address in spellings(ipaddress.IPv4Address(a)).values()]
    )
)
PUBLIC = [
    "2606:4700::1111",
    "2a00:1450:4001:80b::200e",
    "2002:808:808::1",
    "64:ff9b::8.8.8.8",
    "::ffff:8.8.8.8",
    "::ffff:0:8.8.8.8",
    "::8.8.8.8",
    str(teredo(TEREDO_SERVER, PUBLIC_V4)),
    "8.8.8.8",
    "1.1.1.1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_ipv6_spellings_of_non_public_ipv4_addresses_are_refused(address):
    policy = OutboundPolicy(["*"])
    with pytest.raises(URLRefused, match="non-public"):
        policy.check_address("portal.example", address)
    with pytest.raises(URLRefused, match="non-public"):
        policy.check_url(f"https://[{address}]/callback")
    OutboundPolicy(["*"], allow_private_networks=True).check_url(f"https://[{address}]/callback")


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass_in_every_spelling(address):
    policy = OutboundPolicy(["*"])
    policy.check_address("portal.example", address)
    policy.check_url(f"https://[{address}]/callback" if ":" in address else f"https://{address}/callback")


def test_the_refusal_names_the_embedded_address():
    with pytest.raises(URLRefused) as err:
        OutboundPolicy(["*"]).check_address("portal.example", "2002:a9fe:a9fe::1")
    assert str(err.value).startswith("portal.example resolves to 2002:a9fe:a9fe::1, which embeds the non-public IPv4 address 169.254.169.254;")


def _refused(policy: OutboundPolicy, address: object) -> bool:
    try:
        policy.check_address("portal.example", address)  # type: ignore[arg-type]
    except URLRefused:
        return True
    return False


def _url_refused(policy: OutboundPolicy, url: str) -> bool:
    try:
        policy.check_url(url)
    except URLRefused:
        return True
    return False


ipv4_addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
private_ipv4_addresses = st.sampled_from(
    ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "0.0.0.0/8"]
).flatmap(lambda net: st.integers(0, ipaddress.IPv4Network(net).num_addresses - 1).map(lambda i: ipaddress.IPv4Network(net)[i]))
spelling_options = {"tail": st.integers(0, 2**80 - 1), "flags": st.integers(0, 0xFFFF), "port": st.integers(0, 0xFFFF)}


@given(a=ipv4_addresses, **spelling_options)
def test_every_ipv6_spelling_of_an_ipv4_address_gets_its_verdict(a, tail, flags, port):
    """Refused iff the IPv4 address itself is refused, at connect time and in a URL."""
    policy = OutboundPolicy(["*"])
    expected = _refused(policy, str(a))
    for form, address in spellings(a, tail, flags, port).items():
        assert _refused(policy, str(address)) == expected, form
        assert _url_refused(policy, f"http://[{address}]:8080/cb") == expected, form


@given(a=private_ipv4_addresses, **spelling_options)
def test_every_ipv6_spelling_of_a_private_ipv4_address_is_refused(a, tail, flags, port):
    policy = OutboundPolicy(["*"])
    for form, address in spellings(a, tail, flags, port).items():
        assert _refused(policy, address) and _url_refused(policy, f"https://[{address}]/"), form


@given(st.integers(0, 2**80 - 1))
def test_the_local_use_nat64_prefix_is_refused_whatever_it_embeds(tail):
    assert _refused(OutboundPolicy(["*"]), ipaddress.IPv6Address((0x0064FF9B0001 << 80) | tail))


url_text = st.one_of(
    st.text(),
    st.builds(
        lambda scheme, host, rest: f"{scheme}://{host}{rest}",
        st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
        st.one_of(st.text(), st.builds("[{}]".format, st.text()), st.builds("[{}".format, st.text()), st.ip_addresses().map(str)),
        st.text(),
    ),
)


@given(url_text)
def test_check_url_refuses_with_url_refused_only(url):
    for policy in (OutboundPolicy(["*"]), OutboundPolicy(["acme.bitrix24.com"])):
        try:
            policy.check_url(url)
        except URLRefused:
            pass


@pytest.mark.anyio
async def test_bracketed_ipv6_literals_are_checked_at_connect_time():
    """A URL with an IPv6 literal reaches the transport's check: an IPv4-mapped loopback is refused
    before connecting, and the same URL connects when private networks are allowed."""
    hits = []

    async def hit(request):
        hits.append(1)
        return PlainTextResponse("ok")

    with LoopbackServer(Starlette(routes=[Route("/", hit)])) as server:
        for literal in ("::ffff:127.0.0.1", "::127.0.0.1", "::ffff:0:127.0.0.1", "64:ff9b::127.0.0.1", "2002:7f00:1::1"):
            guarded = OutboundPolicy(["*"])
            async with httpx.AsyncClient(transport=http.transport(guarded)) as client:
                with pytest.raises(URLRefused, match=r"non-public IPv4 address 127.0.0.1"):
                    await client.get(f"http://[{literal}]:{server.port}/")
        assert hits == []
        open_policy = OutboundPolicy(["::ffff:127.0.0.1"], allow_private_networks=True)
        async with httpx.AsyncClient(transport=http.transport(open_policy)) as client:
            assert (await client.get(f"http://[::ffff:127.0.0.1]:{server.port}/")).text == "ok"
        assert hits == [1]
