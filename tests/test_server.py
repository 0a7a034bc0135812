"""Connection hygiene (issue 12, item 5) and `gateway serve`'s bind-then-announce.

In-process tests run uvicorn with the guarded protocol on 127.0.0.1 around a tiny app, with
timeouts of a fraction of a second; the end-to-end test floods a real `gateway serve`
subprocess with half-sent request heads (a bounded number, loopback only).
"""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gateway.config import ConfigError, ConnectionSettings, load_config
from gateway.delivery import MAX_CONNECTIONS as DELIVERY_POOL
from gateway.loopback import LoopbackServer
from gateway.server import (
    BASE_RESERVE,
    MAX_HEAD_BYTES,
    ConnectionGuard,
    InvalidRequestLogThrottle,
    ListenError,
    bind_socket,
    connection_cap,
    file_reserve,
    guarded_protocol,
    outbound_pools,
)
from gateway.testing import make_config

HALF_HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\n"  # the request line and one header, never the blank line


# -- helpers ----------------------------------------------------------------------------------
def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``within`` s."""
    received = b""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server did not close the connection within {within} s; got {received!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


class Probe:
    """A tiny app: GET /ok, POST /body (reads the body, notes a client that went away), POST /small
    (answers 413 from the head alone when Content-Length exceeds 10, as gateway/app.py does)."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.app = Starlette(routes=[Route("/ok", self.ok), Route("/body", self.body, methods=["POST"]), Route("/small", self.small, methods=["POST"])])

    async def ok(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def body(self, request: Request) -> PlainTextResponse:
        try:
            data = await request.body()
        except ClientDisconnect:
            self.disconnects += 1
            return PlainTextResponse("gone")
        return PlainTextResponse(str(len(data)))

    async def small(self, request: Request) -> JSONResponse:
        if int(request.headers.get("content-length", "0")) > 10:
            return JSONResponse({"error": {"code": "body_too_large", "message": "the request body exceeds 10 bytes"}}, 413)
        return JSONResponse({"length": len(await request.body())})


@contextmanager
def guarded_server(header_timeout: float = 0.5) -> Iterator[tuple[Probe, int]]:
    """The probe app under uvicorn with the guard: head ``header_timeout``, body 0.5 s, keep-alive 0.5 s, at most 4 connections."""
    probe = Probe()
    settings = ConnectionSettings(header_timeout=header_timeout, body_timeout=0.5, keep_alive_timeout=0.5, max_connections=4)
    guard = ConnectionGuard(settings, settings.max_connections or 0)
    with LoopbackServer(probe.app, http=guarded_protocol(guard), timeout_keep_alive=settings.keep_alive_timeout, ws="none") as server:
        yield probe, server.port


@pytest.fixture
def guarded() -> Iterator[tuple[Probe, int]]:
    with guarded_server() as server:
        yield server


# -- unit -------------------------------------------------------------------------------------
def test_connection_cap_keeps_back_what_the_outbound_pools_can_open(tmp_path):
    """The deliverer alone may open DELIVERY_POOL connections: the reserve must cover it, the
    providers' and the downloads' pools (each at most one connection per work slot) and the rest."""
    config = load_config(_write_config(tmp_path))  # one provider, 16 work slots
    pools = outbound_pools(config)
    assert pools == {"callbacks": DELIVERY_POOL, "image downloads": 16, "recording downloads": 16, "provider up": 16}
    reserve = file_reserve(pools)
    assert reserve == BASE_RESERVE + DELIVERY_POOL + 3 * 16 == 624
    assert connection_cap(ConnectionSettings(), 1024, reserve) == 400  # the common soft limit
    assert connection_cap(ConnectionSettings(), 1_048_576, reserve) == 8192  # the ceiling
    assert connection_cap(ConnectionSettings(), 256, reserve) == 32  # a limit below the reserve: a floor (and a warning at start)
    assert connection_cap(ConnectionSettings(max_connections=50), 1024, reserve) == 50  # listen.max_connections wins


def test_provider_pool_sizes_count_up_to_the_work_slots(tmp_path):
    config = load_config(
        _write_config(
            tmp_path,
            workers={"concurrency": 200},
            providers={
                "up": {"type": "openai", "base_url": "http://127.0.0.1:1/v1", "max_connections": 150},
                "b": {"type": "openai", "base_url": "http://127.0.0.1:2/v1"},
            },
        )
    )
    assert outbound_pools(config) == {"callbacks": DELIVERY_POOL, "image downloads": 100, "recording downloads": 100, "provider up": 150, "provider b": 100}


def test_listen_settings_in_the_config(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: {port: 9000, header_timeout: 3, body_timeout: 20, keep_alive_timeout: 2, max_connections: 100}\n")
    assert load_config(path).connections == ConnectionSettings(header_timeout=3, body_timeout=20, keep_alive_timeout=2, max_connections=100)
    path.write_text("listen: {port: 9000}\n")
    assert load_config(path).connections == ConnectionSettings(header_timeout=10, body_timeout=30, keep_alive_timeout=5, max_connections=None)
    path.write_text("listen: {header_timout: 3}\n")
    with pytest.raises(ConfigError, match=r"listen.header_timout: is not a known setting. Fix: did you mean `header_timeout`"):
        load_config(path)
    path.write_text("listen: {max_connections: -1}\n")
    with pytest.raises(ConfigError, match=r"listen.max_connections: must be at least 0"):
        load_config(path)


def test_soft_file_limit_is_raised_to_the_hard_limit():
    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from gateway.server import raise_file_limit\n"
        "limit = raise_file_limit()\n"
        "print(limit.before, limit.soft, limit.hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    before, soft, hard, now = (int(x) for x in result.stdout.split())
    assert before == min(256, hard) and soft == hard == now


def test_a_port_in_use_is_a_listen_error_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            bind_socket("127.0.0.1", port, "gw.yaml")
    assert str(caught.value) == (
        f"cannot listen on 127.0.0.1:{port}: the port is already in use (another gateway or program listens there); "
        "stop it, or pick another port with `gateway serve --port N` or listen.port in gw.yaml"
    )
    with pytest.raises(ListenError, match="a port is a number from 0 to 65535"):
        bind_socket("127.0.0.1", 70000, "gw.yaml")


# -- in-process over real sockets -------------------------------------------------------------
def test_half_sent_head_gets_408_and_is_closed(guarded):
    _probe, port = guarded
    sock = connect(port, HALF_HEAD)
    started = time.monotonic()
    status, headers, body = parse(read_until_closed(sock, within=10))
    assert time.monotonic() - started >= 0.4  # not before the header timeout
    assert (status, headers["connection"], json.loads(body)) == (
        408,
        "close",
        {"error": {"code": "request_timeout", "message": "the request head did not arrive within 0.5 s"}},
    )


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(guarded):
    _, port = guarded
    assert read_until_closed(connect(port), within=10) == b""


def test_stray_bytes_do_not_keep_a_connection_open(guarded):
    """CRLFs before a request begin no message for the parser: the head's clock still runs."""
    _, port = guarded
    sock = connect(port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"\r\n")
            if select.select([sock], [], [], 0.1)[0] and not sock.recv(100):
                break  # closed by the server
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        raise AssertionError("a client sending a CRLF every 0.1 s kept its connection for 10 s")


def test_slow_body_gets_408_and_the_app_sees_a_disconnect(guarded):
    probe, port = guarded
    sock = connect(port, b'POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"partial":')
    status, _, body = parse(read_until_closed(sock, within=10))
    assert (status, json.loads(body)["error"]["message"]) == (408, "the request body did not arrive within 0.5 s")
    deadline = time.monotonic() + 5
    while probe.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probe.disconnects == 1


def test_an_oversized_head_gets_431(guarded):
    _, port = guarded
    sock = connect(port, b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1000))
    status, _, body = parse(read_until_closed(sock, within=10))
    assert (status, json.loads(body)["error"]["code"]) == (431, "headers_too_large")


def test_keep_alive_and_pipelining_still_work_and_idle_keep_alive_closes(guarded):
    _, port = guarded
    sock = connect(port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n" * 2 + b"POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    started = time.monotonic()
    received = read_until_closed(sock, within=10)  # three answers, then closed by the keep-alive timeout
    assert time.monotonic() - started >= 0.4
    assert received.count(b"HTTP/1.1 200 OK") == 3 and received.endswith(b"\r\n\r\n3")


def test_an_early_413_is_the_only_answer_on_its_connection(guarded):
    """The app answers 413 from the head and the client stops sending: when the body timeout
    fires the connection is closed without a second, unsolicited 408."""
    _, port = guarded
    sock = connect(port, b"POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nabc")
    received = read_until_closed(sock, within=10)
    assert received.count(b"HTTP/1.1 ") == 1, received
    status, _, body = parse(received)
    assert (status, json.loads(body)["error"]["code"]) == (413, "body_too_large")


def test_invalid_requests_are_answered_400_and_logged_at_most_once_per_period(guarded, caplog):
    _, port = guarded
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    for _ in range(20):
        status, _, _ = parse(read_until_closed(connect(port, b"\x16\x03\x01garbage\r\n\r\n"), within=10))
        assert status == 400
    lines = [r for r in caplog.records if r.name == "uvicorn.error" and r.getMessage().startswith("Invalid HTTP request received.")]
    assert len(lines) <= 1, [r.getMessage() for r in lines]


def test_the_invalid_request_throttle_summarises_what_it_suppressed():
    now = [100.0]
    throttle = InvalidRequestLogThrottle(clock=lambda: now[0])

    def record(message: str = "Invalid HTTP request received.") -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, message, None, None)

    first = record()
    assert throttle.filter(first) and first.getMessage() == "Invalid HTTP request received."
    assert [throttle.filter(record()) for _ in range(5)] == [False] * 5
    assert throttle.filter(record("Exception in ASGI application"))  # other lines pass untouched
    now[0] += 10
    summary = record()
    assert throttle.filter(summary)
    assert summary.getMessage() == "Invalid HTTP request received. (5 more since the last report, not logged; next report in 10 s at the earliest)"


def test_beyond_the_cap_new_connections_get_503_with_retry_after():
    """A header timeout of a few seconds: the idle connections must outlast two refusals, one
    through httpx, on a loaded machine."""
    with guarded_server(header_timeout=3) as (_, port):
        _beyond_the_cap(port)


def _beyond_the_cap(port: int) -> None:
    idle = [connect(port, HALF_HEAD) for _ in range(4)]
    status, headers, body = parse(read_until_closed(connect(port, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n"), within=10))
    assert (status, headers["retry-after"], headers["content-type"]) == (503, "1", "application/json")
    assert json.loads(body) == {"error": {"code": "too_many_connections", "message": "the gateway has its maximum of 4 connections open; retry in a second"}}
    answer = httpx.get(f"http://127.0.0.1:{port}/ok", timeout=10)  # a real client reads the answer, not a reset
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "1")
    for sock in idle:
        assert parse(read_until_closed(sock, within=10))[0] == 408
    assert httpx.get(f"http://127.0.0.1:{port}/ok", timeout=10).text == "ok"


# -- end to end: `gateway serve` ------------------------------------------------------------------
def _write_config(tmp_path: Path, **overrides: object) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**make_config("http://127.0.0.1:1", **overrides), "data_dir": str(tmp_path / "var")}))
    return path


def test_serve_on_a_port_in_use_says_which_and_how_to_pick_another(tmp_path):
    path = _write_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
    assert result.returncode == 1
    assert result.stdout == ""  # nothing announced
    assert result.stderr == (
        f"gateway serve: cannot listen on 127.0.0.1:{port}: the port is already in use (another gateway or program listens there); "
        f"stop it, or pick another port with `gateway serve --port N` or listen.port in {path}\n"
    )


def test_serve_announces_the_port_it_bound(tmp_path):
    """`--port 0` binds a free port; the announced URL is that port and it answers at once."""
    path = _write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "nothing announced within 30 s"
        line = proc.stdout.readline()
        assert " serving on http://127.0.0.1:" in line and ":0 " not in line, line
        url = line.split("serving on ", 1)[1].split(" ", 1)[0]
        assert httpx.get(url + "/-/health", timeout=10).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.e2e
def test_idle_connection_flood_cannot_lock_the_portal_out(gateway, portal, upstream):
    """Item 5: connections holding half-sent heads fill the cap; beyond it 503 + Retry-After; after the
    header timeout the server closes them and legitimate requests are served again."""
    cap, header_timeout = 12, 2
    gw = gateway(listen={"header_timeout": header_timeout, "max_connections": cap})
    url = gw.completions_url()  # before the flood: `engines list` runs in a subprocess
    idle = [connect(gw.port, HALF_HEAD) for _ in range(cap)]
    for _ in range(3):
        status, headers, body = parse(read_until_closed(connect(gw.port, b"GET /-/health HTTP/1.1\r\nHost: a\r\n\r\n"), within=10))
        assert (status, headers["retry-after"], json.loads(body)["error"]["code"]) == (503, "1", "too_many_connections")
    refused = httpx.get(gw.url + "/-/health", timeout=10)
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")

    for sock in idle:  # closed by the server, each with a 408
        status, _, body = parse(read_until_closed(sock, within=header_timeout + 10))
        assert (status, json.loads(body)["error"]["code"]) == (408, "request_timeout")

    assert httpx.get(gw.url + "/-/health", timeout=10).json()["status"] == "ok"
    job_hash, body = portal.new_request(prompt="after the flood")
    assert portal.send(url, body).status_code == 202
    assert [(c.kind, c.body) for c in portal.wait(job_hash, timeout=20).delivered] == [("success", {"result": "echo: after the flood"})]

    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert "gateway_connections_refused_total 4.0" in metrics
    assert 'gateway_connections_closed_total{reason="header_timeout"} 12.0' in metrics
    logs = gw.logs()
    assert f"client connections at most {cap} (listen.max_connections); request head within {header_timeout} s" in logs
    assert "client connections cut off since the last report (refused 1); 12 open of at most 12" in logs
