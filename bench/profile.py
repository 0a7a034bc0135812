"""Where the gateway's CPU per text job goes: the end-to-end bench's load under py-spy. Run with `make profile`.

The processes are ``bench/accept_bench.py``'s, each its own process on 127.0.0.1: the portal
emulator, the FakeOpenAI stub (fixed upstream delay), and ``gateway serve`` (uvicorn, embedded
worker, the ``openai`` adapter) driven over keep-alive connections, ``--in-flight`` jobs always
in flight (each connection sends its next request when its previous job's callback arrived).

Passes, after a warm-up, each of ``--jobs`` jobs:
1. unprofiled: the gateway's process CPU seconds per job (the total the breakdown divides up);
2. under ``py-spy record --format speedscope`` (attached to the gateway's pid, idle samples
   left out, one stack per thread);
3. under ``py-spy record --format flamegraph`` (an SVG to open in a browser).

The speedscope profile is then read back: the share of samples per part of the job (accept,
worker, delivery, queue writes, metrics, logging, event loop) and the functions with the most
own time, each turned into microseconds per job with pass 1's figure. Samples only count
while a thread runs, so shares are shares of CPU time. Open the ``.speedscope.json`` at
https://www.speedscope.app (``Left Heavy`` view) or the ``.svg`` in a browser.

``--analyse FILE`` only prints the breakdown of an existing speedscope file (``--cpu-per-job``
to turn shares into microseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accept_bench import Portal, cpu_seconds, end_to_end, gateway_config, percentile, print_table, start_process, stop  # noqa: E402
from gateway.testing import free_port  # noqa: E402

PY_SPY_PIN = "py-spy==0.4.3"  # as pinned in pyproject.toml's `test` extra


# -- reading a profile -------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    name: str
    file: str
    line: int

    @property
    def where(self) -> str:
        """The file relative to the checkout or site-packages: short enough for a table."""
        path = self.file
        for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
        return f"{self.name} ({path}:{self.line})"


Stack = tuple[Frame, ...]
"""Root first, leaf last, as py-spy records them."""


def read_speedscope(path: Path, thread_cpu: dict[int, float] | None = None) -> tuple[dict[Stack, float], dict[str, float]]:
    """Weight per distinct stack over every thread, and weight per thread name.

    A sample is taken whenever a thread is runnable, also while it waits for a core (on a shared
    machine, often): with ``thread_cpu`` (CPU seconds per thread id during the recording) each
    thread's samples share out that thread's CPU time, so the weights are CPU seconds; without,
    they are sample counts."""
    data = json.loads(path.read_text())
    frames = [Frame(f.get("name", "?"), f.get("file", "") or "", int(f.get("line") or 0)) for f in data["shared"]["frames"]]
    stacks: dict[Stack, float] = defaultdict(float)
    threads: dict[str, float] = defaultdict(float)
    for profile in data["profiles"]:
        name = profile.get("name", "?")
        samples = profile["samples"]
        weight = 1.0
        if thread_cpu is not None and samples:
            tid = int(name.split()[1]) if name.startswith("Thread ") and name.split()[1].isdigit() else -1
            weight = thread_cpu.get(tid, 0.0) / len(samples)
        for sample in samples:
            stacks[tuple(frames[i] for i in sample)] += weight
        threads[name] += weight * len(samples)
    return stacks, dict(threads)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    found: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def _in(frame: Frame, *parts: str) -> bool:
    return any(part in frame.file for part in parts)


# The job's phases, found by the deepest gateway frame that names one (coroutines resumed by the
# event loop show their whole await chain, so the phase is on the stack whatever the leaf is).
PHASE_ANCHORS: list[tuple[str, Callable[[Frame], bool]]] = [
    ("delivery", lambda f: _in(f, "gateway/worker.py") and f.name in ("_deliver_in_lane", "_record_delivery", "_finish", "_announce", "_hand_to_delivery")),
    ("delivery", lambda f: _in(f, "gateway/delivery.py")),
    ("worker", lambda f: _in(f, "gateway/worker.py") and f.name in ("_run", "_start", "claim_once", "_dispatch", "_done", "admit")),
    ("worker", lambda f: _in(f, "gateway/execution.py", "gateway_openai/")),
    ("accept", lambda f: _in(f, "gateway/app.py")),
]


def phase_of(stack: Stack) -> str:
    """The part of the job a sample belongs to (see the table in docs/performance.md)."""
    found = None
    for frame in stack:
        if (_in(frame, "gateway/jobs/sqlite.py") and frame.name.endswith(("_flush_forever", "_run_batch"))) or _in(frame, "concurrent/futures/thread.py"):
            return "queue writes (SQLite batches on the loop, COMMIT thread)"
        for phase, matches in PHASE_ANCHORS:
            if matches(frame):
                found = phase
                break
    if found is not None:
        return found
    if any(_in(f, "uvicorn/protocols/", "starlette/", "httptools") or f.name.startswith(("GuardedHttpToolsProtocol", "ConnectionGuard")) for f in stack):
        return "accept"  # uvicorn's protocol and Starlette before the endpoint: only the completions POSTs reach this gateway
    if not any(f.name in ("<module>", "Thread._bootstrap", "_bootstrap") for f in stack):
        return "unattributed (py-spy read a partial stack)"
    return "event loop and other"


# What the CPU is spent on, by the deepest frame that belongs to one of these (first match wins, leaf first).
KINDS: list[tuple[str, Callable[[Frame], bool]]] = [
    ("logging", lambda f: _in(f, "/logging/", "gateway/redaction.py")),
    ("metrics (prometheus_client)", lambda f: _in(f, "prometheus_client/")),
    ("JSON encode/decode", lambda f: _in(f, "/json/") or f.name in ("json", "loads", "dumps", "encode_like_php")),
    ("SQLite statements (on the loop)", lambda f: _in(f, "sqlite3", "gateway/jobs/sqlite.py", "gateway/jobs/rows.py")),
    ("COMMIT in its thread, and the hand-off to it", lambda f: _in(f, "concurrent/futures/")),
    ("URL checks (netguard, outbound URL parse)", lambda f: _in(f, "gateway/netguard.py") or f.name in ("parse_outbound_url", "check_url", "portal_host")),
    ("portal protocol: request parse/validate, callback body/answer", lambda f: _in(f, "gateway/bitrix/protocol.py")),
    (
        "HTTP client (httpx, aiohttp, httpcore, h11, gateway/http.py)",
        lambda f: _in(f, "httpx/", "httpcore/", "h11/", "aiohttp/", "aiohappyeyeballs/", "yarl/", "multidict/", "gateway/http.py"),
    ),
    ("HTTP server (uvicorn, httptools, guard)", lambda f: _in(f, "uvicorn/", "httptools", "gateway/server.py")),
    ("Starlette (routing, Request, Response)", lambda f: _in(f, "starlette/")),
    ("openai adapter, execution, routing", lambda f: _in(f, "gateway_openai/", "gateway/execution.py", "gateway/routing.py", "gateway/adapters.py")),
    ("job model, tasks, outcomes", lambda f: _in(f, "gateway/jobs/model.py", "gateway/tasks.py", "gateway/outcomes.py")),
    ("worker and delivery bookkeeping", lambda f: _in(f, "gateway/worker.py", "gateway/delivery.py", "gateway/plugins.py", "pluggy/")),
    ("accept endpoint (gateway/app.py)", lambda f: _in(f, "gateway/app.py")),
    ("asyncio (tasks, streams, timeouts, futures)", lambda f: _in(f, "/asyncio/", "uvloop", "anyio/", "sniffio/")),
]


def kind_of(stack: Stack) -> str:
    for frame in reversed(stack):
        for kind, matches in KINDS:
            if matches(frame):
                return kind
    return "other (interpreter, start-up frames, unknown)"


def own_time(stacks: dict[Stack, float]) -> dict[str, float]:
    """Samples whose leaf is the function: its own time, not its callees'."""
    own: dict[str, float] = defaultdict(float)
    for stack, n in stacks.items():
        if stack:
            own[stack[-1].where] += n
    return own


def breakdown(stacks: dict[Stack, float], cpu_per_job_us: float | None, weighted: bool = True) -> list[str]:
    """The report: phase x kind shares, the phases, the kinds and the top 15 functions by own time."""
    total = sum(stacks.values())
    lines: list[str] = []

    def figure(n: float) -> str:
        share = n / total
        return f"{share:6.1%}" + (f"  {share * cpu_per_job_us:7.0f} us/job" if cpu_per_job_us else "")

    def table(title: str, counts: Iterable[tuple[str, float]]) -> None:
        rows = sorted(counts, key=lambda row: -row[1])
        width = max([len(title), *(len(name) for name, _ in rows)])
        lines.append(f"{title:<{width}}  {'share':>6}" + ("  CPU per job" if cpu_per_job_us else ""))
        lines.append(f"{'-' * width}  {'-' * 6}" + ("  " + "-" * 14 if cpu_per_job_us else ""))
        lines.extend(f"{name:<{width}}  {figure(n)}" for name, n in rows)
        lines.append("")

    phases: dict[str, float] = defaultdict(float)
    kinds: dict[str, float] = defaultdict(float)
    both: dict[str, float] = defaultdict(float)
    for stack, n in stacks.items():
        phase, kind = phase_of(stack), kind_of(stack)
        phases[phase] += n
        kinds[kind] += n
        both[f"{phase}: {kind}"] += n
    lines.append(
        f"{total:.1f} {'CPU seconds' if weighted else 'samples'} profiled"
        + (f"; total {cpu_per_job_us:.0f} us of gateway CPU per job (unprofiled pass)" if cpu_per_job_us else "")
    )
    lines.append("")
    table("phase of the job", phases.items())
    table("kind of work (all phases)", kinds.items())
    table("phase: kind of work (>= 0.5%)", [(name, n) for name, n in both.items() if n / total >= 0.005])
    table("top 15 functions by own time", sorted(own_time(stacks).items(), key=lambda row: -row[1])[:15])
    return lines


# -- running the load under py-spy ---------------------------------------------------------------
async def sustained(port: int, portal: Portal, count: int, in_flight: int, upstream_delay: float) -> tuple[list[float], float]:
    """accept_bench's "always in flight" load: overheads (callback - sent - upstream delay) and jobs/s."""
    return await end_to_end(port, portal, count, in_flight, upstream_delay, None)


def find_py_spy() -> str:
    """py-spy from this venv (the `test` extra pins it), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        sys.exit(
            f"py-spy is not installed: `make setup` installs it (pinned in pyproject.toml's test extra), or `{sys.executable} -m pip install {PY_SPY_PIN}`"
        )
    return found


def check_attach(py_spy: str, pid: int) -> None:
    """py-spy reads the gateway's memory with ptrace: say how to allow it rather than fail later."""
    done = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        sys.exit(
            f"py-spy cannot attach to the gateway (pid {pid}): {done.stderr.strip()[:300]}\n"
            "It needs ptrace: run as root, or `sudo sysctl kernel.yama.ptrace_scope=0`, or in a container add CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE)."
        )


def profiled(py_spy: str, pid: int, fmt: str, out: Path, rate: int, run: Callable[[], object]) -> dict[int, float]:
    """Run ``run()`` with py-spy attached to ``pid``; py-spy writes ``out`` when it gets SIGINT.
    Answers the CPU seconds each of the gateway's threads used meanwhile.

    ``--nonblocking``: py-spy reads the stacks without stopping the process. Stopped (the default),
    the threads look runnable to py-spy's idle check and every sample counts, waiting or not; and
    the stops cost the gateway about half as much CPU again at 500 Hz."""
    args = [py_spy, "record", "--pid", str(pid), "--format", fmt, "--output", str(out), "--rate", str(rate), "--threads", "--full-filenames", "--nonblocking"]
    spy = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # attached and sampling before the load starts
    before = thread_cpu_seconds(pid)
    try:
        run()
    finally:
        spy.send_signal(signal.SIGINT)
        output, _ = spy.communicate(timeout=120)
    after = thread_cpu_seconds(pid)
    if not out.exists():
        sys.exit(f"py-spy wrote no {out}: {output.decode(errors='replace')[-500:]}")
    return {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per pass (three passes)")
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--upstream-delay", type=float, default=0.05, help="the stub's latency, seconds")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--log-level", default="WARNING", help="the gateway's (the bench's WARNING; `gateway serve` defaults to INFO)")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "profile")
    parser.add_argument("--analyse", type=Path, help="only print the breakdown of this speedscope file")
    parser.add_argument("--cpu-per-job", type=float, help="with --analyse: the gateway's CPU per job in microseconds")
    args = parser.parse_args()
    if args.analyse:
        print("\n".join(breakdown(read_speedscope(args.analyse)[0], args.cpu_per_job, weighted=False)))
        return

    py_spy = find_py_spy()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    speedscope, svg = args.out / f"gateway-{stamp}.speedscope.json", args.out / f"gateway-{stamp}.svg"
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    procs = []
    try:
        portal_port, upstream_port = free_port(), free_port()
        portal_proc = start_process(
            [sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal"
        )[0]
        procs.append(portal_proc)
        upstream = start_process(
            [sys.executable, "-m", "gateway.testing", "--port", str(upstream_port), "--delay", str(args.upstream_delay)],
            upstream_port,
            "/",
            workdir,
            "upstream",
        )[0]
        procs.append(upstream)
        portal = Portal(portal_port)
        gw_port = free_port()
        config = gateway_config(workdir, upstream_port, "profile")
        gw_cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(gw_port), "--log-level", args.log_level]
        gw, _ = start_process(gw_cmd, gw_port, "/-/health", workdir, "gateway-profile")
        procs.append(gw)
        check_attach(py_spy, gw.pid)

        def load() -> tuple[list[float], float]:
            return asyncio.run(sustained(gw_port, portal, args.jobs, args.in_flight, args.upstream_delay))

        asyncio.run(sustained(gw_port, portal, 200, args.in_flight, args.upstream_delay))  # warm-up: connections, caches
        before = {p.pid: cpu_seconds(p.pid) for p in (gw, portal_proc, upstream)}
        overheads, jobs_per_s = load()
        used = {pid: cpu_seconds(pid) - cpu for pid, cpu in before.items()}
        cpu_per_job = used[gw.pid] / args.jobs

        spied_before = cpu_seconds(gw.pid)
        thread_cpu = profiled(py_spy, gw.pid, "speedscope", speedscope, args.rate, load)
        cpu_per_job_spied = (cpu_seconds(gw.pid) - spied_before) / args.jobs
        profiled(py_spy, gw.pid, "flamegraph", svg, args.rate, load)
    finally:
        for proc in procs:
            stop(proc)

    us = 1e6
    rows = [
        (
            f"gateway CPU per job, {args.jobs} jobs, {args.in_flight} in flight",
            f"{cpu_per_job * us:,.0f} us  (under py-spy at {args.rate} Hz: {cpu_per_job_spied * us:,.0f} us)",
        ),
        (
            "jobs/s, end-to-end overhead p50 / p99",
            f"{jobs_per_s:,.0f} jobs/s, {statistics.median(overheads) * 1e3:.1f} / {percentile(overheads, 0.99) * 1e3:.1f} ms",
        ),
        ("CPU per job of the portal emulator / the stub", f"{used[portal_proc.pid] / args.jobs * us:,.0f} us / {used[upstream.pid] / args.jobs * us:,.0f} us"),
        ("speedscope profile (speedscope.app, Left Heavy)", str(speedscope)),
        ("flame graph (open in a browser)", str(svg)),
    ]
    print_table(
        rows,
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores shared with the load generator, emulator and stub; gateway log level {args.log_level}; "
        f"upstream delay {args.upstream_delay * 1e3:.0f} ms; logs in {workdir}",
    )
    print()
    stacks, threads = read_speedscope(speedscope, thread_cpu)
    print("CPU per job by thread (profiled pass): " + ", ".join(f"{name.split(' ', 2)[-1]} {cpu / args.jobs * us:,.0f} us" for name, cpu in threads.items()))
    (args.out / f"gateway-{stamp}.threads.json").write_text(
        json.dumps({"jobs": args.jobs, "cpu_per_job_us": cpu_per_job * us, "thread_cpu_seconds": thread_cpu})
    )
    print("\n".join(breakdown(stacks, cpu_per_job * us)))
    print(f"flame graph: {svg}")


if __name__ == "__main__":
    main()
