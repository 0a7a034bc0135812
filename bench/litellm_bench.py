"""litellm adapter overhead against the openai adapter, in one run. Prints a table.

One `gateway serve` with two text engines on the same OpenAI-compatible upstream (fixed
50 ms latency): `bench` through `plugins/openai`, `viallm` through `plugins/litellm`
(litellm's OpenAI provider with `api_base` set to the upstream). Measured:
1. gateway RSS before any litellm job, the first litellm job's wall time (litellm is
   imported then), RSS after it;
2. end-to-end overhead (callback received - request sent - 50 ms) and gateway CPU per
   job for each engine, 5 requests in flight, runs interleaved (openai, litellm, openai,
   litellm) so that both see the same machine.

Run with `make bench-litellm`; every server binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import TOKEN, Portal, cpu_seconds, end_to_end, percentile, print_table, rss_mb, start_gateway, start_process, stop
from gateway.testing import free_port

LITELLM_TOKEN = "bench-litellm-0123456789abcdef"
DELAY = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs per engine per run (two runs each)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-litellm-"))
    procs: list[subprocess.Popen[bytes]] = []
    paths = {"openai": f"/engines/bench/{TOKEN}/completions", "litellm": f"/engines/viallm/{LITELLM_TOKEN}/completions"}
    overheads: dict[str, list[float]] = {"openai": [], "litellm": []}
    cpu: dict[str, float] = {"openai": 0.0, "litellm": 0.0}
    try:
        portal_port, upstream_port = free_port(), free_port()
        procs.append(
            start_process([sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal")[0]
        )
        procs.append(
            start_process(
                [sys.executable, "-m", "gateway.testing", "--port", str(upstream_port), "--delay", str(DELAY)], upstream_port, "/", workdir, "upstream"
            )[0]
        )
        portal = Portal(portal_port)
        base = f"http://127.0.0.1:{upstream_port}/v1"
        config = {
            "public_url": "http://127.0.0.1:0",
            "data_dir": str(workdir / "var"),
            "security": {"allowed_portals": ["127.0.0.1"], "allow_private_networks": True},
            "providers": {"up": {"type": "openai", "base_url": base}, "ll": {"type": "litellm", "api_base": base, "api_key": "sk-bench"}},
            "engines": [
                {"code": "bench", "category": "text", "token": TOKEN, "route": [{"provider": "up", "model": "gpt-4o-mini"}]},
                {"code": "viallm", "category": "text", "token": LITELLM_TOKEN, "route": [{"provider": "ll", "model": "openai/gpt-4o-mini"}]},
            ],
        }
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        gw, port, _ = start_gateway(workdir, config_path, "gateway")
        procs.append(gw)
        asyncio.run(end_to_end(port, portal, 50, 5, DELAY, None, paths["openai"]))  # warm-up
        time.sleep(0.5)
        rss_before = rss_mb(gw.pid)
        started = time.perf_counter()
        asyncio.run(end_to_end(port, portal, 1, 1, DELAY, None, paths["litellm"]))
        first_job = time.perf_counter() - started
        rss_after = rss_mb(gw.pid)
        asyncio.run(end_to_end(port, portal, 50, 5, DELAY, None, paths["litellm"]))  # warm-up
        for _ in range(2):
            for name in ("openai", "litellm"):
                before = cpu_seconds(gw.pid)
                measured, _ = asyncio.run(end_to_end(port, portal, args.jobs, 5, DELAY, None, paths[name]))
                cpu[name] += cpu_seconds(gw.pid) - before
                overheads[name] += measured
        rss_end = rss_mb(gw.pid)
    finally:
        for proc in procs:
            stop(proc)

    ms = 1000
    rows = [("gateway RSS before any litellm job", f"{rss_before:.0f} MB")]
    rows += [
        ("first litellm job, wall time (imports litellm)", f"{first_job:.2f} s"),
        ("gateway RSS after it / after all runs", f"{rss_after:.0f} MB / {rss_end:.0f} MB"),
    ]
    for name in ("openai", "litellm"):
        values = overheads[name]
        rows.append(
            (f"{name} adapter: end-to-end overhead, 5 in flight", f"p50 {statistics.median(values) * ms:.1f} ms, p99 {percentile(values, 0.99) * ms:.1f} ms")
        )
        rows.append((f"{name} adapter: gateway CPU per job", f"{cpu[name] / (2 * args.jobs) * ms:.1f} ms"))
    print_table(rows, f"upstream latency {DELAY * ms:.0f} ms, {2 * args.jobs} jobs per adapter; logs in {workdir}")


if __name__ == "__main__":
    main()
