import asyncio
import time

import pytest

from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome, new_job_id
from gateway.jobs.sqlite import QueueStoreError, SQLiteJobQueue
from gateway.tasks import Category, Task, TextPrompt

pytestmark = pytest.mark.anyio


def make_job(ttl: float = 100.0) -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    return Job(task, "http://p/cb?hash=a", "http://p/err?hash=a")


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


def make_job_with(callback_url: str, ttl: float = 100.0) -> Job:
    job = make_job(ttl)
    job.callback_url = callback_url
    return job


async def test_a_job_sqlite_cannot_encode_fails_alone_and_the_queue_goes_on(queue):
    """A lone surrogate in a URL (JSON "\\ud800") cannot be encoded for SQLite: that enqueue
    fails with a clear error, the others of its batch are stored, and later ones too."""
    bad = asyncio.ensure_future(queue.enqueue(make_job_with("http://p/cb?hash=\ud800"), "bad", lease_owner=None, lease_seconds=5))
    same_batch = asyncio.ensure_future(queue.enqueue(make_job(), "same-batch", lease_owner=None, lease_seconds=5))
    with pytest.raises(QueueStoreError, match="this job cannot be stored: UnicodeEncodeError") as caught:
        await asyncio.wait_for(bad, 5)
    assert type(caught.value).__name__ == "QueueItemError"  # the job, not the queue: the accept path may answer 4xx
    _, created = await asyncio.wait_for(same_batch, 5)
    later, created_later = await asyncio.wait_for(queue.enqueue(make_job(), "later", lease_owner=None, lease_seconds=5), 5)
    assert created and created_later
    assert await asyncio.wait_for(queue.depth(), 5) == 2
    assert (await queue.get(later.id)).state is JobState.QUEUED


async def test_an_unexpected_error_in_a_batch_rolls_it_back_and_the_queue_goes_on(queue, monkeypatch):
    """Not a sqlite3.Error: the batch's callers get QueueStoreError, nothing of it is kept, the next batch works."""
    import gateway.jobs.sqlite as sqlite_queue

    real = sqlite_queue._insert_many

    def insert_then_fail(conn, ops):
        real(conn, ops)  # rows written inside the transaction...
        raise RuntimeError("a bug")  # ...then something unexpected

    monkeypatch.setattr(sqlite_queue, "_insert_many", insert_then_fail)
    with pytest.raises(QueueStoreError, match="unexpected RuntimeError: a bug"):
        await asyncio.wait_for(queue.enqueue(make_job(), "k1", lease_owner=None, lease_seconds=5), 5)
    monkeypatch.setattr(sqlite_queue, "_insert_many", real)
    _, created = await asyncio.wait_for(queue.enqueue(make_job(), "k2", lease_owner=None, lease_seconds=5), 5)
    assert created
    assert await asyncio.wait_for(queue.depth(), 5) == 1  # the failed batch was rolled back


async def test_a_flusher_that_dies_is_restarted_and_callers_get_an_error(tmp_path, monkeypatch):
    from gateway.metrics import Metrics
    from gateway.supervision import Supervisor

    metrics = Metrics()
    q = SQLiteJobQueue(tmp_path / "q.sqlite3", supervisor=Supervisor(metrics, restart_initial=0.05))
    await q.open()
    real = q._run_batch
    calls = 0

    async def crash_once(batch):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("flusher bug")
        await real(batch)

    monkeypatch.setattr(q, "_run_batch", crash_once)
    with pytest.raises(QueueStoreError, match="the flusher stopped"):
        await asyncio.wait_for(q.enqueue(make_job(), "k1", lease_owner=None, lease_seconds=5), 5)
    assert q.supervisor.down() == {"queue-flusher": "RuntimeError: flusher bug"}
    _, created = await asyncio.wait_for(q.enqueue(make_job(), "k2", lease_owner=None, lease_seconds=5), 5)
    assert created and q.supervisor.down() == {}
    assert metrics.loop_restarts.labels("queue-flusher")._value.get() == 1
    await asyncio.wait_for(q.close(), 5)


async def test_an_unreadable_stored_job_is_marked_dead_not_claimed_forever(tmp_path):
    import sqlite3

    path = tmp_path / "q.sqlite3"
    q = SQLiteJobQueue(path)
    await q.open()
    broken, _ = await q.enqueue(make_job(), "broken", lease_owner=None, lease_seconds=5)
    fine, _ = await q.enqueue(make_job(), "fine", lease_owner=None, lease_seconds=5)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("UPDATE jobs SET task = '{not json' WHERE id = ?", (broken.id,))
    other.close()
    claimed = await asyncio.wait_for(q.claim("w", 10, 5), 5)
    assert [job.id for job in claimed] == [fine.id]
    stored = await q.get(fine.id)
    assert stored.state is JobState.RUNNING
    row = await q._run(lambda conn: conn.execute("SELECT state, detail, finished_at FROM jobs WHERE id = ?", (broken.id,)).fetchone())
    assert row["state"] == "dead" and row["detail"].startswith("the stored job cannot be read: JSONDecodeError") and row["finished_at"]
    await q.close()


async def test_separate_claim_limits_for_running_and_delivering(queue):
    to_deliver = []
    for i in range(3):
        job, _ = await queue.enqueue(make_job(), f"d{i}", lease_owner="w1", lease_seconds=5)
        await queue.store_outcome(job.id, "w1", Outcome(result={"kind": "text", "text": "x"}), [])
        to_deliver.append(job.id)
    await queue.release("w1", to_deliver)
    for i in range(3):
        await queue.enqueue(make_job(), f"r{i}", lease_owner=None, lease_seconds=5)
    claimed = await queue.claim("w2", 1, 5, delivery_limit=2)
    assert sorted(job.state.value for job in claimed) == ["delivering", "delivering", "running"]
    assert [job.state for job in await queue.claim("w2", 0, 5, delivery_limit=5)] == [JobState.DELIVERING]


async def test_internal_errors_deferrals_and_unconfirmed_deliveries_are_remembered(queue):
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    failure = Attempt("internal", "execute", time.time(), 0.0, "error", "RuntimeError: \ud800 in a message")
    assert await queue.retry_later(job.id, "w1", time.time(), failure)  # a running job: the model work is retried
    [again] = await queue.claim("w2", 10, 5)
    assert again.internal_errors == 1 and again.state is JobState.RUNNING and not again.interrupted_delivery
    await queue.store_outcome(job.id, "w2", Outcome(result={"kind": "text", "text": "x"}), [])
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
    assert [a.kind for a in stored.attempts] == ["internal", "callback", "callback"]
    assert stored.attempts[0].detail == "RuntimeError: \\ud800 in a message"  # stored escaped, not a failed write


async def test_a_database_from_before_the_new_columns_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "q.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, idem_key TEXT NOT NULL UNIQUE, engine TEXT NOT NULL, category TEXT NOT NULL,
            state TEXT NOT NULL, task TEXT NOT NULL, callback_url TEXT NOT NULL, error_callback_url TEXT NOT NULL,
            accepted_at REAL NOT NULL, deadline REAL NOT NULL, next_at REAL NOT NULL, lease_owner TEXT, lease_until REAL,
            outcome TEXT, delivery_attempts INTEGER NOT NULL DEFAULT 0, finished_at REAL, detail TEXT NOT NULL DEFAULT '');
    """)
    old.close()
    q = SQLiteJobQueue(path)
    await q.open()
    job, _ = await q.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    [claimed] = await q.claim("w", 10, 5)
    assert claimed.id == job.id and claimed.internal_errors == 0 and not claimed.maybe_delivered
    await q.close()


async def test_release_defer_and_retry_later_keep_a_maybe_delivered_mark(queue):
    """Releasing a lease clears its owner, which is how a claim tells a crash: the mark must go to the row instead."""
    ids = []
    for key in ("cut-off", "waiting", "deferred", "retried"):
        job, _ = await queue.enqueue(make_job(), key, lease_owner="w1", lease_seconds=5)
        await queue.store_outcome(job.id, "w1", Outcome(result={"kind": "text", "text": "x"}), [])
        ids.append(job.id)
    cut_off, waiting, deferred, retried = ids
    await queue.release("w1", [cut_off, waiting], maybe_delivered={cut_off})
    assert await queue.defer(deferred, "w1", time.time(), maybe_delivered=True)
    assert await queue.retry_later(
        retried, "w1", time.time(), Attempt("internal", "deliver", time.time(), 0.0, "error", "QueueStoreError"), maybe_delivered=True
    )
    claimed = {job.id: (job.maybe_delivered, job.interrupted_delivery) for job in await queue.claim("w2", 0, 5, delivery_limit=10)}
    assert claimed == {cut_off: (True, False), waiting: (False, False), deferred: (True, False), retried: (True, False)}


class FailingBegin:
    """Stands in for the queue's connection: ``BEGIN IMMEDIATE`` raises ``error`` once, all else goes to the real one."""

    def __init__(self, conn: object, error: Exception) -> None:
        self.conn, self.error = conn, error

    def execute(self, sql: str, *args: object) -> object:
        if sql == "BEGIN IMMEDIATE" and self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


@pytest.mark.parametrize(("message", "waits"), [("disk I/O error", False), ("database is locked", True)])
async def test_only_a_held_lock_is_waited_for(queue, monkeypatch, message, waits):
    import sqlite3

    import gateway.jobs.sqlite as sqlite_queue

    waited = []
    real_wait = sqlite_queue._begin_waiting

    def begin_waiting(conn: sqlite3.Connection, timeout: float) -> None:
        waited.append(timeout)
        real_wait(conn, timeout)

    monkeypatch.setattr(sqlite_queue, "_begin_waiting", begin_waiting)
    real = queue._conn
    queue._conn = FailingBegin(real, sqlite3.OperationalError(message))
    try:
        if waits:
            assert await asyncio.wait_for(queue.depth(), 5) == 0
        else:
            with pytest.raises(QueueStoreError, match=f"q.sqlite3: {message}$"):
                await asyncio.wait_for(queue.depth(), 5)
    finally:
        queue._conn = real
    assert len(waited) == (1 if waits else 0)
    assert await queue.depth() == 0  # the queue goes on
