import httpx
import pytest
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


@pytest.mark.parametrize("url, reason", [
    ("ftp://acme.bitrix24.com/x", "scheme"),
    ("https://evil.example.com/x", "allowed_portals"),
    ("https://u:p@acme.bitrix24.com/x", "credentials"),
    ("http://10.0.0.5/x", "non-public"),
    ("http://169.254.169.254/latest/meta-data", "non-public"),
    ("http://[::1]/x", "non-public"),
    ("http://[::ffff:127.0.0.1]/x", "non-public"),
])
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
