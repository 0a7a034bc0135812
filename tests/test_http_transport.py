"""The asyncio network backend under httpx: plain and TLS connections, timeouts, errors,
pooled connections the server closed while idle, and the transport's httpx-facing contract
(httpcore errors become httpx ones, a policy refusal stays :class:`URLRefused`, the options are honoured)."""

from __future__ import annotations

import asyncio
import socket
import ssl

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
        with pytest.raises(httpx.ReadTimeout):
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


async def test_connections_go_through_the_gateway_backend_and_close_with_the_client(server):
    policy = RecordingPolicy(["127.0.0.1"])
    transport = http.transport(policy)
    assert isinstance(transport, httpx.AsyncBaseTransport)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(server.url, content=b"x" * 100_000)  # a streamed request body
        assert response.status_code == 405  # the route takes GET only: the request reached the app
        assert (await client.get(server.url)).status_code == 200
        assert len(transport.pool.connections) == 1
    assert policy.checked == [("127.0.0.1", "127.0.0.1")]  # one connection, reused, checked once
    assert transport.pool.connections == []


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
        assert isinstance(closed.value.__cause__, httpcore.RemoteProtocolError)
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
