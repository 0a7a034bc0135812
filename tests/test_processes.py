"""Deployment shapes: an accept-only process beside a worker process, and graceful stops."""

from __future__ import annotations

import signal
import time

import pytest

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
    from tests.harness import make_config

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
    from tests.harness import make_config

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
