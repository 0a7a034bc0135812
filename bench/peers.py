"""This gateway's OpenAI-compatible API against LiteLLM proxy, same stub, same machine, same run. Prints a table.

Both sit in front of one OpenAI-compatible stub (``python -m gateway.testing``) with a fixed
50 ms delay before each answer. LiteLLM proxy (``litellm[proxy]==1.102.4``, pinned) is
installed by this script into its own venv under ``~/.cache/bitrix24-ai-gateway`` (once;
``LITELLM_PROXY_VENV`` to move it), run with ``LITELLM_LOCAL_MODEL_COST_MAP=True`` and one
worker. For 1, 10 and 50 concurrent clients, non-streaming and streaming, runs interleaved
(gateway, LiteLLM, gateway, LiteLLM ...): added latency p50/p99 (response time minus the
stub's 50 ms; for streams, to the last byte), requests/s, server CPU ms per request (the
process and its children, from /proc), RSS after the runs, time from start to ready.

Run with ``make bench-peers``; every server binds to 127.0.0.1; each level runs a fixed
number of requests (bounded in count), and every request has a 30 s timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import cpu_seconds, percentile, print_table, rss_mb, start_process, stop
from gateway.testing import free_port

LITELLM = "litellm[proxy]==1.102.4"
VENV = Path(os.environ.get("LITELLM_PROXY_VENV", Path.home() / ".cache" / "bitrix24-ai-gateway" / "litellm-proxy-1.102.4"))
DELAY = 0.05
KEY = "sk-bench-0123456789abcdefghij"
LEVELS = (1, 10, 50)
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark"}]


def install_litellm() -> Path:
    """The proxy's venv, made once: pip's output goes to a log beside it."""
    litellm = VENV / "bin" / "litellm"
    if litellm.exists():
        return litellm
    VENV.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {LITELLM} into {VENV} (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log = VENV.parent / "litellm-proxy-install.log"
    with log.open("wb") as out:
        result = subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", LITELLM], stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"installing {LITELLM} failed (exit {result.returncode}); see {log}")
    return litellm


def children_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (LiteLLM's proxy runs uvicorn in a child)."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += children_cpu(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_rss(pid: int) -> float:
    total = rss_mb(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += tree_rss(int(child))
        except FileNotFoundError:
            pass
    return total


async def one(client: httpx.AsyncClient, url: str, model: str, stream: bool) -> float:
    started = time.perf_counter()
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    if stream:
        async with client.stream("POST", url, json=body) as response:
            async for _ in response.aiter_bytes():
                pass
    else:
        response = await client.post(url, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return time.perf_counter() - started - DELAY


async def load(url: str, model: str, clients: int, requests: int, stream: bool) -> tuple[list[float], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=30) as client:
        for _ in range(min(clients, 5)):  # warm the connections
            await one(client, url, model, stream)
        todo = iter(range(requests))
        latencies: list[float] = []

        async def worker() -> None:
            for _ in todo:
                latencies.append(await one(client, url, model, stream))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per level, mode and peer")
    args = parser.parse_args()
    litellm = install_litellm()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-peers-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        stub_port, gw_port, ll_port = free_port(), free_port(), free_port()
        stub, _ = start_process([sys.executable, "-m", "gateway.testing", "--port", str(stub_port), "--delay", str(DELAY)], stub_port, "/", workdir, "stub")
        procs.append(stub)
        base = f"http://127.0.0.1:{stub_port}/v1"
        gw_config = workdir / "gateway.yaml"
        gw_config.write_text(
            yaml.safe_dump(
                {
                    "public_url": f"http://127.0.0.1:{gw_port}",
                    "data_dir": str(workdir / "var"),
                    "workers": {"concurrency": 64},
                    "providers": {"stub": {"type": "openai", "base_url": base, "api_key": "unused"}},
                    "engines": [{"code": "bench", "category": "text", "route": [{"provider": "stub", "model": "test-model"}]}],
                    "api_keys": [{"name": "bench", "secret": KEY, "engines": ["bench"]}],
                }
            )
        )
        ll_config = workdir / "litellm.yaml"
        ll_config.write_text(
            yaml.safe_dump(
                {
                    "model_list": [{"model_name": "bench", "litellm_params": {"model": "openai/test-model", "api_base": base, "api_key": "unused"}}],
                    "general_settings": {"master_key": KEY},
                    "litellm_settings": {"num_retries": 0, "request_timeout": 30},
                }
            )
        )
        gw, gw_ready = start_process(
            [sys.executable, "-m", "gateway", "serve", "--config", str(gw_config), "--port", str(gw_port), "--log-level", "WARNING"],
            gw_port,
            "/-/health",
            workdir,
            "gateway",
        )
        procs.append(gw)
        os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        ll, ll_ready = start_process(
            [str(litellm), "--config", str(ll_config), "--port", str(ll_port), "--host", "127.0.0.1", "--num_workers", "1"],
            ll_port,
            "/health/liveliness",
            workdir,
            "litellm",
        )
        procs.append(ll)
        peers = {"gateway": (gw, f"http://127.0.0.1:{gw_port}/v1/chat/completions"), "LiteLLM": (ll, f"http://127.0.0.1:{ll_port}/v1/chat/completions")}
        rows: list[tuple[str, str]] = [
            ("time to ready (start -> first 200)", f"gateway {gw_ready:.2f} s, LiteLLM {ll_ready:.2f} s"),
        ]
        for stream in (False, True):
            for clients in LEVELS:
                figures = {}
                for name, (proc, url) in peers.items():  # interleaved: both peers on the same machine state
                    cpu_before = children_cpu(proc.pid)
                    latencies, wall = asyncio.run(load(url, "bench", clients, args.requests, stream))
                    cpu = (children_cpu(proc.pid) - cpu_before) / len(latencies) * 1000
                    figures[name] = (percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000, len(latencies) / wall, cpu)
                mode = "stream" if stream else "json"
                g, ll_f = figures["gateway"], figures["LiteLLM"]
                rows.append(
                    (
                        f"{mode}, {clients} clients: added p50 / p99",
                        f"gateway {g[0]:.1f} / {g[1]:.1f} ms, LiteLLM {ll_f[0]:.1f} / {ll_f[1]:.1f} ms ({g[0] / ll_f[0]:.2f}x / {g[1] / ll_f[1]:.2f}x)",
                    )
                )
                rows.append((f"{mode}, {clients} clients: req/s", f"gateway {g[2]:.0f}, LiteLLM {ll_f[2]:.0f}"))
                rows.append((f"{mode}, {clients} clients: CPU per request", f"gateway {g[3]:.2f} ms, LiteLLM {ll_f[3]:.2f} ms ({g[3] / ll_f[3]:.2f}x)"))
        rows.append(("RSS after the runs", f"gateway {tree_rss(gw.pid):.0f} MB, LiteLLM {tree_rss(ll.pid):.0f} MB"))
        print_table(
            rows, f"{args.requests} requests per level and peer; stub delay {DELAY * 1000:.0f} ms; python {sys.version.split()[0]}, {os.cpu_count()} cores"
        )
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    main()
