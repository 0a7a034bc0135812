"""Accept-path and end-to-end benchmark. Prints a table; run with `make bench`.

Phases, each bounded in count and time, every server on 127.0.0.1:
1. accept throughput: closed loop, 32 keep-alive connections, against
   a) a bare Starlette endpoint (parse JSON, answer 202: the ceiling),
   b) `gateway serve --no-worker` (durable SQLite commit before each 202),
   c) `gateway serve` with its embedded worker also running every job;
2. accept latency p50/p99 at half of (b)'s throughput, open loop (latency counts from the
   scheduled send time, so queueing is included);
3. end-to-end overhead against an upstream with a fixed 50 ms latency, overhead = callback
   received at the portal emulator - request sent - 50 ms: 5 requests kept in flight (with
   the gateway's CPU per job), bursts of 50 requests sent at once, and 50 kept in flight;
4. start-up to first 200, and idle RSS of the gateway process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.bitrix.protocol import encode_like_php
from gateway.testing import free_port

TOKEN = "bench-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


class Connection:
    """A minimal keep-alive HTTP/1.1 client: the load generator must cost less than the server."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: bytes) -> int:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def print_table(rows: list[tuple[str, str]], footnote: str) -> None:
    """The benchmarks' output: one measure per line, the figure beside it, then a footnote."""
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  figure\n{'-' * width}  {'-' * 40}")
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")
    print(f"\n({footnote})")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Portal:
    """The portal emulator, in a process of its own so its callback timestamps are not
    delayed by the load generator, driven through its control API."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    async def requests(self, count: int, ttl: int = 14400) -> list[tuple[str, bytes]]:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:

            async def one(i: int) -> tuple[str, bytes]:
                answer = (await client.post("/-/requests", json={"prompt": f"bench {i}", "ttl": ttl})).json()
                return answer["hash"], encode_like_php(answer["body"])

            made: list[tuple[str, bytes]] = []
            for start in range(0, count, 200):
                made += await asyncio.gather(*(one(i) for i in range(start, min(count, start + 200))))
            return made

    def bodies(self, count: int) -> list[bytes]:
        return [body for _, body in asyncio.run(self.requests(count))]


async def closed_loop(port: int, path: str, payloads: list[bytes], connections: int) -> tuple[float, list[float]]:
    conns = [await Connection(port).open() for _ in range(connections)]
    latencies: list[float] = []
    items = iter(payloads)

    async def run(conn: Connection) -> None:
        for body in items:
            start = time.perf_counter()
            status = await conn.post(path, body)
            latencies.append(time.perf_counter() - start)
            assert status == 202, status

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return len(payloads) / elapsed, latencies


async def open_loop(port: int, path: str, payloads: list[bytes], rate: float) -> list[float]:
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(64):
        pool.put_nowait(await Connection(port).open())
    latencies: list[float] = []

    async def one(body: bytes, scheduled: float) -> None:
        conn = await pool.get()
        status = await conn.post(path, body)
        latencies.append(time.perf_counter() - scheduled)
        pool.put_nowait(conn)
        assert status == 202, status

    started = time.perf_counter()
    tasks = []
    for i, body in enumerate(payloads):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, scheduled)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return latencies


def start_process(args: list[str], port: int, health: str, workdir: Path, name: str, *, cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], float]:
    """Start a server (in ``cwd``, default ``workdir``), its output in ``workdir/<name>.log``; wait until it answers."""
    log = open(workdir / f"{name}.log", "wb")
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or workdir)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code < 500:
                return proc, time.perf_counter() - started
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.perf_counter() - started > 30:
            raise RuntimeError(f"{name} did not start; see {workdir / (name + '.log')}")
        time.sleep(0.005)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server and wait for it, so that its shutdown work does not overlap the next phase."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """The process and its children (``serve --processes N`` forks N servers under one parent)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gateway_config(workdir: Path, upstream_port: int, name: str, concurrency: int = 64, **overrides: Any) -> Path:
    """The bench's gateway config in ``workdir``; ``overrides`` replace top-level keys (``queue``, ``public_url``)."""
    config: dict[str, Any] = {
        "public_url": "http://127.0.0.1:0",
        "data_dir": str(workdir / name),
        "workers": {"concurrency": concurrency},
        "security": {"allowed_portals": ["127.0.0.1"], "allow_private_networks": True},
        "providers": {"up": {"type": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1"}},
        "engines": [{"code": "bench", "category": "text", "token": TOKEN, "route": [{"provider": "up", "model": "m"}]}],
        **overrides,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_gateway(workdir: Path, config: Path, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], int, float]:
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port), "--log-level", "WARNING", *extra]
    proc, startup = start_process(args, port, "/-/health", workdir, name)
    return proc, port, startup


async def end_to_end(
    port: int, portal: Portal, count: int, in_flight: int, upstream_delay: float, burst_pause: float | None, path: str = f"/engines/bench/{TOKEN}/completions"
) -> tuple[list[float], float]:
    """Overheads (callback received - request sent - upstream latency) and jobs per second.

    With ``burst_pause``, ``in_flight`` requests leave at once, all callbacks are awaited,
    then a pause; without, each of ``in_flight`` connections sends its next request as soon
    as its previous one's callback arrived (sustained load).
    """
    made = await portal.requests(count)  # first: connections opened before it could idle past the gateway's header timeout
    conns = [await Connection(port).open() for _ in range(in_flight)]
    overheads: list[float] = []

    async def one(conn: Connection, client: httpx.AsyncClient, job_hash: str, body: bytes) -> None:
        sent = time.time()
        assert await conn.post(path, body) == 202
        job = (await client.get(f"/-/requests/{job_hash}", params={"wait": 30})).json()
        delivered = [c for c in job["callbacks"] if c["accepted"]]
        assert delivered and delivered[0]["kind"] == "success", job
        overheads.append(delivered[0]["at"] - sent - upstream_delay)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=portal.url, timeout=40, limits=httpx.Limits(max_connections=in_flight)) as client:
        if burst_pause is None:
            pending = iter(made)

            async def run(conn: Connection) -> None:
                for job_hash, body in pending:
                    await one(conn, client, job_hash, body)

            await asyncio.gather(*(run(c) for c in conns))
        else:
            for start in range(0, count, in_flight):
                burst = made[start : start + in_flight]
                sent: dict[str, float] = {}

                async def send(conn: Connection, job_hash: str, body: bytes, sent: dict[str, float]) -> None:
                    sent[job_hash] = time.time()
                    assert await conn.post(path, body) == 202

                await asyncio.gather(*(send(conn, h, b, sent) for conn, (h, b) in zip(conns, burst, strict=False)))
                done = (await client.post("/-/wait", json={"hashes": list(sent), "timeout": 30})).json()
                for job_hash, callbacks in done.items():
                    delivered = [c for c in callbacks if c["accepted"]]
                    assert delivered and delivered[0]["kind"] == "success", callbacks
                    overheads.append(delivered[0]["at"] - sent[job_hash] - upstream_delay)
                await asyncio.sleep(burst_pause)
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return overheads, count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6000, help="requests per throughput run")
    parser.add_argument("--e2e-requests", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="also run the 50-in-flight load on `serve --processes N` (0: skip)")
    args = parser.parse_args()
    multi: tuple[list[float], float, float] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    path = f"/engines/bench/{TOKEN}/completions"
    try:
        portal_port, fast_port, slow_port, bare_port = free_port(), free_port(), free_port(), free_port()
        procs.append(
            start_process([sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal")[0]
        )
        portal = Portal(portal_port)
        for port, delay in ((fast_port, "0"), (slow_port, "0.05")):
            procs.append(
                start_process([sys.executable, "-m", "gateway.testing", "--port", str(port), "--delay", delay], port, "/", workdir, f"upstream-{port}")[0]
            )

        proc, _ = start_process(
            [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(bare_port), "--log-level", "warning", "--no-access-log"],
            bare_port,
            "/",
            workdir,
            "bare",
            cwd=ROOT,
        )
        procs.append(proc)
        asyncio.run(closed_loop(bare_port, path, portal.bodies(500), 32))  # warm-up
        bare_rps, _ = asyncio.run(closed_loop(bare_port, path, portal.bodies(args.requests), 32))
        stop(proc)

        gw, gw_port, startup = start_gateway(workdir, gateway_config(workdir, fast_port, "accept-only"), "gateway-accept-only", "--no-worker")
        procs.append(gw)
        time.sleep(1.0)
        idle_rss = rss_mb(gw.pid)
        asyncio.run(closed_loop(gw_port, path, portal.bodies(500), 32))
        gw_rps, _ = asyncio.run(closed_loop(gw_port, path, portal.bodies(args.requests), 32))
        rate = gw_rps / 2
        latencies = asyncio.run(open_loop(gw_port, path, portal.bodies(int(rate * 5)), rate))
        stop(gw)

        gw, gw_port, _ = start_gateway(workdir, gateway_config(workdir, fast_port, "embedded-worker"), "gateway-embedded")
        procs.append(gw)
        full_rps, _ = asyncio.run(closed_loop(gw_port, path, portal.bodies(args.requests), 32))
        gw.kill()  # its backlog of thousands of jobs must not run on into the next phase
        gw.wait()

        gw, gw_port, _ = start_gateway(workdir, gateway_config(workdir, slow_port, "e2e"), "gateway-e2e")
        procs.append(gw)
        asyncio.run(end_to_end(gw_port, portal, 200, 50, 0.05, None))  # warm-up
        cpu_before = cpu_seconds(gw.pid)
        light, light_rate = asyncio.run(end_to_end(gw_port, portal, args.e2e_requests // 2, 5, 0.05, None))
        cpu_per_job = (cpu_seconds(gw.pid) - cpu_before) / (args.e2e_requests // 2)
        bursts, _ = asyncio.run(end_to_end(gw_port, portal, args.e2e_requests, 50, 0.05, 0.5))
        sustained, sustained_rate = asyncio.run(end_to_end(gw_port, portal, args.e2e_requests, 50, 0.05, None))
        loaded_rss = rss_mb(gw.pid)
        stop(gw)

        if args.processes > 1:
            gw, gw_port, _ = start_gateway(
                workdir, gateway_config(workdir, slow_port, "e2e-processes"), "gateway-processes", "--processes", str(args.processes)
            )
            procs.append(gw)
            asyncio.run(end_to_end(gw_port, portal, 200, 50, 0.05, None))  # warm-up
            cpu_before = tree_cpu_seconds(gw.pid)
            spread, spread_rate = asyncio.run(end_to_end(gw_port, portal, args.e2e_requests, 50, 0.05, None))
            multi = (spread, spread_rate, (tree_cpu_seconds(gw.pid) - cpu_before) / args.e2e_requests)
    finally:
        for proc in procs:
            stop(proc)

    ms = 1000
    rows = [
        ("bare Starlette endpoint (parse JSON, 202)", f"{bare_rps:,.0f} req/s"),
        ("gateway accept, --no-worker (durable commit)", f"{gw_rps:,.0f} req/s  ({gw_rps / bare_rps:.0%} of bare)"),
        ("gateway accept, embedded worker also running jobs", f"{full_rps:,.0f} req/s  ({full_rps / bare_rps:.0%} of bare)"),
        (
            f"accept latency at {rate:,.0f} req/s (half of --no-worker)",
            f"p50 {statistics.median(latencies) * ms:.2f} ms, p99 {percentile(latencies, 0.99) * ms:.2f} ms",
        ),
        (
            "end-to-end overhead, 5 always in flight, upstream 50 ms",
            f"p50 {statistics.median(light) * ms:.1f} ms, p99 {percentile(light, 0.99) * ms:.1f} ms, {light_rate:,.0f} jobs/s",
        ),
        ("gateway CPU per job (accept, upstream call, callback)", f"{cpu_per_job * ms:.1f} ms"),
        ("end-to-end overhead, bursts of 50, upstream 50 ms", f"p50 {statistics.median(bursts) * ms:.1f} ms, p99 {percentile(bursts, 0.99) * ms:.1f} ms"),
        (
            "end-to-end overhead, 50 always in flight",
            f"p50 {statistics.median(sustained) * ms:.1f} ms, p99 {percentile(sustained, 0.99) * ms:.1f} ms, {sustained_rate:,.0f} jobs/s",
        ),
        *(
            [
                (
                    f"end-to-end overhead, 50 in flight, serve --processes {args.processes}",
                    f"p50 {statistics.median(multi[0]) * ms:.1f} ms, p99 {percentile(multi[0], 0.99) * ms:.1f} ms, {multi[1]:,.0f} jobs/s, CPU {multi[2] * ms:.1f} ms/job",
                )
            ]
            if multi
            else []
        ),
        ("start-up to first 200 (gateway serve)", f"{startup:.2f} s"),
        ("RSS idle / after the end-to-end run", f"{idle_rss:.0f} MB / {loaded_rss:.0f} MB"),
    ]
    print_table(rows, f"python {sys.version.split()[0]}, {os.cpu_count()} cores; logs in {workdir}")


if __name__ == "__main__":
    main()
