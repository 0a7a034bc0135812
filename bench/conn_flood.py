"""Idle-connection flood (issue 12, item 5): connections that send half a request head and stop,
against a `gateway serve --no-worker` held at a file limit of 1024, then legitimate requests.

    .venv/bin/python bench/conn_flood.py [--idle 1100] [--legit 159] [--tree DIR]

Phases, all on 127.0.0.1 and bounded in count and time: open ``--idle`` connections that each
send ``POST /x HTTP/1.1\\r\\nHost: a\\r\\n`` and nothing more; send ``--legit`` completions POSTs
(a new connection each, 5 s timeout, 8 at a time) and count the answers; wait for the header
timeout (+2 s) and send as many again. ``--tree DIR`` runs the gateway from another checkout
(e.g. the code before the fix) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import TOKEN, Portal, print_table, start_process, stop
from gateway.testing import free_port

PATH = f"/engines/bench/{TOKEN}/completions"


async def legit(port: int, bodies: list[bytes], timeout: float = 5.0, parallel: int = 8) -> collections.Counter[str]:
    """One completions POST per new connection; the outcome of each: its status, or how it failed."""
    outcomes: collections.Counter[str] = collections.Counter()
    pending = iter(bodies)

    async def one(body: bytes) -> str:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            writer.write(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status = head[9:12].decode()
            return status + (" + Retry-After" if b"retry-after" in head.lower() else "")
        except TimeoutError:
            return "no answer in 5 s"
        except (OSError, asyncio.IncompleteReadError) as exc:
            return type(exc).__name__
        finally:
            if writer is not None:
                writer.close()

    async def worker() -> None:
        for body in pending:
            outcomes[await one(body)] += 1

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return outcomes


async def flood(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, TimeoutError):
            continue
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\n")
        writers.append(writer)
    await asyncio.sleep(0.5)
    return writers


async def run(
    port: int, idle: int, during: list[bytes], after: list[bytes], wait: float
) -> tuple[int, collections.Counter[str], collections.Counter[str], float]:
    writers = await flood(port, idle)
    started = time.perf_counter()
    first = await legit(port, during)
    elapsed = time.perf_counter() - started
    await asyncio.sleep(max(0.0, wait - elapsed))
    second = await legit(port, after)
    for writer in writers:
        writer.close()
    return len(writers), first, second, elapsed


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--legit", type=int, default=159)
    parser.add_argument("--file-limit", type=int, default=1024, help="the gateway's soft and hard RLIMIT_NOFILE")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--tree", type=Path, help="run the gateway from this checkout instead")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the load generator holds the idle connections
    workdir = Path(tempfile.mkdtemp(prefix="gateway-flood-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        portal_port, port = free_port(), free_port()
        procs.append(
            start_process([sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal")[0]
        )
        bodies = Portal(portal_port).bodies(2 * args.legit)
        config = {
            "public_url": f"http://127.0.0.1:{port}",
            "data_dir": str(workdir / "var"),
            "security": {"allowed_portals": ["127.0.0.1"], "allow_private_networks": True},
            "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "engines": [{"code": "bench", "category": "text", "token": TOKEN, "route": [{"provider": "up", "model": "m"}]}],
        }
        if args.tree is None:
            config["listen"] = {"header_timeout": args.header_timeout}
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, PYTHONPATH=str(args.tree.resolve())) if args.tree else None
        limit = args.file_limit

        def at_file_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        log = open(workdir / "gateway.log", "wb")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--no-worker", "--config", str(workdir / "gateway.yaml"), "--port", str(port), "--log-level", "WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            preexec_fn=at_file_limit,
        )
        procs.append(gateway)
        wait_healthy(gateway, port)
        opened, during, after, took = asyncio.run(run(port, args.idle, bodies[: args.legit], bodies[args.legit :], args.header_timeout + 2))
    finally:
        for proc in procs:
            stop(proc)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def show(outcomes: collections.Counter[str]) -> str:
        return ", ".join(f"{status}: {count}" for status, count in outcomes.most_common())

    print_table(
        [
            ("gateway", f"{args.tree or 'this checkout'}, file limit {args.file_limit}, header timeout {args.header_timeout:g} s"),
            ("idle connections opened (half-sent heads)", f"{opened}"),
            (f"{args.legit} completions POSTs during the flood", f"{show(during)}  ({took:.1f} s)"),
            (f"{args.legit} completions POSTs {args.header_timeout + 2:g} s after it began", show(after)),
        ],
        f"python {sys.version.split()[0]}; logs in {workdir}",
    )


if __name__ == "__main__":
    main()
