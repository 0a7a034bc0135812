"""`gateway serve --processes N`: N server processes on one port share the work and stop together."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from gateway.bitrix.simulator import PortalEmulator
from gateway.testing import FakeOpenAI, GatewayProcess, make_config

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def wait_for(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_two_processes_serve_one_port_and_every_job_is_delivered_once(tmp_path: Path, upstream: FakeOpenAI, portal: PortalEmulator) -> None:
    gw = GatewayProcess(make_config(upstream.url), tmp_path).start("--processes", "2", timeout=60)
    try:
        assert gw.proc is not None
        wait_for(lambda: len(children(gw.proc.pid)) == 2, "two server processes under the parent")
        url = gw.completions_url()
        hashes = []
        with httpx.Client(timeout=10) as client:  # a new connection per request: the kernel spreads them over both
            for _ in range(30):
                job_hash, body = portal.new_request()
                assert client.post(url, json=body, headers={"Connection": "close"}).status_code == 202
                hashes.append(job_hash)
        for job_hash in hashes:
            assert len(portal.wait(job_hash).delivered) == 1, gw.logs()[-3000:]
        assert len(upstream.requests) == 30  # each job ran once, in whichever process took its request
        assert "serving on" in gw.logs() and gw.logs().count("serving on") == 1  # one announcement for all
    finally:
        gw.stop()
    assert gw.proc is not None and gw.proc.returncode == 0, gw.logs()[-2000:]


def test_the_children_stop_when_the_parent_is_killed(tmp_path: Path, upstream: FakeOpenAI) -> None:
    gw = GatewayProcess(make_config(upstream.url), tmp_path).start("--processes", "2", timeout=60)
    assert gw.proc is not None
    wait_for(lambda: len(children(gw.proc.pid)) == 2, "two server processes under the parent")
    kids = children(gw.proc.pid)
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in kids), "the children stopping after the parent's SIGKILL", timeout=30)


def test_a_child_that_dies_is_started_again(tmp_path: Path, upstream: FakeOpenAI, portal: PortalEmulator) -> None:
    gw = GatewayProcess(make_config(upstream.url), tmp_path).start("--processes", "2", timeout=60)
    try:
        assert gw.proc is not None
        wait_for(lambda: len(children(gw.proc.pid)) == 2, "two server processes under the parent")
        first = children(gw.proc.pid)[0]
        time.sleep(11)  # past the early-death window: a crash in service, not at start
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: first not in children(gw.proc.pid) and len(children(gw.proc.pid)) == 2, "a new process in place of the killed one", timeout=60)
        job_hash, body = portal.new_request()
        assert httpx.post(gw.completions_url(), json=body, timeout=10).status_code == 202
        assert portal.wait(job_hash).delivered
    finally:
        gw.stop()


def test_processes_must_be_at_least_one(tmp_path: Path, upstream: FakeOpenAI) -> None:
    gw = GatewayProcess(make_config(upstream.url), tmp_path)
    with pytest.raises(RuntimeError, match="--processes must be at least 1"):
        gw.start("--processes", "0", timeout=20)
