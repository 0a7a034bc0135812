"""The embedded job queue on SQLite.

All writes go through one thread that owns the connection. It takes every operation
waiting at that moment into a single transaction (group commit): under load many accepts
share one fsync, so durability (WAL, ``synchronous=FULL``) costs latency only once per
batch, not throughput. Several processes may share the file; SQLite's lock and the
leases keep them apart.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.jobs.model import FINAL_STATES, Attempt, Job, JobState, Outcome
from gateway.tasks import Task

T = TypeVar("T")
PENDING = ("queued", "running", "delivering")
_PENDING_SQL = "state IN ('queued', 'running', 'delivering')"
MAX_BATCH = 512

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
    __slots__ = ("fn", "future", "loop")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.future, self.loop = fn, future, loop


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _WriterThread(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name="gateway-sqlite-writer", daemon=True)
        self.path = path
        self.ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = connect(self.path)
            conn.executescript(SCHEMA)
        except BaseException as exc:  # reported to open()
            self.startup_error = exc
            self.ready.set()
            return
        self.ready.set()
        while True:
            op = self.ops.get()
            if op is None:
                break
            batch = [op]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self.ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.ops.put(None)
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((op, op.fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op, None, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = QueueStoreError(f"queue database {self.path}: {exc}")
            results = [(op, None, error) for op in batch]
        for op, result, error in results:
            op.loop.call_soon_threadsafe(_resolve, op.future, result, error)


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the 202 leaves
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


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


class SQLiteJobQueue:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer: _WriterThread | None = None

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueStoreError(f"cannot create the directory for queue database {self.path}: {exc}") from exc
        self._writer = _WriterThread(self.path)
        self._writer.start()
        await asyncio.to_thread(self._writer.ready.wait)
        if self._writer.startup_error is not None:
            raise QueueStoreError(f"cannot open queue database {self.path}: {self._writer.startup_error}")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.ops.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._writer is None:
            raise QueueStoreError("the queue is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writer.ops.put(_Op(fn, future, loop))
        return future

    async def enqueue(self, job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float) -> tuple[Job, bool]:
        def op(conn: sqlite3.Connection) -> tuple[Job, bool]:
            now = time.time()
            cursor = conn.execute(
                "INSERT INTO jobs (id, idem_key, engine, category, state, task, callback_url, error_callback_url,"
                " accepted_at, deadline, next_at, lease_owner, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idem_key) DO NOTHING",
                (
                    job.id, idempotency_key, job.engine, job.category,
                    "running" if lease_owner else "queued",
                    json.dumps(job.task.to_json()), job.callback_url, job.error_callback_url,
                    job.accepted_at, job.deadline, now, lease_owner, now + lease_seconds if lease_owner else None,
                ),
            )
            if cursor.rowcount == 1:
                return job, True
            row = conn.execute("SELECT * FROM jobs WHERE idem_key = ?", (idempotency_key,)).fetchone()
            return _row_to_job(row), False

        stored, created = await self._run(op)
        if created and lease_owner:
            stored.state = JobState.RUNNING
        return stored, created

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

    async def depth(self) -> int:
        return await self._run(lambda conn: conn.execute(f"SELECT count(*) FROM jobs WHERE {_PENDING_SQL}").fetchone()[0])
