import asyncio
import time

import pytest

from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome, new_job_id
from gateway.jobs.sqlite import QueueStoreError, SQLiteJobQueue
from gateway.tasks import Category, Task

pytestmark = pytest.mark.anyio


def make_job(ttl: float = 100.0) -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt="p", accepted_at=now, deadline=now + ttl)
    return Job(job_id, "e", "text", JobState.QUEUED, task, "http://p/cb?hash=a", "http://p/err?hash=a", now, now + ttl)


@pytest.fixture
async def queue(tmp_path):
    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    await q.open()
    yield q
    await q.close()


async def test_enqueue_is_idempotent(queue):
    first, created = await queue.enqueue(make_job(), "key-1", lease_owner=None, lease_seconds=5)
    again, created_again = await queue.enqueue(make_job(), "key-1", lease_owner=None, lease_seconds=5)
    assert created and not created_again and again.id == first.id
    assert await queue.depth() == 1


async def test_claim_lease_expiry_and_resume(queue):
    job, _ = await queue.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    [claimed] = await queue.claim("w1", 10, lease_seconds=0.2)
    assert claimed.id == job.id and claimed.state is JobState.RUNNING
    assert await queue.claim("w2", 10, lease_seconds=5) == []
    await asyncio.sleep(0.25)  # w1 died: its lease runs out
    [resumed] = await queue.claim("w2", 10, lease_seconds=5)
    assert resumed.id == job.id
    assert not await queue.store_outcome(job.id, "w1", Outcome(result={"kind": "text", "text": "x"}), [])  # w1 lost it
    assert await queue.store_outcome(job.id, "w2", Outcome(result={"kind": "text", "text": "x"}), [])


async def test_local_lease_at_enqueue(queue):
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    assert job.state is JobState.RUNNING
    assert await queue.claim("w2", 10, lease_seconds=5) == []


async def test_outcome_then_final_state_once(queue):
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    outcome = Outcome(error=JobError("boom", 503))
    attempt = Attempt("provider", "up/m", time.time(), 0.1, "retryable", "HTTP 500")
    assert await queue.store_outcome(job.id, "w1", outcome, [attempt])
    callback = Attempt("callback", "p", time.time(), 0.01, "delivered")
    assert await queue.finish(job.id, "w1", JobState.FAILED, "done", [callback])
    assert not await queue.finish(job.id, "w1", JobState.DELIVERED, "again", [])
    stored = await queue.get(job.id)
    assert stored.state is JobState.FAILED and stored.outcome.error.code == 503
    assert [a.kind for a in stored.attempts] == ["provider", "callback"] and stored.delivery_attempts == 1
    assert await queue.depth() == 0


async def test_reschedule_releases_and_delays(queue):
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    await queue.store_outcome(job.id, "w1", Outcome(result={"kind": "text", "text": "x"}), [])
    await queue.reschedule(job.id, "w1", time.time() + 0.2, Attempt("callback", "p", time.time(), 0.0, "retry", "HTTP 503"))
    assert await queue.claim("w2", 10, 5) == []
    await asyncio.sleep(0.25)
    [again] = await queue.claim("w2", 10, 5)
    assert again.state is JobState.DELIVERING and again.delivery_attempts == 1
    assert not again.interrupted_delivery  # released, not abandoned


async def test_abandoned_delivery_is_flagged(queue):
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=0.1)
    await queue.store_outcome(job.id, "w1", Outcome(result={"kind": "text", "text": "x"}), [])
    await asyncio.sleep(0.15)
    [again] = await queue.claim("w2", 10, 5)
    assert again.interrupted_delivery


async def test_concurrent_enqueues_share_commits_and_survive_reopen(tmp_path):
    path = tmp_path / "q.sqlite3"
    q = SQLiteJobQueue(path)
    await q.open()
    results = await asyncio.gather(*[q.enqueue(make_job(), f"k{i}", lease_owner=None, lease_seconds=5) for i in range(300)])
    assert all(created for _, created in results)
    await q.close()
    reopened = SQLiteJobQueue(path)
    await reopened.open()
    assert await reopened.depth() == 300
    await reopened.close()


async def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(QueueStoreError, match="cannot"):
        await SQLiteJobQueue(blocker / "q.sqlite3").open()


async def test_prune_deletes_only_old_final_jobs(queue):
    old, _ = await queue.enqueue(make_job(), "old", lease_owner="w", lease_seconds=5)
    await queue.finish(old.id, "w", JobState.EXPIRED, "gone", [Attempt("callback", "p", 0.0, 0.0, "retry")])
    pending, _ = await queue.enqueue(make_job(), "pending", lease_owner=None, lease_seconds=5)
    assert await queue.prune(time.time() - 3600, 10) == 0  # finished just now: kept
    assert await queue.prune(time.time() + 1, 10) == 1
    assert await queue.get(old.id) is None and (await queue.get(pending.id)) is not None


async def test_close_finishes_the_batch_being_committed(tmp_path):
    """A batch still waiting in its thread (here: for a lock another process holds) when
    close() is called completes, and its callers get their answers."""
    import sqlite3

    path = tmp_path / "q.sqlite3"
    q = SQLiteJobQueue(path)
    await q.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing
    pending = [asyncio.ensure_future(q.enqueue(make_job(), f"k{i}", lease_owner=None, lease_seconds=5)) for i in range(50)]
    await asyncio.sleep(0.05)  # the flusher took the batch and waits for the lock in a thread
    closing = asyncio.ensure_future(q.close())
    await asyncio.sleep(0.1)
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(closing, 5)
    results = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert all(created for _, created in results)
    with pytest.raises(QueueStoreError, match="not open"):
        await q.enqueue(make_job(), "late", lease_owner=None, lease_seconds=5)
    reopened = SQLiteJobQueue(path)
    await reopened.open()
    assert await reopened.depth() == 50
    await reopened.close()
