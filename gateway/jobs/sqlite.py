"""The embedded job queue on SQLite.

Operations queue up on the event loop and a single flusher task runs them in batches,
one transaction per batch (group commit): under load many accepts share one fsync, so
durability (WAL, ``synchronous=FULL``) costs latency once per batch, not throughput.

The statements themselves run on the event loop thread, where they take microseconds.
Running them in a thread instead makes each one hand the GIL back to a busy event loop,
which can wait a whole switch interval (5 ms) per statement. Only the calls that block
leave the loop: the fsync of ``COMMIT`` (one thread hand-off per batch), and waiting for
a write lock that another process holds.
Several processes may share the file; SQLite's lock and the leases keep them apart.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.jobs.model import FINAL_STATES, Attempt, Job, JobState, Outcome
from gateway.tasks import Task

T = TypeVar("T")
_PENDING_SQL = "state IN ('queued', 'running', 'delivering')"
MAX_BATCH = 512
INSERT_COLUMNS = (
    "id, idem_key, engine, category, state, task, callback_url, error_callback_url,"
    " accepted_at, deadline, next_at, lease_owner, lease_until"
)
INSERT_ROW = "(" + ", ".join("?" * 13) + ")"
INSERT_CHUNK = 256  # 13 parameters a row: well under SQLite's limit per statement
LOCK_TIMEOUT = 10.0

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idem_key TEXT NOT NULL UNIQUE,
    engine TEXT NOT NULL,
    category TEXT NOT NULL,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    callback_url TEXT NOT NULL,
    error_callback_url TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    deadline REAL NOT NULL,
    next_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    outcome TEXT,
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    finished_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (next_at) WHERE {_PENDING_SQL};
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    started_at REAL NOT NULL,
    duration REAL NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id, seq);
"""


class QueueStoreError(Exception):
    """The queue database cannot be opened or written."""


class _Op:
    """One queued operation: a function of the connection, or a new job's row to insert."""

    __slots__ = ("fn", "insert", "future")

    def __init__(self, future: asyncio.Future[Any], fn: Callable[[sqlite3.Connection], Any] | None = None, insert: tuple[Any, ...] | None = None) -> None:
        self.future, self.fn, self.insert = future, fn, insert


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the 202 leaves
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _begin_waiting(conn: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, retried while another process holds the write lock (runs in a thread)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _row_to_job(row: sqlite3.Row, attempts: list[Attempt] | None = None) -> Job:
    return Job(
        id=row["id"],
        engine=row["engine"],
        category=row["category"],
        state=JobState(row["state"]),
        task=Task.from_json(json.loads(row["task"])),
        callback_url=row["callback_url"],
        error_callback_url=row["error_callback_url"],
        accepted_at=row["accepted_at"],
        deadline=row["deadline"],
        outcome=Outcome.from_json(json.loads(row["outcome"])) if row["outcome"] else None,
        delivery_attempts=row["delivery_attempts"],
        next_at=row["next_at"],
        finished_at=row["finished_at"],
        detail=row["detail"],
        attempts=attempts or [],
    )


def _insert_attempts(conn: sqlite3.Connection, job_id: str, attempts: list[Attempt]) -> None:
    conn.executemany(
        "INSERT INTO attempts (job_id, kind, target, started_at, duration, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(job_id, a.kind, a.target, a.started_at, a.duration, a.outcome, a.detail) for a in attempts],
    )


def _insert_many(conn: sqlite3.Connection, ops: list[_Op]) -> list[tuple[_Op, Any, BaseException | None]]:
    """Insert new jobs in multi-row statements; an op whose idempotency key is known gets
    the stored job back instead of None."""
    results: list[tuple[_Op, Any, BaseException | None]] = []
    for start in range(0, len(ops), INSERT_CHUNK):
        chunk = ops[start:start + INSERT_CHUNK]
        rows = [op.insert for op in chunk if op.insert is not None]
        before = conn.total_changes
        conn.execute(
            f"INSERT INTO jobs ({INSERT_COLUMNS}) VALUES {', '.join([INSERT_ROW] * len(rows))} ON CONFLICT (idem_key) DO NOTHING",
            [value for row in rows for value in row],
        )
        if conn.total_changes - before == len(rows):
            results.extend((op, None, None) for op in chunk)
            continue
        keys = [row[1] for row in rows]
        found = conn.execute(f"SELECT * FROM jobs WHERE idem_key IN ({', '.join('?' * len(keys))})", keys).fetchall()
        stored = {r["idem_key"]: r for r in found}
        for op, row in zip(chunk, rows, strict=True):
            existing = stored[row[1]]
            results.append((op, None if existing["id"] == row[0] else _row_to_job(existing), None))
    return results


class SQLiteJobQueue:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        def setup() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            conn.executescript(SCHEMA)
            conn.execute("PRAGMA busy_timeout=0")  # from now on, waits for the lock happen in _begin
            return conn

        try:
            self._conn = await asyncio.to_thread(setup)
        except (OSError, sqlite3.Error) as exc:
            raise QueueStoreError(f"cannot open queue database {self.path}: {exc}") from exc
        self._wakeup = asyncio.Event()
        self._closing = False
        self._flusher = asyncio.create_task(self._flush_forever(), name="gateway-sqlite-flusher")

    async def close(self) -> None:
        """Finish every queued operation (a batch being committed included), then close."""
        if self._flusher is None or self._conn is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._flusher
        self._conn.close()
        self._conn = self._flusher = None

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._run_batch(batch)
            if self._closing:
                return

    async def _run_batch(self, batch: list[_Op]) -> None:
        """One transaction and one fsync for the whole batch."""
        conn = self._conn
        assert conn is not None
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            await self._begin(conn)
            inserts = [op for op in batch if op.insert is not None]
            if inserts:
                results.extend(_insert_many(conn, inserts))
            for op in batch:
                if op.fn is None:
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((op, op.fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op, None, exc))
            await asyncio.to_thread(conn.execute, "COMMIT")  # the fsync, off the event loop
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = QueueStoreError(f"queue database {self.path}: {exc}")
            results = [(op, None, failure) for op in batch]
        for op, result, error in results:
            if op.future.done():
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """Take the write lock: at once when it is free, else wait for it in a thread.

        The connection's busy timeout is 0, so a lock held by another process fails fast
        here instead of stalling the event loop.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            await asyncio.to_thread(_begin_waiting, conn, LOCK_TIMEOUT)

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        if self._flusher is None or self._closing:
            raise QueueStoreError("the queue is not open")
        self._pending.append(op)
        self._wakeup.set()
        return op.future

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        return self._submit(_Op(asyncio.get_running_loop().create_future(), fn=fn))

    async def enqueue(self, job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float) -> tuple[Job, bool]:
        now = time.time()
        row = (
            job.id, idempotency_key, job.engine, job.category, "running" if lease_owner else "queued",
            json.dumps(job.task.to_json()), job.callback_url, job.error_callback_url,
            job.accepted_at, job.deadline, now, lease_owner, now + lease_seconds if lease_owner else None,
        )
        existing = await self._submit(_Op(asyncio.get_running_loop().create_future(), insert=row))
        if existing is not None:
            return existing, False
        job.state = JobState.RUNNING if lease_owner else JobState.QUEUED
        return job, True

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            now = time.time()
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE {_PENDING_SQL} AND next_at <= ?"
                " AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            jobs = []
            for row in rows:
                state = "running" if row["state"] == "queued" else row["state"]
                conn.execute(
                    "UPDATE jobs SET state = ?, lease_owner = ?, lease_until = ? WHERE id = ?",
                    (state, owner, now + lease_seconds, row["id"]),
                )
                job = _row_to_job(row)
                job.state = JobState(state)
                # Reschedule and release clear the owner: one still set means its worker died.
                job.interrupted_delivery = row["state"] == "delivering" and row["lease_owner"] is not None
                jobs.append(job)
            return jobs

        return await self._run(op)

    async def renew(self, owner: str, job_ids: list[str], lease_seconds: float) -> None:
        if not job_ids:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                [(time.time() + lease_seconds, job_id, owner) for job_id in job_ids],
            )

        await self._run(op)

    async def release(self, owner: str, job_ids: list[str]) -> None:
        if not job_ids:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ? AND {_PENDING_SQL}",
                [(job_id, owner) for job_id in job_ids],
            )

        await self._run(op)

    async def store_outcome(self, job_id: str, owner: str, outcome: Outcome, attempts: list[Attempt]) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE jobs SET outcome = ?, state = 'delivering' WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (json.dumps(outcome.to_json()), job_id, owner),
            )
            if cursor.rowcount == 1:
                _insert_attempts(conn, job_id, attempts)
            return cursor.rowcount == 1

        return await self._run(op)

    async def reschedule(self, job_id: str, owner: str, next_at: float, attempt: Attempt) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE jobs SET next_at = ?, lease_owner = NULL, lease_until = NULL,"
                " delivery_attempts = delivery_attempts + 1, detail = ?"
                " WHERE id = ? AND lease_owner = ? AND state = 'delivering'",
                (next_at, attempt.detail, job_id, owner),
            )
            if cursor.rowcount == 1:
                _insert_attempts(conn, job_id, [attempt])
            return cursor.rowcount == 1

        return await self._run(op)

    async def finish(self, job_id: str, owner: str, state: JobState, detail: str, attempts: list[Attempt]) -> bool:
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")

        def op(conn: sqlite3.Connection) -> bool:
            callbacks = sum(1 for a in attempts if a.kind == "callback")
            cursor = conn.execute(
                f"UPDATE jobs SET state = ?, detail = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL,"
                f" delivery_attempts = delivery_attempts + ? WHERE id = ? AND lease_owner = ? AND {_PENDING_SQL}",
                (state.value, detail, time.time(), callbacks, job_id, owner),
            )
            if cursor.rowcount == 1:
                _insert_attempts(conn, job_id, attempts)
            return cursor.rowcount == 1

        return await self._run(op)

    async def get(self, job_id: str) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            attempts = [
                Attempt(r["kind"], r["target"], r["started_at"], r["duration"], r["outcome"], r["detail"])
                for r in conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY seq", (job_id,))
            ]
            return _row_to_job(row, attempts)

        return await self._run(op)

    async def list(self, *, state: JobState | None = None, limit: int = 50) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            if state is None:
                rows = conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = conn.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (state.value, limit))
            return [_row_to_job(row) for row in rows]

        return await self._run(op)

    async def prune(self, finished_before: float, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?", (finished_before, limit))]
            marks = ", ".join("?" * len(ids))
            if ids:
                conn.execute(f"DELETE FROM attempts WHERE job_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            return len(ids)

        return await self._run(op)

    async def depth(self) -> int:
        return await self._run(lambda conn: conn.execute(f"SELECT count(*) FROM jobs WHERE {_PENDING_SQL}").fetchone()[0])
