"""End to end over real sockets: a slow portal only slows its own callbacks, and a job whose
callback cannot be sent ends ``dead`` instead of staying ``delivering`` forever."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from gateway.bitrix.simulator import PortalEmulator
from gateway.jobs.model import Job, new_job_id
from gateway.jobs.sqlite import SQLiteJobQueue
from gateway.loopback import LoopbackServer
from gateway.tasks import Category, Task, TextPrompt
from gateway.testing import make_config

pytestmark = pytest.mark.e2e

SLOW_JOBS = 16
FAST_JOBS = 6
PER_PORTAL = 4
READ_TIMEOUT = 2.0
LATE_ANSWER = 3.0  # longer than the read timeout: the portal takes the callback, the gateway stops waiting


@pytest.fixture
def slow_portal():
    """A second portal on another loopback address (127.0.0.2): another portal host."""
    emulator = PortalEmulator()
    with LoopbackServer(emulator.app, host="127.0.0.2") as server:
        emulator.url = server.url
        yield emulator


def test_a_slow_portal_only_slows_its_own_callbacks(gateway, portal, slow_portal, upstream):
    """Sixteen jobs for a portal that answers callbacks after the read timeout, then six for
    another portal: the other portal's callbacks all arrive before the slow portal got its
    third wave of callbacks (at most PER_PORTAL in flight, each wave lasting the read timeout).
    Before, the slow portal's callbacks held every worker slot and the others waited behind them.

    The slow portal took every first callback (it answered after the gateway gave up), so
    the retry's data:false means the result was delivered: delivered_unconfirmed, never expired or gone."""
    config = make_config(
        upstream.url,
        workers={"concurrency": 4},
        security={"allowed_portals": ["127.0.0.1", "127.0.0.2"], "allow_private_networks": True},
        delivery={"backoff_initial": 0.1, "backoff_max": 0.3, "connect_timeout": 1, "read_timeout": READ_TIMEOUT, "max_in_flight_per_portal": PER_PORTAL},
    )
    gw = gateway(config)
    url = gw.completions_url()
    slow_portal.answer_late(LATE_ANSWER, SLOW_JOBS)
    slow_hashes, fast_hashes = [], []
    for i in range(SLOW_JOBS):
        job_hash, body = slow_portal.new_request(prompt=f"slow {i}")
        assert slow_portal.send(url, body).status_code == 202
        slow_hashes.append(job_hash)
    for i in range(FAST_JOBS):
        job_hash, body = portal.new_request(prompt=f"fast {i}")
        assert portal.send(url, body).status_code == 202
        fast_hashes.append(job_hash)

    fast_jobs = [portal.wait(h, timeout=60) for h in fast_hashes]
    assert [[c.body for c in job.delivered] for job in fast_jobs] == [[{"result": f"echo: fast {i}"}] for i in range(FAST_JOBS)]
    last_fast = max(job.delivered[0].at for job in fast_jobs)
    slow_jobs = [slow_portal.wait(h, timeout=60) for h in slow_hashes]
    slow_arrivals = sorted(c.at for job in slow_jobs for c in job.callbacks)
    assert last_fast < slow_arrivals[2 * PER_PORTAL], "the fast portal's callbacks waited behind the slow portal's"

    assert [len(job.delivered) for job in slow_jobs] == [1] * SLOW_JOBS  # each result taken exactly once
    jobs = gw.wait_final(SLOW_JOBS + FAST_JOBS, timeout=60)
    states = sorted(j["state"] for j in jobs)
    # The first SLOW_JOBS callbacks the slow portal received were answered late (after the gateway's
    # timeout): a job whose accepted callback is one of them never heard data:true.
    answered_late = set(slow_arrivals[:SLOW_JOBS])
    unconfirmed = sum(1 for job in slow_jobs if job.delivered[0].at in answered_late)
    assert unconfirmed >= SLOW_JOBS - PER_PORTAL  # all of them, unless a retry overtook a first attempt in the lane
    assert states == sorted(["delivered"] * (SLOW_JOBS - unconfirmed + FAST_JOBS) + ["delivered_unconfirmed"] * unconfirmed)
    shown = gw.cli_json("jobs", "show", next(j["id"] for j in jobs if j["state"] == "delivered_unconfirmed"))
    assert shown["detail"].startswith("portal answered data:false after an earlier attempt that timed out")
    assert next((a["outcome"], a["detail"].split(" (")[0]) for a in shown["attempts"] if a["kind"] == "callback") == (
        "retry",
        "ReadTimeout: no data within 2.0 s",
    )

    metrics = httpx.get(gw.url + "/metrics").text
    assert f'gateway_delivery_failures_total{{outcome="retry",portal="127.0.0.2"}} {float(SLOW_JOBS)}' in metrics
    assert 'gateway_delivery_latency_seconds_count{portal="127.0.0.1"} 6.0' in metrics
    assert not any(h in metrics for h in slow_hashes + fast_hashes)
    time.sleep(max(0.0, slow_arrivals[SLOW_JOBS - 1] + LATE_ANSWER + 0.2 - time.time()))  # let the late answers go out before the portal stops


@pytest.mark.parametrize(
    ("callback_url", "reason"),
    [
        ("http://127.0.0.1:abc/cb?hash=x", "callback URL: is not a valid URL (Invalid port: 'abc')"),
        ("http://127.0.0.1/c\tb?hash=x", "callback URL: contains '\\t' at position 18"),
        ("http://127.0.0.1:70000/cb?hash=x", "callback URL: port 70000 is out of range (1-65535)"),
    ],
)
def test_a_job_whose_callback_cannot_be_sent_ends_dead_with_the_reason(gateway, upstream, callback_url, reason):
    """Stored directly in the queue, as if accept had let the URL through: delivery refuses it
    (before, httpx.InvalidURL escaped and the job stayed `delivering`, a traceback every lease)."""
    gw = gateway()
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="acme_text", category=Category.TEXT, prompt=TextPrompt("hello"), ttl=3600, accepted_at=now, deadline=now + 3600)
    job = Job(task, callback_url, callback_url)

    async def store() -> None:
        queue = SQLiteJobQueue(Path(gw.config["data_dir"]) / "queue.sqlite3")
        await queue.open()
        try:
            await queue.enqueue(job, "bad-url", lease_owner=None, lease_seconds=5)
        finally:
            await queue.close()

    asyncio.run(store())
    [record] = gw.wait_final(1, timeout=30)
    shown = gw.cli_json("jobs", "show", record["id"])
    assert shown["state"] == "dead"
    assert shown["detail"].startswith(f"the callback cannot be sent: {reason}")
    assert [(a["kind"], a["outcome"]) for a in shown["attempts"]] == [("provider", "ok"), ("callback", "refused")]
    assert "Traceback" not in gw.logs()
    assert httpx.get(gw.url + "/-/health").json() == {"status": "ok", "queue_depth": 0}
