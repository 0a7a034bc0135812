"""The gateway's outbound transport under httpx (aiohttp underneath; httpcore on the asyncio
backend for HTTP/2 or retries): plain and TLS connections, timeouts, errors, pooled connections
the server closed while idle, and the httpx-facing contract (transport errors are the httpx ones
httpcore raised, a policy refusal stays :class:`URLRefused` whether the host is a name or an
address, redirects, cookies and headers stay httpx's, the options are honoured)."""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp
import httpcore
import httpx
import pytest
import trustme
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway import http
from gateway.loopback import LoopbackServer
from gateway.netguard import OutboundPolicy, URLRefused

pytestmark = pytest.mark.anyio


async def hello(request: Request) -> PlainTextResponse:
    if "sleep" in request.query_params:
        await asyncio.sleep(float(request.query_params["sleep"]))
    return PlainTextResponse(f"hello {request.client.port}")


APP = Starlette(routes=[Route("/", hello)])


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(APP, timeout_keep_alive=1) as running:
        yield running


async def test_plain_http_and_connection_reuse(server):
    async with httpx.AsyncClient(transport=http.transport()) as client:
        first = await client.get(server.url)
        second = await client.get(server.url)
    assert first.status_code == 200 and first.text == second.text  # same client port: reused


async def test_idle_connection_closed_by_the_server_is_replaced(server):
    async with httpx.AsyncClient(transport=http.transport()) as client:
        first = (await client.get(server.url)).text
        await asyncio.sleep(1.5)  # past the server's keep-alive: it closes the socket
        second = await client.get(server.url)
    assert second.status_code == 200 and second.text != first


async def test_read_timeout_and_refused_connection(server):
    async with httpx.AsyncClient(transport=http.transport()) as client:
        with pytest.raises(httpx.ReadTimeout, match=r"^no data within 0\.2 s$"):
            await client.get(server.url, params={"sleep": 2}, timeout=0.2)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{closed_port}/")


async def test_tls_with_verification(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    with LoopbackServer(APP, ssl_certfile=str(tmp_path / "server.pem")) as tls:
        trusted = ssl.create_default_context()
        ca.configure_trust(trusted)
        async with httpx.AsyncClient(transport=http.transport(verify=trusted)) as client:
            response = await client.get(f"https://localhost:{tls.port}/")
            assert response.status_code == 200 and response.text.startswith("hello")
        async with httpx.AsyncClient(transport=http.transport()) as client:  # system CAs only
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://localhost:{tls.port}/")


class RecordingPolicy(OutboundPolicy):
    """Lets everything through and notes each address checked: proof the connection went through the gateway's backend."""

    def __init__(self, allowed_hosts: list[str]) -> None:
        super().__init__(allowed_hosts, allow_private_networks=True)
        self.checked: list[tuple[str, str]] = []

    def check_address(self, host, address):
        self.checked.append((host, str(address)))
        super().check_address(host, address)


async def test_connections_go_through_the_gateway_transport_and_close_with_the_client(server):
    policy = RecordingPolicy(["127.0.0.1"])
    transport = http.transport(policy)
    assert isinstance(transport, http.AiohttpTransport)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(server.url, content=b"x" * 100_000)  # a body sent in pieces (over 64 KiB)
        assert response.status_code == 405  # the route takes GET only: the request reached the app
        first, second = (await client.get(server.url)).text, (await client.get(server.url)).text
        assert first == second  # same client port: one connection, reused
        session = transport.session
        assert session is not None and not session.closed
    # a literal address: checked before each of the 3 requests, and the one socket opened for them
    assert policy.checked == [("127.0.0.1", "127.0.0.1")] * 4
    assert session.closed and transport.session is None


async def test_connect_time_refusal_is_raised_as_url_refused_and_the_pool_stays_usable():
    hits = []

    async def hit(request: Request) -> PlainTextResponse:
        hits.append(request.url.hostname)
        return PlainTextResponse("ok")

    with LoopbackServer(Starlette(routes=[Route("/", hit)])) as counted:
        refused = OutboundPolicy(["localhost"])  # passes the name check; the address is loopback
        async with httpx.AsyncClient(transport=http.transport(refused)) as client:
            with pytest.raises(URLRefused, match="non-public address"):
                await client.get(f"http://localhost:{counted.port}/")
            with pytest.raises(URLRefused, match=r"not in security\.allowed_portals"):
                await client.get(f"http://127.0.0.2:{counted.port}/")
        assert hits == []
        allowed = OutboundPolicy(["localhost"], allow_private_networks=True)
        async with httpx.AsyncClient(transport=http.transport(allowed)) as client:
            with pytest.raises(URLRefused, match=r"not in security\.allowed_portals"):
                await client.get(f"http://127.0.0.2:{counted.port}/")
            assert (await client.get(f"http://localhost:{counted.port}/")).text == "ok"  # same pool, after a refusal
        assert hits == ["localhost"]


async def test_pool_timeout_when_the_limits_allow_one_connection(server):
    async with httpx.AsyncClient(transport=http.transport(limits=httpx.Limits(max_connections=1))) as client:
        slow = asyncio.ensure_future(client.get(server.url, params={"sleep": 1}))
        await asyncio.sleep(0.2)  # the slow request holds the only connection
        with pytest.raises(httpx.PoolTimeout):
            await client.get(server.url, timeout=httpx.Timeout(5, pool=0.1))
        assert (await slow).status_code == 200


async def test_errors_while_reading_the_body_are_httpx_errors():
    """A server that promises 100 bytes, sends 5 and closes; and one that sends 5 and stalls."""

    released = asyncio.Event()

    async def respond_in_part(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stall: bool) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        await writer.drain()
        if stall:
            await released.wait()
        writer.close()

    closing = await asyncio.start_server(lambda r, w: respond_in_part(r, w, stall=False), "127.0.0.1", 0)
    stalling = await asyncio.start_server(lambda r, w: respond_in_part(r, w, stall=True), "127.0.0.1", 0)
    closing_url, stalling_url = (f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}/" for s in (closing, stalling))
    async with closing, stalling, httpx.AsyncClient(transport=http.transport()) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending complete message body") as closed:
            await client.get(closing_url)
        assert isinstance(closed.value.__cause__, aiohttp.ClientPayloadError)
        async with client.stream("GET", stalling_url, timeout=0.2) as response:
            assert response.status_code == 200  # the headers came: the timeout hits while streaming the body
            with pytest.raises(httpx.ReadTimeout):
                await response.aread()
        released.set()


@pytest.mark.parametrize("name", sorted(k.__name__ for k in http.HTTPCORE_TO_HTTPX))
def test_each_httpcore_error_becomes_the_httpx_error_of_the_same_name(name):
    error = http.httpx_error(getattr(httpcore, name)("the message"))
    assert type(error) is getattr(httpx, name) and str(error) == "the message"
    assert http.httpx_error(URLRefused("no")) is None and http.httpx_error(ValueError("no")) is None


async def test_transport_options_are_honoured(server):
    """The options callers pass (those of ``httpx.AsyncHTTPTransport``) reach the connection."""
    transport = http.transport(
        verify=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=5, max_keepalive_connections=0),
        local_address="127.0.0.1",
        retries=1,
        socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)],
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(server.url)
        assert response.status_code == 200
        assert transport.pool.connections == []  # no keep-alive allowed: closed after the response
    with pytest.raises(TypeError):
        http.transport(proxy="http://127.0.0.1:1")  # type: ignore[call-arg]
    assert isinstance(transport, http.Transport)  # retries: the httpcore transport (aiohttp has no connect retries)


async def test_transport_options_are_honoured_on_aiohttp(server):
    """The same options without ``retries``: the aiohttp transport, keep-alive off, bound to a local address."""
    transport = http.transport(
        verify=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=5, max_keepalive_connections=0),
        local_address="127.0.0.1",
        socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)],
    )
    assert isinstance(transport, http.AiohttpTransport)
    async with httpx.AsyncClient(transport=transport) as client:
        ports = {(await client.get(server.url)).text for _ in range(3)}
    assert len(ports) == 3  # no keep-alive allowed: a new connection (client port) per request
    assert isinstance(http.transport(http2=True), http.Transport)


async def serve_raw(handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "127.1", "2130706433"])
async def test_literal_addresses_are_checked_although_aiohttp_skips_the_resolver(host):
    """aiohttp connects to an IP literal without resolving it: the transport checks it before the request."""
    hits = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    raw, url = await serve_raw(note)
    port = url.rsplit(":", 1)[1].rstrip("/")
    async with raw, httpx.AsyncClient(transport=http.transport(OutboundPolicy(["*"]))) as client:
        with pytest.raises(URLRefused, match=r"non-public (IPv4 )?address|not a canonical IP address"):
            await client.get(f"http://{host}:{port}/")
    assert hits == []


async def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time_on_every_new_connection():
    """DNS rebinding: no DNS cache, so each new connection resolves and is checked again; the
    policy's answer at connect time is what counts, not the one when the first connection was made."""
    hits = []

    async def hit(request: Request) -> PlainTextResponse:
        hits.append(1)
        return PlainTextResponse("ok")

    with LoopbackServer(Starlette(routes=[Route("/", hit)])) as counted:
        policy = RecordingPolicy(["localhost"])  # allows private networks, notes each check
        no_keep_alive = httpx.Limits(max_connections=10, max_keepalive_connections=0)
        async with httpx.AsyncClient(transport=http.transport(policy, limits=no_keep_alive)) as client:
            assert (await client.get(f"http://localhost:{counted.port}/")).text == "ok"
            assert ("localhost", "127.0.0.1") in policy.checked  # checked by the resolver under the name
            policy.allow_private_networks = False  # the name now "resolves" to an address the policy refuses
            with pytest.raises(URLRefused, match=r"localhost resolves to the non-public address 127\.0\.0\.1"):
                await client.get(f"http://localhost:{counted.port}/")
        assert hits == [1]


def test_every_socket_is_checked_as_a_last_line():
    """Whatever path aiohttp takes to an address, the socket it opens for it is checked first."""
    transport = http.transport(OutboundPolicy(["*"]))
    assert isinstance(transport, http.AiohttpTransport)
    with pytest.raises(URLRefused, match=r"non-public address 10\.0\.0\.1"):
        transport._socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 80)))
    with pytest.raises(URLRefused, match="non-public"):
        transport._socket((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0)))
    sock = transport._socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 80)))  # public: a socket, not connected
    sock.close()


async def test_transport_errors_are_the_httpx_errors_callers_classify():
    """A server gone after the request went out (the deliverer's "maybe taken"), a name that does
    not resolve, and a request body the server never reads (write timeout)."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    never_reads = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never_reads.wait()
        writer.close()

    hanging, hang_url = await serve_raw(hang_up)
    stalling, stall_url = await serve_raw(stall)
    async with hanging, stalling, httpx.AsyncClient(transport=http.transport()) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected without sending a response"):
            await client.post(hang_url, content=b"{}")
        with pytest.raises(httpx.ConnectError, match=r"cannot resolve no-such-host\.invalid"):
            await client.get("http://no-such-host.invalid/")
        with pytest.raises(httpx.WriteTimeout):
            await client.post(stall_url, content=b"x" * 64 * 2**20, timeout=httpx.Timeout(5, write=0.3))

        async def streamed():
            for _ in range(64):
                yield b"x" * 2**20

        with pytest.raises(httpx.WriteTimeout):
            await client.post(stall_url, content=streamed(), timeout=httpx.Timeout(5, write=0.3))
        never_reads.set()


async def test_redirects_cookies_and_headers_stay_httpx_s():
    """httpx follows redirects (each hop through the policy), keeps the cookies and builds the
    headers: aiohttp adds none of its own and keeps no cookie jar across clients."""
    seen: list[dict[str, str]] = []

    async def app(request: Request) -> PlainTextResponse:
        seen.append(dict(request.headers))
        if request.url.path == "/hop":
            return PlainTextResponse("", status_code=302, headers={"Location": f"http://127.0.0.2:{request.url.port}/"})
        response = PlainTextResponse("home")
        response.set_cookie("session", "s1")
        return response

    with LoopbackServer(Starlette(routes=[Route("/", app), Route("/hop", app)])) as site:
        transport = http.transport(OutboundPolicy(["localhost"], allow_private_networks=True))
        async with httpx.AsyncClient(transport=transport) as client:
            hop = await client.get(f"http://localhost:{site.port}/hop")
            assert hop.status_code == 302  # not followed by the transport
            with pytest.raises(URLRefused, match=r"127\.0\.0\.2 is not in security\.allowed_portals"):
                await client.get(f"http://localhost:{site.port}/hop", follow_redirects=True)
            await client.get(f"http://localhost:{site.port}/")
        # the same transport, closed by the first client as the tenants' portal clients do: still usable
        async with httpx.AsyncClient(transport=transport, headers={"User-Agent": "gw-test"}) as other:
            await other.get(f"http://localhost:{site.port}/")
        await transport.aclose()
    assert [h["user-agent"] for h in seen] == [f"python-httpx/{httpx.__version__}"] * 3 + ["gw-test"]
    assert "cookie" not in seen[-1]  # the other client's cookie stayed with httpx


async def test_streamed_request_body_without_length_arrives_whole(server):
    received: list[bytes] = []

    async def echo(request: Request) -> PlainTextResponse:
        received.append(await request.body())
        return PlainTextResponse(request.headers.get("transfer-encoding", ""))

    async def parts():
        for i in range(5):
            yield bytes([65 + i]) * 50_000

    with LoopbackServer(Starlette(routes=[Route("/", echo, methods=["POST"])])) as site:
        async with httpx.AsyncClient(transport=http.transport()) as client:
            response = await client.post(site.url, content=parts())
    assert response.text == "chunked" and received == [b"".join(bytes([65 + i]) * 50_000 for i in range(5))]
