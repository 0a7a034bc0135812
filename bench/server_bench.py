"""HTTP server choice: uvicorn with the connection guard (gateway/server.py) against plain uvicorn
and Granian, and what each does with clients that never finish a request. Prints a table.

    .venv/bin/pip install granian==2.8.7   # only for this comparison; not a dependency
    .venv/bin/python bench/server_bench.py [--requests 4000] [--rounds 3]

Throughput: the closed loop of bench/accept_bench.py (32 keep-alive connections, the portal
emulator's request bodies), on a) the bare Starlette endpoint (bench/bare_app.py) and b) the
gateway's accept path (`--no-worker`, durable commit), under each server. Rounds alternate the
servers and the median is printed: the machine's two cores are shared with the load generator.

Hygiene probes (header timeout 2 s where the server has one): a connection that sends half a
request head, one that sends nothing, one idle after a response; and whether connections beyond
a cap are answered. Every server runs as its own process on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import TOKEN, Portal, closed_loop, cpu_seconds, gateway_config, print_table, start_process, stop
from gateway.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
PATH = f"/engines/bench/{TOKEN}/completions"
GRANIAN = [
    sys.executable,
    "-m",
    "granian",
    "--interface",
    "asgi",
    "--workers",
    "1",
    "--runtime-threads",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "1",
    "--no-ws",
    "--log-level",
    "warning",
    "--no-access-log",
    "--backlog",
    "2048",
]


def gateway_app() -> Any:
    """Granian's factory target: the gateway's app as `gateway serve --no-worker` builds it."""
    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.runtime import Runtime

    config = load_config(os.environ["GATEWAY_CONFIG"])
    return create_app(config, Runtime(config, with_worker=False))


def serve_uvicorn(target: str, port: int, guarded: bool) -> None:
    """`--serve`: the bare app or the gateway under uvicorn, with or without the guard, as `gateway serve` runs it."""
    import uvicorn

    from gateway.config import ConnectionSettings, load_config
    from gateway.server import bind_socket, server_config

    if target == "bare":
        from bench.bare_app import app

        settings = ConnectionSettings()
    else:
        app, settings = gateway_app(), load_config(os.environ["GATEWAY_CONFIG"]).connections
    sock = bind_socket("127.0.0.1", port, "-")
    options: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 15}
    if guarded:
        config = server_config(app, settings, 768, **options)
    else:
        config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, **options)
    uvicorn.Server(config).run(sockets=[sock])


def start(kind: str, target: str, workdir: Path, config: Path, header_timeout_ms: int = 10000) -> tuple[Any, int]:
    port = free_port()
    env_config = {"GATEWAY_CONFIG": str(config)}
    if kind == "guarded" and target == "gateway":
        args = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port), "--log-level", "WARNING", "--no-worker"]
    elif kind == "granian":
        app = "bench.bare_app:app" if target == "bare" else "bench.server_bench:gateway_app"
        args = [*GRANIAN, "--port", str(port), "--http1-header-read-timeout", str(header_timeout_ms), *(["--factory"] if target != "bare" else []), app]
    else:
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", target, str(port), kind]
    os.environ.update(env_config)
    health = "/-/health" if target == "gateway" else "/"
    proc, _ = start_process(args, port, health, workdir, f"{kind}-{target}-{port}", cwd=workdir if target == "gateway" else ROOT)
    return proc, port


async def probe(port: int, data: bytes, within: float) -> str:
    """What the server does with a connection that sends ``data`` and then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    started = time.perf_counter()
    received = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), within - (time.perf_counter() - started))
            if not chunk:
                status = received[9:12].decode() if received.startswith(b"HTTP/1.1 ") else "no answer"
                return f"closed after {time.perf_counter() - started:.1f} s ({status})"
            received += chunk
    except TimeoutError:
        return f"still open after {within:.0f} s"
    except ConnectionResetError:
        return f"reset after {time.perf_counter() - started:.1f} s"
    finally:
        writer.close()


async def idle_after_response(port: int, within: float) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    started = time.perf_counter()
    try:
        while await asyncio.wait_for(reader.read(65536), within - (time.perf_counter() - started)):
            pass
        return f"closed after {time.perf_counter() - started:.1f} s"
    except TimeoutError:
        return f"still open after {within:.0f} s"
    finally:
        writer.close()


async def beyond_cap(port: int, held: int) -> str:
    """Hold ``held`` half-sent heads, then send one complete request: what does it get?"""
    socks = []
    for _ in range(held):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\n")
        socks.append(sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            answer = head.split(b"\r\n", 1)[0].decode()
            return answer + (" + Retry-After" if b"retry-after" in head.lower() else "")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            return f"no answer ({type(exc).__name__})"
        finally:
            writer.close()
    finally:
        for sock in socks:
            sock.close()


class _Transport(asyncio.Transport):
    """A transport that only counts: the protocol fed in-process, with no socket and no load generator."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closing = 0, False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def protocol_micro(runs: int = 15, requests: int = 5000) -> list[tuple[str, str]]:
    """`--micro`: the guard's own cost. Both protocols are fed the same keep-alive POSTs for the bare
    app on one fake connection; best of ``runs`` (the least disturbed by other processes), and
    Python calls per request from cProfile."""
    import cProfile
    import pstats

    import uvicorn
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from bench.bare_app import app
    from gateway.config import ConnectionSettings
    from gateway.server import server_config

    body = b'{"prompt": "hello"}'
    request = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (PATH.encode(), len(body), body)

    async def feed(protocol_class: Any, config: Any, count: int) -> float:
        state = ServerState()
        protocol = protocol_class(config=config, server_state=state, app_state={})
        protocol.connection_made(_Transport())
        started = time.perf_counter()
        for _ in range(count):
            protocol.data_received(request)
            while state.tasks:
                await asyncio.gather(*list(state.tasks))
        return (time.perf_counter() - started) / count

    async def measure() -> list[tuple[str, str]]:
        plain = uvicorn.Config(app, log_config=None, access_log=False, server_header=False)
        guarded = server_config(app, ConnectionSettings(), 768)
        plain.load()
        guarded.load()
        kinds = {"uvicorn 0.54 (httptools), no guard": (HttpToolsProtocol, plain), "uvicorn 0.54 + guard": (guarded.http_protocol_class, guarded)}
        calls, times = {}, {name: [] for name in kinds}
        for name, (cls, config) in kinds.items():
            await feed(cls, config, 1000)
            profile = cProfile.Profile()
            profile.enable()
            await feed(cls, config, 2000)
            profile.disable()
            calls[name] = pstats.Stats(profile).total_calls / 2000  # type: ignore[attr-defined]
        for run in range(runs):  # alternating, so that neither gains from going first
            for name, (cls, config) in kinds.items() if run % 2 == 0 else reversed(kinds.items()):
                times[name].append(await feed(cls, config, requests))
        return [
            (f"protocol fed in-process: {name}", f"{min(times[name]) * 1e6:.1f} us/request (best of {runs}), {calls[name]:.0f} Python calls/request")
            for name in kinds
        ]

    return uvloop.run(measure())


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (Granian serves from a child process)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_cpu(int(child))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro", action="store_true", help="only the in-process protocol comparison (no servers)")
    parser.add_argument("--serve", nargs=3, metavar=("TARGET", "PORT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        target, port, kind = args.serve
        serve_uvicorn(target, int(port), guarded=kind == "guarded")
        return
    if args.micro:
        print_table(protocol_micro(), f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
        return

    kinds = ["plain", "guarded"] + (["granian"] if shutil.which("granian") or _has_granian() else [])
    workdir = Path(tempfile.mkdtemp(prefix="gateway-server-bench-"))
    procs: list[Any] = []
    rates: dict[tuple[str, str], list[float]] = {(k, t): [] for k in kinds for t in ("bare", "gateway")}
    cpu: dict[tuple[str, str], list[float]] = {(k, t): [] for k in kinds for t in ("bare", "gateway")}
    hygiene: dict[str, list[str]] = {}
    try:
        portal_port = free_port()
        procs.append(
            start_process([sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal")[0]
        )
        portal = Portal(portal_port)
        for round_ in range(args.rounds):
            for target in ("bare", "gateway"):
                for kind in kinds if round_ % 2 == 0 else reversed(kinds):
                    config = gateway_config(workdir, 9, f"{kind}-{target}-{round_}")
                    proc, port = start(kind, target, workdir, config)
                    procs.append(proc)
                    asyncio.run(closed_loop(port, PATH, portal.bodies(500), 32))  # warm-up
                    bodies = portal.bodies(args.requests)
                    before = tree_cpu(proc.pid)
                    rate, _ = asyncio.run(closed_loop(port, PATH, bodies, 32))
                    cpu[(kind, target)].append((tree_cpu(proc.pid) - before) / args.requests)
                    rates[(kind, target)].append(rate)
                    stop(proc)
        for kind in kinds:  # the bare app, header timeout 2 s where the server has one
            proc, port = _start_guarded_probe(workdir) if kind == "guarded" else start(kind, "bare", workdir, workdir, header_timeout_ms=2000)
            procs.append(proc)
            hygiene[kind] = [
                asyncio.run(probe(port, b"POST /x HTTP/1.1\r\nHost: a\r\n", 8)),
                asyncio.run(probe(port, b"", 8)),
                asyncio.run(idle_after_response(port, 12)),
                asyncio.run(beyond_cap(port, 60)),
            ]
            stop(proc)
    finally:
        for proc in procs:
            stop(proc)

    names = {"plain": "uvicorn 0.54 (httptools), no guard", "guarded": "uvicorn 0.54 + guard (gateway serve)", "granian": "granian 2.8.7 (1 worker, 1 thread)"}
    rows = []
    for target, label in (("bare", "bare Starlette endpoint"), ("gateway", "gateway accept, --no-worker")):
        for kind in kinds:
            values = rates[(kind, target)]
            rows.append(
                (
                    f"{label}: {names[kind]}",
                    f"{statistics.median(values):,.0f} req/s, server CPU {statistics.median(cpu[(kind, target)]) * 1e6:.0f} us/req  "
                    f"(runs: {', '.join(f'{v:,.0f}' for v in values)})",
                )
            )
    for kind in kinds:
        half, silent, idle, cap = hygiene[kind]
        rows += [
            (f"{names[kind]}: half-sent head", half),
            (f"{names[kind]}: connection sending nothing", silent),
            (f"{names[kind]}: idle after a response", idle),
            (f"{names[kind]}: request beyond 60 held (cap 50)", cap),
        ]
    print_table(rows, f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.requests} requests per run, median of {args.rounds}; logs in {workdir}")


def _has_granian() -> bool:
    try:
        import granian  # noqa: F401
    except ImportError:
        return False
    return True


def _start_guarded_probe(workdir: Path) -> tuple[Any, int]:
    """The bare app under uvicorn + guard with header timeout 2 s, keep-alive 5 s, cap 50."""
    port = free_port()
    code = (
        "import sys; sys.path.insert(0, %r)\n"  # noqa: UP031 -- a program text with a path and a port filled in
        "from bench.bare_app import app\n"
        "import uvicorn\n"
        "from gateway.config import ConnectionSettings\n"
        "from gateway.server import bind_socket, server_config\n"
        "settings = ConnectionSettings(header_timeout=2, keep_alive_timeout=5, max_connections=50)\n"
        "uvicorn.Server(server_config(app, settings, 50, log_level='warning')).run(sockets=[bind_socket('127.0.0.1', %d, '-')])\n"
    ) % (str(ROOT), port)
    proc, _ = start_process([sys.executable, "-c", code], port, "/", workdir, f"guarded-probe-{port}", cwd=ROOT)
    return proc, port


if __name__ == "__main__":
    main()
