"""`gateway demo` on the embedded default configuration (`examples/gateway.yaml`, what `make run`
serves): no keys, no other server; local LLM for text, local Whisper for audio and call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.testing import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def run_demo(tmp_path: Path, *args: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_PUBLIC_URL": f"http://127.0.0.1:{port}", "GATEWAY_DATA_DIR": str(tmp_path / "var")}
    env.pop("GATEWAY_LOAD_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--config", str(ROOT / "examples/gateway.yaml"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_demo_starts_the_default_gateway_and_runs_every_configured_category(tmp_path):
    port = free_port()
    result = run_demo(tmp_path, port=port)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "starting `gateway serve" in out and "gateway ready" in out
    lines = out.splitlines()
    for category, engine in (("text", "gateway_text"), ("audio", "gateway_audio"), ("call", "gateway_call")):
        assert any(line.startswith(f"[{category}] {engine}: accepted in") and "success callback after" in line for line in lines), out
    assert "[image] no engine configured" in out
    assert "quarterly" in out.lower() and '"start_time_formatted": "00:00"' in out
    registrations = [line for line in lines if "ai.engine.register" in line and "completions_url" in line]
    assert len(registrations) == 3 and all(f"http://127.0.0.1:{port}/engines/" in line for line in registrations)
    with pytest.raises(httpx.TransportError):  # the gateway the demo started is stopped again
        httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=2)


def test_demo_uses_a_running_gateway(tmp_path):
    port = free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_PUBLIC_URL": f"http://127.0.0.1:{port}", "GATEWAY_DATA_DIR": str(tmp_path / "var")}
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(ROOT / "examples/gateway.yaml")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "gateway serve exited"
            time.sleep(0.1)
        result = run_demo(tmp_path, port=port)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"using the gateway running at http://127.0.0.1:{port}" in result.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=2).status_code == 200  # left running
    finally:
        server.terminate()
        server.wait(30)
