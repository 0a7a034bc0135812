"""Scale-out benchmark: SQLite (1 node) against PostgreSQL (1, 2, 3 nodes) on this machine, in one run.
Prints a table; run with `make bench-scale`.

Every server is its own process on 127.0.0.1: a throw-away PostgreSQL cluster
(gateway/testing/postgres.py, durable commits), the portal emulator (its control API), an
OpenAI-compatible stub with a fixed latency that records when each call arrives, and the gateway
nodes (`gateway serve` with its embedded worker, each with its own data_dir, one database per
configuration). Per configuration, bounded in count:

1. a burst of --requests completions POSTs over 32 keep-alive connections spread round-robin
   over the nodes (closed loop): accept throughput and accept latency p50/p99 (202 received -
   request sent, so the wait behind 31 other clients is included); then every callback is
   awaited: end-to-end jobs/s = jobs / (last callback - first request sent);
2. a light load, --light-requests at --light-rate req/s (open loop): accept -> upstream start
   (the stub's arrival time of the call - request sent), p50 and p99. This is where a worker
   that waited for its poll would show; an extra configuration, `serve --no-worker` + one
   `gateway worker` (every job crosses processes through LISTEN/NOTIFY), shows the wake-up.

The load generator, the emulator, the stub, PostgreSQL and every node share this machine's
cores: on 2 cores more nodes add processes to schedule, not CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import TOKEN, Connection, gateway_config, percentile, start_process, stop
from gateway.bitrix.protocol import encode_like_php
from gateway.testing import free_port
from gateway.testing.postgres import PostgresServer
from gateway.testing.upstream import FakeOpenAI

PATH = f"/engines/bench/{TOKEN}/completions"
CONNECTIONS = 32
SHARED_URL = "https://gateway.example.test"


class TimedUpstream(FakeOpenAI):
    """The stub, recording when each chat completion arrives (by its prompt), served in its own process."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.arrivals: dict[str, float] = {}
        self.app.add_route("/-/arrivals", self._arrivals, methods=["POST"])

    async def _chat(self, request: Request) -> Any:
        arrived = time.time()
        body = await request.json()  # cached on the request: the parent reads the same object
        prompt = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        self.arrivals.setdefault(prompt, arrived)
        self.requests.clear()  # the parent keeps every body; a benchmark does not need them
        return await super()._chat(request)

    async def _arrivals(self, request: Request) -> Response:
        """``POST /-/arrivals [prompt, ...]`` -> ``{prompt: arrival time}`` for those that arrived."""
        wanted = await request.json()
        return JSONResponse({p: self.arrivals[p] for p in wanted if p in self.arrivals})


def serve_upstream(port: int, delay: float) -> None:
    import uvicorn

    uvicorn.run(TimedUpstream(delay).app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@dataclass
class Sent:
    prompt: str
    body: bytes
    sent: float = 0.0
    accepted: float = 0.0
    status: int = 0


@dataclass
class Result:
    name: str
    accept_rps: float = 0.0
    accept_latencies: list[float] = field(default_factory=list)
    jobs_per_s: float = 0.0
    to_upstream: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, workdir: Path, portal_url: str, upstream_url: str) -> None:
        self.workdir, self.portal_url, self.upstream_url = workdir, portal_url, upstream_url
        self.done: list[str] = []

    async def make_requests(self, prefix: str, count: int) -> dict[str, Sent]:
        """Fresh portal requests, each with a unique prompt (the stub's key for its arrival time)."""
        async with httpx.AsyncClient(base_url=self.portal_url, timeout=30) as client:

            async def one(i: int) -> tuple[str, Sent]:
                prompt = f"{prefix} {i}"
                answer = (await client.post("/-/requests", json={"prompt": prompt})).json()
                return answer["hash"], Sent(prompt, encode_like_php(answer["body"]))

            made: dict[str, Sent] = {}
            for start in range(0, count, 200):
                made.update(await asyncio.gather(*(one(i) for i in range(start, min(count, start + 200)))))
            return made

    async def burst(self, ports: list[int], requests: dict[str, Sent]) -> float:
        """Closed loop over 32 connections spread over the nodes; returns requests/s."""
        conns = [await Connection(ports[i % len(ports)]).open() for i in range(CONNECTIONS)]
        items = iter(requests.values())

        async def run(conn: Connection) -> None:
            for item in items:
                item.sent = time.time()
                item.status = await conn.post(PATH, item.body)
                item.accepted = time.time()

        started = time.perf_counter()
        await asyncio.gather(*(run(c) for c in conns))
        elapsed = time.perf_counter() - started
        for c in conns:
            c.close()
        refused = [r.status for r in requests.values() if r.status != 202]
        if refused:
            raise RuntimeError(f"{len(refused)} request(s) not accepted: statuses {sorted(set(refused))}; logs in {self.workdir}")
        return len(requests) / elapsed

    async def paced(self, ports: list[int], requests: dict[str, Sent], rate: float) -> None:
        """Open loop at ``rate`` req/s, round-robin over the nodes."""
        pools = [[await Connection(port).open() for _ in range(4)] for port in ports]
        free: list[asyncio.Queue[Connection]] = []
        for pool in pools:
            queue: asyncio.Queue[Connection] = asyncio.Queue()
            for conn in pool:
                queue.put_nowait(conn)
            free.append(queue)

        async def one(item: Sent, node: int) -> None:
            conn = await free[node].get()
            item.sent = time.time()
            item.status = await conn.post(PATH, item.body)
            item.accepted = time.time()
            free[node].put_nowait(conn)

        started = time.perf_counter()
        tasks = []
        for i, item in enumerate(requests.values()):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(item, i % len(ports))))
        await asyncio.gather(*tasks)
        for pool in pools:
            for conn in pool:
                conn.close()

    async def delivered(self, requests: dict[str, Sent], timeout: float) -> dict[str, float]:
        """The time each request's callback reached the portal; raises if one is missing."""
        async with httpx.AsyncClient(base_url=self.portal_url, timeout=timeout + 30) as client:
            answer = (await client.post("/-/wait", json={"hashes": list(requests), "timeout": timeout})).json()
        times: dict[str, float] = {}
        for job_hash, callbacks in answer.items():
            taken = [c for c in callbacks if c["accepted"]]
            if not taken or taken[0]["kind"] != "success":
                raise RuntimeError(f"a job was not delivered within {timeout:g} s: {callbacks}; logs in {self.workdir}")
            times[job_hash] = taken[0]["at"]
        return times

    async def arrivals(self, requests: dict[str, Sent]) -> dict[str, float]:
        async with httpx.AsyncClient(base_url=self.upstream_url, timeout=30) as client:
            found: dict[str, float] = (await client.post("/-/arrivals", json=[r.prompt for r in requests.values()])).json()
        return found

    def run(self, name: str, ports: list[int], count: int, light_count: int, light_rate: float) -> Result:
        result = Result(name)
        slug = f"run {len(self.done)}"  # prompts unique across configurations: the stub keys arrivals by prompt
        self.done.append(name)
        warm = asyncio.run(self.make_requests(f"{slug} warm-up", 200))
        asyncio.run(self.burst(ports, warm))
        asyncio.run(self.delivered(warm, 120))

        burst = asyncio.run(self.make_requests(f"{slug} burst", count))
        result.accept_rps = asyncio.run(self.burst(ports, burst))
        result.accept_latencies = [r.accepted - r.sent for r in burst.values()]
        callbacks = asyncio.run(self.delivered(burst, 300))
        first_sent = min(r.sent for r in burst.values())
        result.jobs_per_s = count / (max(callbacks.values()) - first_sent)

        light = asyncio.run(self.make_requests(f"{slug} light", light_count))
        asyncio.run(self.paced(ports, light, light_rate))
        if any(r.status != 202 for r in light.values()):
            raise RuntimeError(f"light load: statuses {sorted({r.status for r in light.values()})}; logs in {self.workdir}")
        asyncio.run(self.delivered(light, 60))
        arrived = asyncio.run(self.arrivals(light))
        result.to_upstream = [arrived[r.prompt] - r.sent for r in light.values()]
        return result


def node_config(workdir: Path, name: str, upstream_port: int, queue: dict[str, Any]) -> Path:
    return gateway_config(workdir, upstream_port, name, public_url=SHARED_URL, queue=queue)


def start_nodes(workdir: Path, configs: list[Path], extra: tuple[str, ...] = ()) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """``gateway serve`` per config, each waited for until it answers."""
    ports = [free_port() for _ in configs]
    procs: list[subprocess.Popen[bytes]] = []
    for config, port in zip(configs, ports, strict=True):
        args = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port), "--log-level", "WARNING", *extra]
        procs.append(start_process(args, port, "/-/health", workdir, config.stem)[0])
    return procs, ports


def start_worker(workdir: Path, config: Path) -> subprocess.Popen[bytes]:
    log_path = workdir / f"{config.stem}-worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "worker", "--config", str(config), "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while b"processing jobs from" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gateway worker did not start; see {log_path}")
        time.sleep(0.05)
    return proc


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"


def print_table(results: list[Result], command: str, footnote: str) -> None:
    header = ("configuration", "accept req/s", "accept p50", "accept p99", "end-to-end jobs/s", "accept→upstream p50", "p99")
    rows = [
        (
            r.name,
            f"{r.accept_rps:,.0f}",
            ms(statistics.median(r.accept_latencies)),
            ms(percentile(r.accept_latencies, 0.99)),
            f"{r.jobs_per_s:,.0f}",
            ms(statistics.median(r.to_upstream)),
            ms(percentile(r.to_upstream, 0.99)),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print(f"$ {command}")
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    print(f"\n({footnote})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests in each configuration's burst")
    parser.add_argument("--light-requests", type=int, default=200, help="requests of the light-load phase")
    parser.add_argument("--light-rate", type=float, default=40.0, help="requests per second of the light-load phase")
    parser.add_argument("--upstream-delay", type=float, default=0.05, help="the stub's latency, seconds")
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--pool-size", type=int, help="queue.pool_size of the PostgreSQL nodes (default: the gateway's, 10)")
    parser.add_argument("--only", metavar="TEXT", help="only the configurations whose name contains TEXT (e.g. postgres)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the stub's own process
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.upstream_delay)
        return

    command = "make bench-scale  # " + shlex.join(["python", "bench/scale.py", *sys.argv[1:]])
    workdir = Path(tempfile.mkdtemp(prefix="gateway-scale-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: list[Result] = []
    with PostgresServer() as postgres:
        try:
            portal_port, upstream_port = free_port(), free_port()
            procs.append(
                start_process(
                    [sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal"
                )[0]
            )
            procs.append(
                start_process(
                    [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(upstream_port), "--upstream-delay", str(args.upstream_delay)],
                    upstream_port,
                    "/-/none",
                    workdir,
                    "upstream",
                )[0]
            )
            bench = Bench(workdir, f"http://127.0.0.1:{portal_port}", f"http://127.0.0.1:{upstream_port}")

            def measure(name: str, start: Callable[[], tuple[list[subprocess.Popen[bytes]], list[int]]]) -> None:
                if args.only and args.only not in name:
                    return
                print(f"measuring: {name} ...", file=sys.stderr, flush=True)
                nodes, ports = start()
                try:
                    results.append(bench.run(name, ports, args.requests, args.light_requests, args.light_rate))
                finally:
                    for proc in nodes:
                        stop(proc)

            def postgres_queue(database: str) -> dict[str, Any]:
                queue: dict[str, Any] = {"backend": "postgres", "dsn": postgres.create_database(database)}
                if args.pool_size:
                    queue["pool_size"] = args.pool_size
                return queue

            measure("sqlite, 1 node", lambda: start_nodes(workdir, [node_config(workdir, "sqlite", upstream_port, {"backend": "sqlite"})]))
            for count in range(1, args.max_nodes + 1):

                def cluster(count: int = count) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
                    queue = postgres_queue(f"scale_{count}")
                    return start_nodes(workdir, [node_config(workdir, f"pg{count}-node{i}", upstream_port, queue) for i in range(count)])

                measure(f"postgres, {count} node{'s' if count > 1 else ''}", cluster)

            def split() -> tuple[list[subprocess.Popen[bytes]], list[int]]:
                config = node_config(workdir, "pg-split", upstream_port, postgres_queue("scale_split"))
                nodes, ports = start_nodes(workdir, [config], ("--no-worker",))
                return [*nodes, start_worker(workdir, config)], ports

            measure("postgres, serve --no-worker + 1 worker", split)
        finally:
            for proc in procs:
                stop(proc)
    print_table(
        results,
        command,
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores shared by every process; {CONNECTIONS} connections; upstream latency "
        f"{args.upstream_delay * 1000:.0f} ms; light load {args.light_requests} at {args.light_rate:g} req/s; PostgreSQL poll_interval 5 s (default), pool_size {args.pool_size or 10}; "
        f"logs in {workdir}",
    )


if __name__ == "__main__":
    main()
