"""Candidate levers for the gateway's CPU per job, measured side by side without changing the gateway.

Run: `.venv/bin/python bench/levers.py` (bounded: about a minute). Each figure is CPU time of
this process only (``time.process_time``), per request or per call, in microseconds; the best of
``--repeats`` runs, so that other work on a shared machine inflates it as little as possible.

1. HTTP clients: POST a chat completion (the openai adapter's body) to the FakeOpenAI stub (its
   own process, no delay) and read the JSON answer, ``--requests`` requests at 1 and at 50
   concurrent, keep-alive, on asyncio's loop and on uvloop:
   httpx with its default transport (httpcore on anyio), httpx on the gateway's transport
   (``gateway.http.transport``: httpcore on asyncio streams, what the adapter and the deliverer
   use today), httpx on ``httpx-aiohttp``'s transport, aiohttp's own client, and a minimal
   hand-written HTTP/1.1 client (the floor for Python on that loop).
2. JSON: ``json`` against ``orjson`` for a portal request body (loads) and a callback body (dumps).
3. Logging: the four INFO lines a job writes (accepted, outcome, callback attempt, final) through
   the gateway's redacting handler, against the same calls at WARNING (filtered out).
4. Metrics: a prometheus_client counter ``inc`` and histogram ``observe`` on a labelled child.

Optional packages (measured only when installed; not gateway dependencies): ``httpx-aiohttp``,
``orjson``. ``aiohttp`` comes with litellm's plugin.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.accept_bench import start_process, stop  # noqa: E402
from gateway import http  # noqa: E402
from gateway.testing import free_port  # noqa: E402

CHAT = {
    "model": "m",
    "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Write a short greeting for our clients"}],
}
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


class RawClient:
    """Keep-alive HTTP/1.1 over asyncio streams, a pool of connections: no client library at all."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> Any:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        answer = json.loads(await reader.readexactly(length))
        self.idle.append(conn)
        return answer

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def run_client(kind: str, port: int, requests: int, concurrency: int) -> float:
    """CPU microseconds of this process per request, warm connections."""
    base = f"http://127.0.0.1:{port}/v1/"
    body = json.dumps(CHAT).encode()
    client: Any
    post: Callable[[], Awaitable[Any]]
    if kind == "raw":
        client = RawClient(port)

        async def post() -> Any:
            return await client.post("/v1/chat/completions", body)

    elif kind == "aiohttp":
        import aiohttp

        client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}", connector=aiohttp.TCPConnector(limit=100))

        async def post() -> Any:
            async with client.post("/v1/chat/completions", json=CHAT) as response:
                return await response.json()

    else:
        if kind == "httpx default transport":
            transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(limits=LIMITS)
        elif kind == "httpx + gateway.http transport (today)":
            transport = http.transport(limits=LIMITS)
        else:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=LIMITS)
        client = httpx.AsyncClient(transport=transport, base_url=base, timeout=httpx.Timeout(30, connect=5))

        async def post() -> Any:
            response = await client.post("chat/completions", json=CHAT)
            return response.json()

    async def batch(n: int) -> None:
        queue = iter(range(n))

        async def lane() -> None:
            for _ in queue:
                answer = await post()
                assert answer["choices"][0]["message"]["content"], answer

        await asyncio.gather(*(lane() for _ in range(concurrency)))

    try:
        await batch(max(200, concurrency * 2))  # warm-up: connections open, code paths hot
        started = time.process_time()
        await batch(requests)
        return (time.process_time() - started) / requests * 1e6
    finally:
        await client.close() if kind == "aiohttp" else await client.aclose()


def client_kinds() -> list[str]:
    kinds = ["raw", "aiohttp", "httpx default transport", "httpx + gateway.http transport (today)"]
    try:
        import httpx_aiohttp  # noqa: F401

        kinds.append("httpx + httpx-aiohttp transport")
    except ImportError:
        print("httpx-aiohttp is not installed: skipped (pip install httpx-aiohttp==0.2.0)", file=sys.stderr)
    return kinds


def measure_clients(port: int, requests: int, repeats: int) -> list[tuple[str, str]]:
    import uvloop

    rows = []
    for kind in client_kinds():
        for concurrency in (1, 50):
            figures = []
            for loop_name, runner in (("asyncio", asyncio.run), ("uvloop", uvloop.run)):
                best = min(runner(run_client(kind, port, requests, concurrency)) for _ in range(repeats))
                figures.append(f"{loop_name} {best:5.0f}")
            rows.append((f"POST + JSON answer, {kind}, {concurrency} concurrent", " us, ".join(figures) + " us per request"))
    return rows


def best_of(fn: Callable[[], object], number: int, repeats: int) -> float:
    """Microseconds per call, best of ``repeats``."""
    return min(timeit.repeat(fn, number=number, repeat=repeats, timer=time.process_time)) / number * 1e6


def measure_json(repeats: int) -> list[tuple[str, str]]:
    from gateway.bitrix import protocol
    from gateway.bitrix.simulator import PortalEmulator

    emulator = PortalEmulator()
    emulator.url = "http://127.0.0.1:9"
    _, request = emulator.new_request()
    raw = protocol.encode_like_php(request)
    callback = {"result": "x" * 600, "data": {"type": "text"}}  # about the size of a short answer
    rows = [
        ("portal request body, json.loads", f"{best_of(lambda: json.loads(raw), 20000, repeats):.2f} us  ({len(raw)} bytes)"),
        ("callback body (600 chars), json.dumps().encode()", f"{best_of(lambda: json.dumps(callback).encode(), 20000, repeats):.2f} us"),
        ("chat completion body, json.dumps().encode()", f"{best_of(lambda: json.dumps(CHAT).encode(), 20000, repeats):.2f} us"),
    ]
    try:
        import orjson
    except ImportError:
        print("orjson is not installed: skipped (pip install orjson==3.13.0)", file=sys.stderr)
        return rows
    rows[0:0] = []
    rows += [
        ("portal request body, orjson.loads", f"{best_of(lambda: orjson.loads(raw), 20000, repeats):.2f} us"),
        ("callback body, orjson.dumps", f"{best_of(lambda: orjson.dumps(callback), 20000, repeats):.2f} us"),
        ("chat completion body, orjson.dumps", f"{best_of(lambda: orjson.dumps(CHAT), 20000, repeats):.2f} us"),
    ]
    return rows


def measure_logging(repeats: int) -> list[tuple[str, str]]:
    """The per-job INFO lines through the gateway's handler (to a file, as stderr would be redirected)."""
    from gateway.redaction import Redactor, configure_logging

    redactor = Redactor()
    redactor.add("bench-token-0123456789abcdef")
    configure_logging(redactor, "INFO")
    sink = tempfile.TemporaryFile("w")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(sink)
    accept, worker = logging.getLogger("gateway.accept"), logging.getLogger("gateway.worker")

    def four_lines() -> None:
        accept.info("accepted job %s engine=%s category=%s ttl=%s", "01JABCDEF0123456789ABCDEFG", "bench", "text", 14400)
        worker.info("job %s engine=%s outcome=%s", "01JABCDEF0123456789ABCDEFG", "bench", "result")
        worker.info("job %s callback attempt %d: %s", "01JABCDEF0123456789ABCDEFG", 1, "portal answered data:true")
        worker.info("job %s engine=%s final=%s", "01JABCDEF0123456789ABCDEFG", "bench", "delivered")

    at_info = best_of(four_lines, 5000, repeats)
    logging.getLogger().setLevel("WARNING")
    at_warning = best_of(four_lines, 5000, repeats)
    sink.close()
    logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]
    return [
        ("4 job log lines at INFO (written, redacted)", f"{at_info:.1f} us per job"),
        ("the same 4 calls at WARNING (filtered)", f"{at_warning:.1f} us per job"),
    ]


def measure_metrics(repeats: int) -> list[tuple[str, str]]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    counter = Counter("c", "c", ["engine", "category"], registry=registry).labels("bench", "text")
    histogram = Histogram("h", "h", ["host"], registry=registry)
    child = histogram.labels("127.0.0.1")
    return [
        ("prometheus counter.inc() on a cached child", f"{best_of(counter.inc, 100000, repeats):.2f} us"),
        ("prometheus histogram.observe() on a cached child", f"{best_of(lambda: child.observe(0.05), 100000, repeats):.2f} us"),
        ("prometheus histogram.labels(host).observe()", f"{best_of(lambda: histogram.labels('127.0.0.1').observe(0.05), 100000, repeats):.2f} us"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per client run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    rows += measure_json(args.repeats)
    rows += measure_logging(args.repeats)
    rows += measure_metrics(args.repeats)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-levers-"))
    port = free_port()
    stub: subprocess.Popen[bytes] = start_process(
        [sys.executable, "-m", "gateway.testing", "--port", str(port), "--delay", "0"], port, "/", workdir, "upstream"
    )[0]
    try:
        rows += measure_clients(port, args.requests, args.repeats)
    finally:
        stop(stub)
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  CPU of this process\n{'-' * width}  {'-' * 40}")
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")
    print(f"\n(python {sys.version.split()[0]}; best of {args.repeats}; {args.requests} requests per client run; the machine's cores shared with other work)")


if __name__ == "__main__":
    main()
