"""The operator's actions on one job, ``cancel`` and ``redeliver``: on both queue backends (the
``queue`` fixture runs each test as ``[sqlite]`` and ``[postgres]``), then end to end across real
sockets with ``gateway jobs cancel`` / ``gateway jobs redeliver`` against the portal emulator."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome
from gateway.jobs.queue import CANCELLED, JobActionRefused, JobQueue
from gateway.jobs.reports import allowed_actions
from gateway.outcomes import AttemptKind, AttemptOutcome, ErrorReason
from gateway.stores import job_queue
from gateway.testing.runner import GatewayProcess
from tests.conftest import QueueStore
from tests.test_queue_contract import TEXT, make_job

EXPIRED_LEASE = -1.0
"""A lease that ended before it began: the worker that claimed with it died, as far as anyone can tell."""


async def refused(call: Any, reason: str) -> None:
    """``call`` raises :class:`JobActionRefused` whose reason is exactly ``reason``."""
    with pytest.raises(JobActionRefused) as caught:
        await call
    assert caught.value.reason == reason
    shown = str(caught.value)
    assert shown.startswith(f"cannot {caught.value.action} job ") and shown.endswith(f": {reason}") and shown.isprintable() and shown.isascii()


async def delivering(queue: JobQueue, key: str, outcome: Outcome = TEXT, *, ttl: float = 100.0) -> Job:
    """A job whose outcome is stored and whose last callback POST failed: it waits for a retry, no worker holds it."""
    job, _ = await queue.enqueue(make_job(ttl=ttl), key, lease_owner="w1", lease_seconds=30)
    assert await queue.store_outcome(job.id, "w1", outcome, [])
    assert await queue.reschedule(job.id, "w1", time.time() + 60, Attempt(AttemptKind.CALLBACK, "p", time.time(), 0.0, "retry", "HTTP 503"))
    return job


async def dead(queue: JobQueue, key: str, *, ttl: float = 100.0, maybe_delivered: bool = False) -> Job:
    """A job with a stored result whose delivery ended ``dead`` (the portal refused the callback)."""
    job, _ = await queue.enqueue(make_job(ttl=ttl), key, lease_owner="w1", lease_seconds=30)
    assert await queue.store_outcome(job.id, "w1", TEXT, [])
    attempt = Attempt(AttemptKind.CALLBACK, "p", time.time(), 0.0, "retry", "ReadTimeout")
    assert await queue.retry_later(job.id, "w1", time.time(), attempt, maybe_delivered=maybe_delivered)
    [claimed] = await queue.claim("w1", 0, 30, delivery_limit=1)
    assert await queue.finish(claimed.id, "w1", JobState.DEAD, "portal refused the callback with HTTP 400", [])
    return job


# -- cancel ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancel_a_queued_job_gives_it_an_error_to_deliver(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    stored = await queue.get(job.id)
    assert stored is not None and allowed_actions(stored, time.time()) == {"cancel"}
    before = time.time()
    cancelled = await queue.cancel(job.id, "alice")
    assert cancelled.state is JobState.DELIVERING and cancelled.lease_until is None and before <= cancelled.next_at <= time.time()
    assert cancelled.outcome == CANCELLED
    assert cancelled.outcome.error == JobError("cancelled by the gateway's operator", "cancelled", ErrorReason.CANCELLED)
    [attempt] = cancelled.attempts
    assert (attempt.kind, attempt.target, attempt.outcome, attempt.detail) == (AttemptKind.OPERATOR, "cancel", AttemptOutcome.OK, "cancelled by alice")
    assert await queue.claim("w", 10, 5, delivery_limit=0) == []  # nothing to run: it waits for delivery only
    [claimed] = await queue.claim("w", 0, 5, delivery_limit=10)
    assert claimed.id == job.id and claimed.state is JobState.DELIVERING and claimed.outcome == CANCELLED and not claimed.interrupted_delivery
    assert await queue.finish(job.id, "w", JobState.FAILED, "portal took the error", [])
    assert await queue.depth() == 0


@pytest.mark.anyio
async def test_cancel_is_refused_while_a_worker_holds_the_job(queue: JobQueue) -> None:
    running, _ = await queue.enqueue(make_job(), "running", lease_owner="w1", lease_seconds=30)
    stored = await queue.get(running.id)
    assert stored is not None and allowed_actions(stored, time.time()) == set()
    await refused(queue.cancel(running.id, "alice"), "a worker is running it: cancel it while it is queued or waiting for a delivery retry")
    sending, _ = await queue.enqueue(make_job(), "sending", lease_owner="w1", lease_seconds=30)
    assert await queue.store_outcome(sending.id, "w1", TEXT, [])
    await refused(queue.cancel(sending.id, "alice"), "a worker is delivering its outcome right now: cancel it while it waits for a delivery retry")
    # Nothing changed: the worker goes on as if nobody had asked.
    assert await queue.store_outcome(running.id, "w1", TEXT, [])
    assert await queue.finish(sending.id, "w1", JobState.DELIVERED, "data:true", [])
    for job_id in (running.id, sending.id):
        stored = await queue.get(job_id)
        assert stored is not None and [a.kind for a in stored.attempts] == []


@pytest.mark.anyio
async def test_cancel_a_job_whose_worker_is_gone(queue: JobQueue) -> None:
    """A ``running`` job that nobody holds (its lease ran out, or it was handed back at shutdown)
    waits to run again: it can be cancelled, and its old worker can no longer store a result."""
    abandoned, _ = await queue.enqueue(make_job(), "abandoned", lease_owner=None, lease_seconds=5)
    [claimed] = await queue.claim("w1", 10, EXPIRED_LEASE)
    assert claimed.state is JobState.RUNNING
    handed_back, _ = await queue.enqueue(make_job(), "handed-back", lease_owner="w2", lease_seconds=30)
    await queue.release("w2", [handed_back.id])
    for job in (abandoned, handed_back):
        assert (await queue.cancel(job.id, "bob")).outcome == CANCELLED
    assert not await queue.store_outcome(abandoned.id, "w1", TEXT, [])  # too late: the error goes out instead
    stored = await queue.get(abandoned.id)
    assert stored is not None and stored.outcome == CANCELLED and stored.state is JobState.DELIVERING


@pytest.mark.anyio
async def test_cancel_a_job_waiting_for_a_delivery_retry_ends_it_dead(queue: JobQueue) -> None:
    job = await delivering(queue, "k")
    stored = await queue.get(job.id)
    assert stored is not None and allowed_actions(stored, time.time()) == {"cancel"}
    ended = await queue.cancel(job.id, "carol")
    assert ended.state is JobState.DEAD and ended.detail == "delivery cancelled by the operator (carol)"
    assert ended.finished_at is not None and ended.outcome == TEXT  # the result stays for `jobs show`
    assert [(a.kind, a.detail) for a in ended.attempts] == [("callback", "HTTP 503"), ("operator", "delivery cancelled by the operator (carol)")]
    assert await queue.claim("w", 10, 5, delivery_limit=10) == [] and await queue.depth() == 0
    await refused(queue.cancel(job.id, "carol"), "it has already ended (dead): there is nothing to cancel")


@pytest.mark.anyio
async def test_an_unknown_job_is_refused_not_an_error(queue: JobQueue) -> None:
    for call in (queue.cancel, queue.redeliver):
        for job_id in ("0123456789ab-nope", "\x00", "\ud800", "x" * 1000, ""):
            await refused(call(job_id, "alice"), "no such job: it was never accepted here, or it was deleted after queue.retention_days")


# -- redeliver --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_redeliver_a_dead_job_makes_it_due_for_delivery(queue: JobQueue) -> None:
    job = await dead(queue, "k", maybe_delivered=True)
    stored = await queue.get(job.id)
    assert stored is not None and stored.internal_errors == 1 and allowed_actions(stored, time.time()) == {"redeliver"}
    again = await queue.redeliver(job.id, "dave")
    assert again.state is JobState.DELIVERING and again.finished_at is None and again.detail == "" and again.internal_errors == 0
    assert again.maybe_delivered and again.outcome == TEXT
    assert (again.attempts[-1].kind, again.attempts[-1].target, again.attempts[-1].detail) == ("operator", "redeliver", "re-delivery asked by dave")
    assert await queue.depth() == 1
    [claimed] = await queue.claim("w", 0, 5, delivery_limit=10)
    assert claimed.id == job.id and claimed.maybe_delivered and not claimed.interrupted_delivery
    assert await queue.finish(job.id, "w", JobState.DELIVERED, "data:true", [])
    await refused(queue.redeliver(job.id, "dave"), "it ended delivered, not dead: only a dead job's outcome can be delivered again")


@pytest.mark.anyio
async def test_redeliver_is_refused_where_nothing_could_arrive(queue: JobQueue) -> None:
    no_outcome, _ = await queue.enqueue(make_job(), "no-outcome", lease_owner="w1", lease_seconds=30)
    assert await queue.finish(no_outcome.id, "w1", JobState.DEAD, "gave up", [])
    await refused(queue.redeliver(no_outcome.id, "e"), "nothing to deliver: it has no stored outcome (it ended before its task produced one)")
    too_late = await dead(queue, "too-late", ttl=-1.0)
    await refused(queue.redeliver(too_late.id, "e"), "its deadline passed: the portal no longer accepts a callback for it")
    queued, _ = await queue.enqueue(make_job(), "queued", lease_owner=None, lease_seconds=5)
    await refused(queue.redeliver(queued.id, "e"), "it is still queued: the gateway delivers it by itself; re-delivery is for jobs that ended dead")
    for job_id in (no_outcome.id, too_late.id):
        stored = await queue.get(job_id)
        assert stored is not None and stored.state is JobState.DEAD and allowed_actions(stored, time.time()) == set()


@pytest.mark.anyio
async def test_cancel_racing_claims_never_lets_a_cancelled_job_run(queue_store: QueueStore) -> None:
    """Claims on one queue object and cancels on another, at once, for 20 jobs: each job either runs
    (the cancel was refused: a worker holds it) or is cancelled (a claim takes it only to deliver the
    error), never both."""
    operator, worker = job_queue(queue_store.settings), job_queue(queue_store.settings)
    await asyncio.gather(operator.open(), worker.open())
    try:
        jobs = [(await operator.enqueue(make_job(), f"k{i}", lease_owner=None, lease_seconds=30))[0] for i in range(20)]

        async def cancel(job: Job, after: float) -> bool:
            await asyncio.sleep(after)  # spread out, so that claims and cancels interleave (SQLite: batch by batch)
            try:
                await operator.cancel(job.id, "racer")
                return True
            except JobActionRefused as exc:
                assert exc.reason == "a worker is running it: cancel it while it is queued or waiting for a delivery retry"
                return False

        async def claim_all() -> list[Job]:
            claimed: list[Job] = []
            for _ in range(40):  # bounded: 20 jobs, 1 a claim, each claimed at most twice (to run, or to deliver)
                batch = await worker.claim("w", 1, 30, delivery_limit=1)
                claimed += batch
                await asyncio.sleep(0)
            return claimed

        results = await asyncio.wait_for(asyncio.gather(claim_all(), *(cancel(job, i * 0.002) for i, job in enumerate(reversed(jobs)))), 60)
        claimed, cancelled = results[0], dict(zip((job.id for job in reversed(jobs)), results[1:], strict=True))
        for job in claimed:
            if cancelled[job.id]:
                assert job.state is JobState.DELIVERING and job.outcome == CANCELLED, f"a cancelled job was claimed to run: {job}"
            else:
                assert job.state is JobState.RUNNING and job.outcome is None
        for job in jobs:
            stored = await operator.get(job.id)
            assert stored is not None
            assert (stored.outcome == CANCELLED) == cancelled[job.id]
    finally:
        await asyncio.gather(operator.close(), worker.close())


# -- end to end: `gateway jobs cancel` and `gateway jobs redeliver` against the portal emulator ---------


def wait_state(gw: GatewayProcess, job_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll ``gateway jobs show`` (bounded) until the job is in ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        shown: dict[str, Any] = gw.cli_json("jobs", "show", job_id)
        if shown["state"] == state or time.monotonic() > deadline:
            assert shown["state"] == state, f"job {job_id} is {shown['state']}, not {state}: {shown}\n{gw.logs()[-3000:]}"
            return shown
        time.sleep(0.1)


@pytest.mark.e2e
def test_cancel_and_redeliver_through_the_cli(gateway, portal, upstream):
    """A job accepted while no worker runs is cancelled: the portal gets the error (code ``cancelled``).
    A job whose callback the portal refused ends ``dead``; re-delivered, the portal takes it."""
    gw = gateway(args=("--no-worker",))  # accepts only: nothing runs until the worker below starts
    doomed_hash, body = portal.new_request(prompt="never run")
    assert portal.send(gw.completions_url(), body).status_code == 202
    [queued] = gw.cli_json("jobs", "list")
    assert queued["state"] == "queued"
    cancel = gw.cli("jobs", "cancel", queued["id"])
    assert cancel.stdout.strip() == f"job {queued['id']}: cancelled: a worker delivers the error (code cancelled) to the portal"
    again = gw.cli("jobs", "redeliver", queued["id"], check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"cannot redeliver job {queued['id']}: it is still delivering: the gateway delivers it by itself; re-delivery is for jobs that ended dead"
    )

    worker = gw.popen("worker")
    try:
        error = portal.wait(doomed_hash, 20).delivered
        assert [(c.kind, c.body) for c in error] == [
            ("error", {"message": "cancelled by the gateway's operator", "code": "cancelled", "api_request_completed": False})
        ]
        shown = wait_state(gw, queued["id"], "failed")
        assert [a["kind"] for a in shown["attempts"]] == ["operator", "callback"]
        assert shown["attempts"][0]["detail"].startswith("cancelled by ") and shown["attempts"][0]["detail"].endswith(" (gateway jobs)")
        assert upstream.requests == []  # the model never ran

        portal.fail_next(400)  # the portal refuses the first callback for good: the job ends dead
        job_hash, body = portal.new_request(prompt="deliver me later")
        assert portal.send(gw.completions_url(), body).status_code == 202
        [refused_job, _] = gw.cli_json("jobs", "list")
        shown = wait_state(gw, refused_job["id"], "dead")
        assert shown["detail"] == "portal refused the callback with HTTP 400" and portal.jobs[job_hash].delivered == []
        redeliver = gw.cli("jobs", "redeliver", refused_job["id"])
        assert redeliver.stdout.strip() == f"job {refused_job['id']}: delivering: a worker delivers its outcome again"
        assert [c.body for c in portal.wait(job_hash, 20).delivered] == [{"result": "echo: deliver me later"}]
        shown = wait_state(gw, refused_job["id"], "delivered")
        assert [a["kind"] for a in shown["attempts"]] == ["provider", "callback", "operator", "callback"]
        assert len(upstream.requests) == 1  # delivered again from the stored result: the model ran once
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
