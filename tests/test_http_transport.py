"""The asyncio network backend under httpx: plain and TLS connections, timeouts, errors,
and pooled connections the server closed while idle."""

from __future__ import annotations

import asyncio
import socket
import ssl

import httpx
import pytest
import trustme
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway import http
from gateway.loopback import LoopbackServer

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
