"""The queue contract (gateway/jobs/queue.py), the same tests on every backend: SQLite and PostgreSQL.

Each test runs as ``[sqlite]`` and ``[postgres]`` through the ``queue``/``queue_store`` fixtures
(tests/conftest.py); the PostgreSQL half uses a fresh database of the run's throw-away cluster.
The concurrency tests open several queue objects on one store, as several processes or nodes would.
What only one backend does (SQLite's group commit, its file locks) is tested in that backend's file.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome, new_job_id
from gateway.jobs.queue import JobQueue, QueueItemError, QueueStoreError
from gateway.stores import job_queue
from gateway.tasks import Category, Task, TextPrompt
from tests.conftest import QueueStore

pytestmark = pytest.mark.anyio
TEXT = Outcome(result={"kind": "text", "text": "x"})
SHORT = 1.0
"""A lease (or delay) meant to run out within the test: long enough for the steps before it on a busy machine."""


def make_job(ttl: float = 100.0, callback_url: str = "http://p/cb?hash=a") -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    return Job(task, callback_url, "http://p/err?hash=a")


async def test_enqueue_is_idempotent(queue: JobQueue) -> None:
    first, created = await queue.enqueue(make_job(), "key-1", lease_owner=None, lease_seconds=5)
    again, created_again = await queue.enqueue(make_job(), "key-1", lease_owner=None, lease_seconds=5)
    assert created and not created_again and again.id == first.id
    assert await queue.depth() == 1


async def test_get_and_list(queue: JobQueue) -> None:
    queued, _ = await queue.enqueue(make_job(), "a", lease_owner=None, lease_seconds=5)
    running, _ = await queue.enqueue(make_job(), "b", lease_owner="w1", lease_seconds=5)
    assert await queue.get("no-such-job") is None
    stored = await queue.get(queued.id)
    assert stored is not None and stored.id == queued.id and stored.state is JobState.QUEUED
    assert stored.callback_url == "http://p/cb?hash=a" and stored.task.engine == "e"
    assert [job.id for job in await queue.list(state=JobState.RUNNING)] == [running.id]
    assert sorted(job.id for job in await queue.list()) == sorted([queued.id, running.id])
    assert len(await queue.list(limit=1)) == 1


async def test_claim_lease_expiry_and_resume(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    [claimed] = await queue.claim("w1", 10, lease_seconds=SHORT)
    assert claimed.id == job.id and claimed.state is JobState.RUNNING
    assert await queue.claim("w2", 10, lease_seconds=5) == []
    await asyncio.sleep(SHORT + 0.2)  # w1 died: its lease runs out
    [resumed] = await queue.claim("w2", 10, lease_seconds=5)
    assert resumed.id == job.id
    assert not await queue.store_outcome(job.id, "w1", TEXT, [])  # w1 lost it
    assert await queue.store_outcome(job.id, "w2", TEXT, [])


async def test_renew_keeps_the_lease_for_its_owner_only(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    await queue.claim("w1", 10, lease_seconds=SHORT)
    await queue.renew("w2", [job.id], 60)  # not its lease: no effect
    await queue.renew("w1", [job.id], 60)
    await asyncio.sleep(SHORT + 0.2)
    assert await queue.claim("w2", 10, lease_seconds=5) == []  # renewed: still w1's
    assert await queue.store_outcome(job.id, "w1", TEXT, [])


async def test_local_lease_at_enqueue(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    assert job.state is JobState.RUNNING
    assert await queue.claim("w2", 10, lease_seconds=5) == []


async def test_outcome_then_final_state_once(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    outcome = Outcome(error=JobError("boom", 503))
    attempt = Attempt("provider", "up/m", time.time(), 0.1, "retryable", "HTTP 500")
    assert await queue.store_outcome(job.id, "w1", outcome, [attempt])
    callback = Attempt("callback", "p", time.time(), 0.01, "delivered")
    assert await queue.finish(job.id, "w1", JobState.FAILED, "done", [callback])
    assert not await queue.finish(job.id, "w1", JobState.DELIVERED, "again", [])
    stored = await queue.get(job.id)
    assert stored is not None and stored.state is JobState.FAILED and stored.detail == "done"
    assert stored.outcome is not None and stored.outcome.error is not None and stored.outcome.error.code == 503
    assert [a.kind for a in stored.attempts] == ["provider", "callback"] and stored.delivery_attempts == 1
    assert stored.attempts[0].detail == "HTTP 500" and stored.attempts[0].target == "up/m"
    assert await queue.depth() == 0


async def test_reschedule_releases_and_delays(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    await queue.store_outcome(job.id, "w1", TEXT, [])
    await queue.reschedule(job.id, "w1", time.time() + SHORT, Attempt("callback", "p", time.time(), 0.0, "retry", "HTTP 503"))
    assert await queue.claim("w2", 10, 5) == []
    await asyncio.sleep(SHORT + 0.2)
    [again] = await queue.claim("w2", 10, 5)
    assert again.state is JobState.DELIVERING and again.delivery_attempts == 1
    assert not again.interrupted_delivery  # released, not abandoned


async def test_abandoned_delivery_is_flagged(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=SHORT)
    await queue.store_outcome(job.id, "w1", TEXT, [])
    await asyncio.sleep(SHORT + 0.2)
    [again] = await queue.claim("w2", 10, 5)
    assert again.interrupted_delivery


async def test_prune_deletes_only_old_final_jobs(queue: JobQueue) -> None:
    old, _ = await queue.enqueue(make_job(), "old", lease_owner="w", lease_seconds=5)
    await queue.finish(old.id, "w", JobState.EXPIRED, "gone", [Attempt("callback", "p", 0.0, 0.0, "retry")])
    pending, _ = await queue.enqueue(make_job(), "pending", lease_owner=None, lease_seconds=5)
    assert await queue.prune(time.time() - 3600, 10) == 0  # finished just now: kept
    assert await queue.prune(time.time() + 1, 10) == 1
    assert await queue.get(old.id) is None and (await queue.get(pending.id)) is not None


async def test_an_unreadable_stored_job_is_marked_dead_not_claimed_forever(queue: JobQueue, queue_store: QueueStore) -> None:
    broken, _ = await queue.enqueue(make_job(), "broken", lease_owner=None, lease_seconds=5)
    fine, _ = await queue.enqueue(make_job(), "fine", lease_owner=None, lease_seconds=5)
    await queue_store.corrupt_task(broken.id)
    claimed = await asyncio.wait_for(queue.claim("w", 10, 5), 5)
    assert [job.id for job in claimed] == [fine.id]
    stored = await queue.get(fine.id)
    assert stored is not None and stored.state is JobState.RUNNING
    row = await queue_store.row(broken.id)
    assert row["state"] == "dead" and row["detail"].startswith("the stored job cannot be read: JSONDecodeError") and row["finished_at"]
    assert await queue.claim("w", 10, 5) == []  # not offered again
    assert await queue.depth() == 1


async def test_separate_claim_limits_for_running_and_delivering(queue: JobQueue) -> None:
    to_deliver = []
    for i in range(3):
        job, _ = await queue.enqueue(make_job(), f"d{i}", lease_owner="w1", lease_seconds=5)
        await queue.store_outcome(job.id, "w1", TEXT, [])
        to_deliver.append(job.id)
    await queue.release("w1", to_deliver)
    for i in range(3):
        await queue.enqueue(make_job(), f"r{i}", lease_owner=None, lease_seconds=5)
    claimed = await queue.claim("w2", 1, 5, delivery_limit=2)
    assert sorted(job.state.value for job in claimed) == ["delivering", "delivering", "running"]
    assert [job.state for job in await queue.claim("w2", 0, 5, delivery_limit=5)] == [JobState.DELIVERING]


async def test_internal_errors_deferrals_and_unconfirmed_deliveries_are_remembered(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    failure = Attempt("internal", "execute", time.time(), 0.0, "error", "RuntimeError: \ud800 and \x00 in a message")
    assert await queue.retry_later(job.id, "w1", time.time(), failure)  # a running job: the model work is retried
    [again] = await queue.claim("w2", 10, 5)
    assert again.internal_errors == 1 and again.state is JobState.RUNNING and not again.interrupted_delivery
    await queue.store_outcome(job.id, "w2", TEXT, [])
    timed_out = Attempt("callback", "p", time.time(), 5.0, "retry", "ReadTimeout")
    assert await queue.reschedule(job.id, "w2", time.time(), timed_out, maybe_delivered=True)
    [again] = await queue.claim("w3", 10, 5)
    assert again.maybe_delivered and again.delivery_attempts == 1
    assert await queue.reschedule(job.id, "w3", time.time(), Attempt("callback", "p", time.time(), 0.0, "retry", "HTTP 503"))
    assert await queue.defer(job.id, "w4", time.time()) is False  # not its lease
    [again] = await queue.claim("w4", 10, 5)
    assert again.maybe_delivered  # a later plain failure does not erase it
    assert await queue.defer(job.id, "w4", time.time() + 60)
    assert await queue.claim("w5", 10, 5) == []
    stored = await queue.get(job.id)
    assert stored is not None
    assert [a.kind for a in stored.attempts] == ["internal", "callback", "callback"]
    assert stored.attempts[0].detail == "RuntimeError: \\ud800 and \\x00 in a message"  # stored escaped, not a failed write


async def test_release_defer_and_retry_later_keep_a_maybe_delivered_mark(queue: JobQueue) -> None:
    """Releasing a lease clears its owner, which is how a claim tells a crash: the mark must go to the row instead."""
    ids = []
    for key in ("cut-off", "waiting", "deferred", "retried"):
        job, _ = await queue.enqueue(make_job(), key, lease_owner="w1", lease_seconds=5)
        await queue.store_outcome(job.id, "w1", TEXT, [])
        ids.append(job.id)
    cut_off, waiting, deferred, retried = ids
    await queue.release("w1", [cut_off, waiting], maybe_delivered={cut_off})
    assert await queue.defer(deferred, "w1", time.time(), maybe_delivered=True)
    assert await queue.retry_later(
        retried, "w1", time.time(), Attempt("internal", "deliver", time.time(), 0.0, "error", "QueueStoreError"), maybe_delivered=True
    )
    claimed = {job.id: (job.maybe_delivered, job.interrupted_delivery) for job in await queue.claim("w2", 0, 5, delivery_limit=10)}
    assert claimed == {cut_off: (True, False), waiting: (False, False), deferred: (True, False), retried: (True, False)}


@pytest.mark.parametrize("bad_url", ["http://p/cb?hash=\ud800", "http://p/cb?hash=\x00"], ids=["lone-surrogate", "nul"])
async def test_a_job_the_backend_cannot_encode_fails_alone_and_the_queue_goes_on(queue: JobQueue, bad_url: str) -> None:
    """A value a backend cannot store (a lone surrogate: neither can; a NUL: PostgreSQL's text
    cannot) fails that one enqueue with :class:`QueueItemError` (the accept path may answer 4xx),
    or is stored as it came; the jobs beside it and after it are stored either way."""
    bad = asyncio.ensure_future(queue.enqueue(make_job(callback_url=bad_url), "bad", lease_owner=None, lease_seconds=5))
    beside = asyncio.ensure_future(queue.enqueue(make_job(), "beside", lease_owner=None, lease_seconds=5))
    try:
        stored_bad, _ = await asyncio.wait_for(bad, 5)
    except QueueStoreError as error:
        assert type(error) is QueueItemError, f"{type(error).__name__}: {error}"  # the job, not the queue
        assert str(error).startswith("this job cannot be stored: ")
        stored_bad = None
    if "\ud800" in bad_url:
        assert stored_bad is None  # no backend stores a lone surrogate
    _, created = await asyncio.wait_for(beside, 5)
    later, created_later = await asyncio.wait_for(queue.enqueue(make_job(), "later", lease_owner=None, lease_seconds=5), 5)
    assert created and created_later
    assert await asyncio.wait_for(queue.depth(), 5) == (2 if stored_bad is None else 3)
    stored_later = await queue.get(later.id)
    assert stored_later is not None and stored_later.state is JobState.QUEUED
    if stored_bad is not None:
        again = await queue.get(stored_bad.id)
        assert again is not None and again.callback_url == bad_url  # stored as it came, not altered


async def test_a_closed_queue_refuses_work_with_a_queue_error(queue_store: QueueStore) -> None:
    q = job_queue(queue_store.settings)
    await q.open()
    await q.close()
    with pytest.raises(QueueStoreError):
        await q.enqueue(make_job(), "late", lease_owner=None, lease_seconds=5)


# -- concurrency: several queue objects on one store, as several processes or nodes -------------------


async def open_queues(store: QueueStore, count: int) -> list[JobQueue]:
    """``count`` queue objects on one store, each with its own connection(s). (SQLite queues in one
    process once deadlocked here: waiting for each other's write lock in the event loop's shared
    thread pool, they took every thread while the holder's COMMIT waited behind them; each queue
    now has a thread of its own.)"""
    queues = [job_queue(store.settings) for _ in range(count)]
    await asyncio.gather(*(q.open() for q in queues))
    return queues


async def close_queues(queues: list[JobQueue]) -> None:
    await asyncio.gather(*(q.close() for q in queues), return_exceptions=True)


async def test_concurrent_claimers_never_hold_the_same_job(queue_store: QueueStore) -> None:
    """8 claimers on their own connections take 200 jobs at once, in small bites: every job is
    claimed exactly once while the leases hold, none is left behind."""
    queues = await open_queues(queue_store, 8)
    try:
        jobs = await asyncio.gather(*(queues[i % len(queues)].enqueue(make_job(), f"k{i}", lease_owner=None, lease_seconds=60) for i in range(200)))
        expected = {job.id for job, _ in jobs}
        assert len(expected) == 200

        async def claimer(q: JobQueue, owner: str) -> list[tuple[str, str]]:
            got: list[tuple[str, str]] = []
            for _ in range(200):  # bounded: 200 jobs take at most 200 non-empty claims
                batch = await q.claim(owner, 3, lease_seconds=60)
                if not batch:
                    return got
                got += [(job.id, owner) for job in batch]
                await asyncio.sleep(0)
            return got

        results = await asyncio.wait_for(asyncio.gather(*(claimer(q, f"w{i}") for i, q in enumerate(queues))), 120)
        claims = [claim for result in results for claim in result]
        twice = [job_id for job_id, count in Counter(job_id for job_id, _ in claims).items() if count > 1]
        assert twice == [], f"{len(twice)} jobs were claimed twice within their lease"
        assert {job_id for job_id, _ in claims} == expected
        assert await queues[0].claim("late", 10, lease_seconds=60) == []
        # Each lease is held by the claimer that got the job, and by no other.
        stolen = await asyncio.gather(*(queues[1].store_outcome(job_id, "someone-else", TEXT, []) for job_id, _ in claims))
        assert not any(stolen)
        stored = await asyncio.gather(*(queues[int(owner[1:])].store_outcome(job_id, owner, TEXT, []) for job_id, owner in claims))
        assert all(stored)
    finally:
        await close_queues(queues)


async def test_concurrent_duplicate_accepts_make_one_job(queue_store: QueueStore) -> None:
    """The same idempotency key enqueued at once through 20 queue objects (connections; SQLite: 4): exactly one
    is created, every other caller gets that job's id back."""
    queues = await open_queues(queue_store, 20)
    try:
        results = await asyncio.wait_for(asyncio.gather(*(q.enqueue(make_job(), "portal-hash-1", lease_owner=None, lease_seconds=60) for q in queues)), 60)
        assert sum(created for _, created in results) == 1
        assert len({job.id for job, _ in results}) == 1
        assert await queues[0].depth() == 1
        # And with the accepting worker's lease, as a node with a free slot enqueues: still one job, one owner.
        results = await asyncio.wait_for(
            asyncio.gather(*(q.enqueue(make_job(), "portal-hash-2", lease_owner=f"n{i}", lease_seconds=60) for i, q in enumerate(queues))), 60
        )
        assert sum(created for _, created in results) == 1 and len({job.id for job, _ in results}) == 1
        [running] = await queues[0].list(state=JobState.RUNNING)
        assert running.id == results[0][0].id
        held = await asyncio.gather(*(q.store_outcome(running.id, f"n{i}", TEXT, []) for i, q in enumerate(queues)))
        assert sum(held) == 1 and held.index(True) == next(i for i, (_, created) in enumerate(results) if created)  # the creator's lease
        assert await queues[0].depth() == 2
    finally:
        await close_queues(queues)
