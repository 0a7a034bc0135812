"""What only the SQLite queue does: group commit, the file and its lock, schema upgrades, the flusher.
The queue contract both backends keep is tested in tests/test_queue_contract.py."""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.jobs.model import Job, new_job_id
from gateway.jobs.sqlite import QueueStoreError, SQLiteJobQueue
from gateway.tasks import Category, Task, TextPrompt

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sqlite_queue(tmp_path: Path) -> AsyncIterator[SQLiteJobQueue]:
    """An open SQLite queue in a temporary folder, closed after the test."""
    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    await q.open()
    yield q
    await q.close()


def make_job(ttl: float = 100.0) -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    return Job(task, "http://p/cb?hash=a", "http://p/err?hash=a")


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


async def test_an_unexpected_error_in_a_batch_rolls_it_back_and_the_queue_goes_on(sqlite_queue, monkeypatch):
    queue = sqlite_queue
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
async def test_only_a_held_lock_is_waited_for(sqlite_queue, monkeypatch, message, waits):
    queue = sqlite_queue
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
