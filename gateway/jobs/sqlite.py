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

One bad operation never stops the flusher. What one operation brings (a value SQLite
refuses, a constraint it breaks, a string it cannot encode in a new job's row) fails that
operation's caller alone; the others in the batch are committed. An error of the database
itself (locked past the wait, disk full, I/O error, corruption: ``OperationalError`` and
the like), whichever operation meets it, rolls the whole batch back and fails every caller
in it with :class:`QueueStoreError`; the flusher goes on with the next batch. It runs under
a :class:`~gateway.supervision.Supervisor` besides, which restarts it should it still stop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.jobs.model import Job
from gateway.jobs.queue import (
    CANCELLED,
    NO_SUCH_JOB,
    AcceptedCount,
    Action,
    Activity,
    FinishedCount,
    JobActionRefused,
    JobFilter,
    PortalUsageCount,
    QueueItemError,
    QueueStoreError,
    action_refusal,
    plausible_job_id,
)
from gateway.jobs.rows import (
    INSERT_COLUMNS,
    callback_host,
    filter_where,
    insert_values,
    job_from_row,
    latency_bucket_sql,
    outcome_json,
    readable_job_from_row,
    storable,
    unreadable,
)
from gateway.outcomes import (
    FINAL_STATES,
    PENDING_STATES,
    Attempt,
    AttemptKind,
    AttemptOutcome,
    JobState,
    Outcome,
    stored_attempt,
)
from gateway.supervision import Supervisor

log = logging.getLogger("gateway.queue")
T = TypeVar("T")
_PENDING_SQL = f"state IN ({', '.join(repr(str(state)) for state in PENDING_STATES)})"
"""Jobs not yet final; state names in SQL come from :class:`~gateway.outcomes.JobState`."""
QUEUED, RUNNING, DELIVERING, DEAD = (f"'{state}'" for state in (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING, JobState.DEAD))
MAX_BATCH = 512
INSERT_ROW = "(" + ", ".join("?" * len(INSERT_COLUMNS)) + ")"
INSERT_CHUNK = 256  # 15 parameters a row: well under SQLite's limit per statement
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
    detail TEXT NOT NULL DEFAULT '',
    maybe_delivered INTEGER NOT NULL DEFAULT 0,
    internal_errors INTEGER NOT NULL DEFAULT 0,
    tenant TEXT NOT NULL DEFAULT '',
    portal TEXT NOT NULL DEFAULT ''
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
ADDED_COLUMNS = {
    "maybe_delivered": "INTEGER NOT NULL DEFAULT 0",
    "internal_errors": "INTEGER NOT NULL DEFAULT 0",
    "tenant": "TEXT NOT NULL DEFAULT ''",
    "portal": "TEXT NOT NULL DEFAULT ''",
}
"""Columns newer than the first schema: added to a database created before them."""
BACKFILLS = {"portal": "UPDATE jobs SET portal = gateway_callback_host(callback_url) WHERE portal = ''"}
"""How an added column gets its values for the jobs stored before it (in the transaction that adds it)."""
INDEXES_ON_ADDED_COLUMNS = """
CREATE INDEX IF NOT EXISTS jobs_portal ON jobs (portal, id);
CREATE INDEX IF NOT EXISTS jobs_accepted ON jobs (accepted_at, engine, category);
"""
"""Created once the columns exist (an older database gets them after :data:`ADDED_COLUMNS`). ``jobs_accepted``
covers the per-minute counts of :meth:`SQLiteJobQueue.activity`: 100,000 jobs in an hour counted in 70 ms
instead of 330 ms (no table row read)."""


class _Op:
    """One queued operation: a function of the connection, or a new job's row to insert."""

    __slots__ = ("fn", "future", "insert")

    def __init__(self, future: asyncio.Future[Any], fn: Callable[[sqlite3.Connection], Any] | None = None, insert: tuple[Any, ...] | None = None) -> None:
        self.future, self.fn, self.insert = future, fn, insert


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the 202 leaves
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


async def run_in_thread(lock: asyncio.Lock, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(conn)`` in a thread, one at a time under ``lock``, which stays held until the thread is done
    even when the caller is cancelled: a thread cannot be stopped, and the next statement on the same
    connection from another thread meanwhile would crash the process. For the small stores beside the
    queue (tenants, API usage), whose statements may wait for another process's write lock."""
    async with lock:
        statement = asyncio.ensure_future(asyncio.to_thread(fn, conn))
        try:
            return await asyncio.shield(statement)
        except asyncio.CancelledError:
            while not statement.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(statement)
            raise


def open_database(path: Path, setup: Callable[[sqlite3.Connection], None], timeout: float = LOCK_TIMEOUT) -> sqlite3.Connection:
    """A WAL connection with ``setup`` (schema) done. Processes starting together on a new file
    (``serve --processes N``) race to switch it to WAL, which SQLite refuses with "locked"
    without waiting: that is retried for ``timeout`` seconds, like a held write lock."""
    deadline, pause = time.monotonic() + timeout, 0.005
    while True:
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(path)
            setup(conn)
            return conn
        except sqlite3.OperationalError as exc:
            if conn is not None:
                conn.close()
            if not _locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def _add_columns(conn: sqlite3.Connection) -> None:
    """Bring a database created by an earlier version up to the current schema: each missing column
    added and filled for the jobs already stored, in one transaction under the write lock (processes
    opening the file together: the first upgrades it, the others find it done), then the indexes."""

    def present() -> set[str]:
        return {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}

    if not set(ADDED_COLUMNS) <= present():
        conn.create_function("gateway_callback_host", 1, callback_host, deterministic=True)
        conn.execute("BEGIN IMMEDIATE")  # waits up to the connection's busy timeout for another process
        try:
            found = present()
            for name, declaration in ADDED_COLUMNS.items():
                if name not in found:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
                    if name in BACKFILLS:
                        conn.execute(BACKFILLS[name])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.executescript(INDEXES_ON_ADDED_COLUMNS)


def _locked(exc: sqlite3.OperationalError) -> bool:
    """True when another connection holds the lock (worth waiting for), not for I/O, full or corrupt."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _begin_waiting(conn: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, retried while another process holds the write lock (runs in a thread)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _update_held(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], job_id: str, attempts: list[Attempt]) -> bool:
    """Run an UPDATE that applies only while the caller holds the job's lease; record the
    attempts with it. False (and nothing recorded) if the lease was lost."""
    applied = conn.execute(sql, params).rowcount == 1
    if applied:
        _insert_attempts(conn, job_id, attempts)
    return applied


def _insert_attempts(conn: sqlite3.Connection, job_id: str, attempts: list[Attempt]) -> None:
    conn.executemany(
        "INSERT INTO attempts (job_id, kind, target, started_at, duration, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(job_id, storable(a.kind), storable(a.target), a.started_at, a.duration, storable(a.outcome), storable(a.detail)) for a in attempts],
    )


Result = tuple[_Op, Any, BaseException | None]


def _insert_chunk(conn: sqlite3.Connection, chunk: list[_Op]) -> list[Result]:
    """One multi-row INSERT; an op whose idempotency key is known gets the stored job back instead of None."""
    rows = [op.insert for op in chunk if op.insert is not None]
    before = conn.total_changes
    conn.execute(
        f"INSERT INTO jobs ({', '.join(INSERT_COLUMNS)}) VALUES {', '.join([INSERT_ROW] * len(rows))} ON CONFLICT (idem_key) DO NOTHING",
        [value for row in rows for value in row],
    )
    if conn.total_changes - before == len(rows):
        return [(op, None, None) for op in chunk]
    keys = [row[1] for row in rows]
    found = conn.execute(f"SELECT * FROM jobs WHERE idem_key IN ({', '.join('?' * len(keys))})", keys).fetchall()
    stored = {r["idem_key"]: r for r in found}
    results: list[Result] = []
    for op, row in zip(chunk, rows, strict=True):
        existing = stored[row[1]]
        results.append((op, None if existing["id"] == row[0] else readable_job_from_row(existing), None))
    return results


def _database_failed(exc: BaseException) -> bool:
    """True for errors of the database itself (locked, full, I/O, corrupt), as opposed to a value
    or statement of one operation it refused: those fail the whole batch."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError))


def _in_savepoint(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """Run ``fn``; if it raises, undo what it wrote (and only that) before passing the error on."""
    conn.execute("SAVEPOINT op")
    try:
        value = fn()
    except BaseException:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        raise
    conn.execute("RELEASE op")
    return value


def _insert_many(conn: sqlite3.Connection, ops: list[_Op]) -> list[Result]:
    """Insert new jobs in multi-row statements. If a chunk fails for a reason other than the
    database itself (a value SQLite cannot take), its rows are tried one by one, so only
    the bad row's caller gets the error (:class:`QueueItemError`)."""
    results: list[Result] = []
    for start in range(0, len(ops), INSERT_CHUNK):
        chunk = ops[start : start + INSERT_CHUNK]
        try:
            results.extend(_in_savepoint(conn, lambda chunk=chunk: _insert_chunk(conn, chunk)))  # type: ignore[misc]
            continue
        except Exception as exc:
            if _database_failed(exc):
                raise  # locked, full, I/O: the whole batch fails
        for op in chunk:
            try:
                results.extend(_in_savepoint(conn, lambda op=op: _insert_chunk(conn, [op])))  # type: ignore[misc]
            except Exception as exc:
                if _database_failed(exc):
                    raise
                results.append((op, None, QueueItemError(f"this job cannot be stored: {type(exc).__name__}: {storable(str(exc), 200)}")))
    return results


class SQLiteJobQueue:
    def __init__(self, path: str | Path, *, supervisor: Supervisor | None = None) -> None:
        """``supervisor`` restarts the flusher should it stop and reports it to ``/-/health``."""
        self.path = Path(path)
        self.supervisor = supervisor or Supervisor()
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._thread: _BlockingCalls | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    async def open(self) -> None:
        def setup(conn: sqlite3.Connection) -> None:
            conn.executescript(SCHEMA)
            _add_columns(conn)
            conn.execute("PRAGMA busy_timeout=0")  # from now on, waits for the lock happen in _begin

        def opened() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open_database(self.path, setup)

        try:
            self._conn = await asyncio.to_thread(opened)
        except (OSError, sqlite3.Error) as exc:
            raise QueueStoreError(f"cannot open queue database {self.path}: {exc}") from exc
        self._wakeup = asyncio.Event()
        self._closing = False
        self._flusher = self.supervisor.start("queue-flusher", self._flush_forever)

    async def close(self) -> None:
        """Finish every queued operation (a batch being committed included), then close."""
        if self._flusher is None or self._conn is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._flusher
        self._conn.close()
        self._conn = self._flusher = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    async def _flush_forever(self) -> None:
        """Run queued operations batch by batch; wait when there are none (pending ones first:
        after a restart the operations queued meanwhile are waiting)."""
        while True:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._run_batch(batch)
                except BaseException as exc:  # cancelled, or a bug in _run_batch: no caller waits forever
                    _settle([(op, None, QueueStoreError(f"queue database {self.path}: the flusher stopped ({type(exc).__name__})")) for op in batch])
                    raise
            if self._closing:
                return
            await self._wakeup.wait()
            self._wakeup.clear()

    async def _run_batch(self, batch: list[_Op]) -> None:
        """One transaction and one fsync for the whole batch. An error in one operation fails
        that operation; any other error rolls the batch back and fails its operations. Never raises
        (but for cancellation)."""
        conn = self._conn
        assert conn is not None
        results: list[Result] = []
        try:
            await self._begin(conn)
            inserts = [op for op in batch if op.insert is not None]
            if inserts:
                results.extend(_insert_many(conn, inserts))
            for op in batch:
                if op.fn is None:
                    continue
                try:
                    results.append((op, _in_savepoint(conn, lambda op=op: op.fn(conn)), None))  # type: ignore[misc]
                except Exception as exc:
                    if _database_failed(exc):
                        raise  # the database failed, not the operation
                    results.append((op, None, exc))
            await self._off_loop(conn.execute, "COMMIT")  # the fsync, off the event loop
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._rollback(conn)
            if isinstance(exc, sqlite3.Error):
                failure = QueueStoreError(f"queue database {self.path}: {exc}")
            else:
                log.error("queue batch of %d operation(s) failed unexpectedly; rolled back", len(batch), exc_info=exc)
                failure = QueueStoreError(f"queue database {self.path}: unexpected {type(exc).__name__}: {storable(str(exc), 200)}")
            results = [(op, None, failure) for op in batch]
        _settle(results)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        """End a failed batch's transaction so the next batch starts clean."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("queue database %s: rollback failed: %s", self.path, exc)

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """Take the write lock: at once when it is free, else wait for it in a thread.

        The connection's busy timeout is 0, so a lock held by another process fails fast
        here instead of stalling the event loop. Only a held lock is waited for; any other
        error fails the batch at once.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise  # I/O error, disk full, corrupt: waiting would not help
            await self._off_loop(_begin_waiting, conn, LOCK_TIMEOUT)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (a COMMIT's fsync, a wait for the write lock) on this queue's own thread.

        Not the event loop's shared pool: queues waiting there for another's write lock could take
        every thread of it, and the COMMIT that would free the lock would wait behind them. A plain
        thread fed by a queue also costs the event loop less per call than an executor's futures."""
        if self._thread is None:
            self._thread = _BlockingCalls()
        return await self._thread.run(fn, *args)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read that may visit many rows (a filtered list, the activity counts) in a thread, on a
        read-only connection of its own: WAL lets it read beside the flusher's writes, and the event
        loop keeps accepting meanwhile. It sees every write the flusher has answered (they are committed)."""
        if self._flusher is None or self._closing:
            raise QueueStoreError("the queue is not open")

        def read() -> T:
            with self._reader_lock:
                if self._reader is None:
                    self._reader = connect(self.path)
                    self._reader.execute("PRAGMA query_only=1")
                return fn(self._reader)

        try:
            return await asyncio.to_thread(read)
        except sqlite3.Error as exc:
            raise QueueStoreError(f"queue database {self.path}: {exc}") from exc

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        """Queue an operation for the flusher; its future holds the answer or the error."""
        if self._flusher is None or self._closing:
            raise QueueStoreError("the queue is not open")
        self._pending.append(op)
        self._wakeup.set()
        return op.future

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        return self._submit(_Op(asyncio.get_running_loop().create_future(), fn=fn))

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Processes sharing the file have no signal to send each other: their workers poll."""

    async def enqueue(self, job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float) -> tuple[Job, bool]:
        row = insert_values(job, idempotency_key, lease_owner=lease_owner, lease_seconds=lease_seconds, now=time.time())
        existing = await self._submit(_Op(asyncio.get_running_loop().create_future(), insert=row))
        if existing is not None:
            return existing, False
        job.state = JobState.RUNNING if lease_owner else JobState.QUEUED
        return job, True

    async def claim(self, owner: str, limit: int, lease_seconds: float, *, delivery_limit: int | None = None) -> list[Job]:
        due = f"{_PENDING_SQL} AND next_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"

        def select(conn: sqlite3.Connection, which: str, now: float, count: int) -> list[sqlite3.Row]:
            if count <= 0:
                return []
            return conn.execute(f"SELECT * FROM jobs WHERE {due}{which} ORDER BY next_at LIMIT ?", (now, now, count)).fetchall()

        def op(conn: sqlite3.Connection) -> list[Job]:
            now = time.time()
            if delivery_limit is None:
                rows = select(conn, "", now, limit)
            else:
                rows = select(conn, f" AND state != {DELIVERING}", now, limit) + select(conn, f" AND state = {DELIVERING}", now, delivery_limit)
            jobs = []
            for row in rows:
                try:
                    job = job_from_row(row)
                except Exception as exc:  # one unreadable row must not block every claim after it
                    detail = unreadable("job", exc)
                    log.error("job %s: %s; marked dead", row["id"], detail)
                    conn.execute(
                        f"UPDATE jobs SET state = {DEAD}, detail = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                        (detail, now, row["id"]),
                    )
                    continue
                state = JobState.RUNNING if row["state"] == JobState.QUEUED else JobState(row["state"])
                conn.execute(
                    "UPDATE jobs SET state = ?, lease_owner = ?, lease_until = ? WHERE id = ?",
                    (state, owner, now + lease_seconds, row["id"]),
                )
                job.state, job.lease_until = state, now + lease_seconds
                # Reschedule and release clear the owner: one still set means its worker died.
                job.interrupted_delivery = row["state"] == JobState.DELIVERING and row["lease_owner"] is not None
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

    async def release(self, owner: str, job_ids: list[str], *, maybe_delivered: frozenset[str] | set[str] = frozenset()) -> None:
        if not job_ids:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"UPDATE jobs SET lease_owner = NULL, lease_until = NULL, maybe_delivered = max(maybe_delivered, ?)"
                f" WHERE id = ? AND lease_owner = ? AND {_PENDING_SQL}",
                [(int(job_id in maybe_delivered), job_id, owner) for job_id in job_ids],
            )

        await self._run(op)

    async def store_outcome(self, job_id: str, owner: str, outcome: Outcome, attempts: list[Attempt]) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return _update_held(
                conn,
                f"UPDATE jobs SET outcome = ?, state = {DELIVERING} WHERE id = ? AND lease_owner = ? AND state = {RUNNING}",
                (outcome_json(outcome), job_id, owner),
                job_id,
                attempts,
            )

        return await self._run(op)

    async def reschedule(self, job_id: str, owner: str, next_at: float, attempt: Attempt, *, maybe_delivered: bool = False) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return _update_held(
                conn,
                "UPDATE jobs SET next_at = ?, lease_owner = NULL, lease_until = NULL,"
                " delivery_attempts = delivery_attempts + 1, detail = ?, maybe_delivered = max(maybe_delivered, ?)"
                f" WHERE id = ? AND lease_owner = ? AND state = {DELIVERING}",
                (next_at, storable(attempt.detail), int(maybe_delivered), job_id, owner),
                job_id,
                [attempt],
            )

        return await self._run(op)

    async def retry_later(self, job_id: str, owner: str, next_at: float, attempt: Attempt, *, maybe_delivered: bool = False) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return _update_held(
                conn,
                "UPDATE jobs SET next_at = ?, lease_owner = NULL, lease_until = NULL, internal_errors = internal_errors + 1, detail = ?,"
                f" maybe_delivered = max(maybe_delivered, ?) WHERE id = ? AND lease_owner = ? AND state IN ({RUNNING}, {DELIVERING})",
                (next_at, storable(attempt.detail), int(maybe_delivered), job_id, owner),
                job_id,
                [attempt],
            )

        return await self._run(op)

    async def defer(self, job_id: str, owner: str, next_at: float, *, maybe_delivered: bool = False) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE jobs SET next_at = ?, lease_owner = NULL, lease_until = NULL, maybe_delivered = max(maybe_delivered, ?)"
                f" WHERE id = ? AND lease_owner = ? AND state = {DELIVERING}",
                (next_at, int(maybe_delivered), job_id, owner),
            )
            return cursor.rowcount == 1

        return await self._run(op)

    async def finish(self, job_id: str, owner: str, state: JobState, detail: str, attempts: list[Attempt]) -> bool:
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")

        def op(conn: sqlite3.Connection) -> bool:
            callbacks = sum(1 for a in attempts if a.kind == AttemptKind.CALLBACK)
            return _update_held(
                conn,
                f"UPDATE jobs SET state = ?, detail = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL,"
                f" delivery_attempts = delivery_attempts + ? WHERE id = ? AND lease_owner = ? AND {_PENDING_SQL}",
                (state.value, storable(detail, 1000), time.time(), callbacks, job_id, owner),
                job_id,
                attempts,
            )

        return await self._run(op)

    async def get(self, job_id: str) -> Job | None:
        return await self._run(lambda conn: self._get(conn, job_id))

    @staticmethod
    def _get(conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        attempts = [
            stored_attempt(r["kind"], r["target"], r["started_at"], r["duration"], r["outcome"], r["detail"])
            for r in conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY seq", (job_id,))
        ]
        return readable_job_from_row(row, attempts)

    async def list(self, filter: JobFilter | None = None, *, state: JobState | None = None, limit: int = 50) -> builtins.list[Job]:
        """On the reading connection: a filter that few jobs match may scan many rows, off the event loop."""
        job_filter = filter or JobFilter(state=state, limit=limit)
        where, values = filter_where(job_filter, lambda _n: "?")

        def read(conn: sqlite3.Connection) -> builtins.list[Job]:
            rows = conn.execute(f"SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ?", (*values, job_filter.limit)).fetchall()
            return [readable_job_from_row(row) for row in rows]

        return await self._read(read)

    async def activity(self, since: float) -> Activity:
        """Three aggregate statements on the reading connection (one read transaction: consistent counts)."""

        def read(conn: sqlite3.Connection) -> Activity:
            conn.execute("BEGIN")
            try:
                accepted = conn.execute(
                    "SELECT CAST(accepted_at / 60 AS INTEGER) * 60 AS minute, engine, category, count(*) AS n FROM jobs"
                    " WHERE accepted_at >= ? GROUP BY minute, engine, category",
                    (since,),
                ).fetchall()
                finished = conn.execute(
                    f"SELECT CAST(finished_at / 60 AS INTEGER) * 60 AS minute, engine, category, state, {latency_bucket_sql('finished_at - accepted_at')} AS bucket,"
                    " count(*) AS n FROM jobs WHERE finished_at >= ? GROUP BY minute, engine, category, state, bucket",
                    (since,),
                ).fetchall()
                pending = dict(conn.execute(f"SELECT state, count(*) FROM jobs WHERE {_PENDING_SQL} GROUP BY state").fetchall())
            finally:
                conn.execute("COMMIT")
            return Activity(
                since=since,
                accepted=tuple(AcceptedCount(int(r["minute"]), r["engine"], r["category"], r["n"]) for r in accepted),
                finished=tuple(FinishedCount(int(r["minute"]), r["engine"], r["category"], JobState(r["state"]), r["bucket"], r["n"]) for r in finished),
                pending={state: pending.get(str(state), 0) for state in PENDING_STATES},
            )

        return await self._read(read)

    async def cancel(self, job_id: str, by: str) -> Job:
        return await self._act(job_id, "cancel", by)

    async def redeliver(self, job_id: str, by: str) -> Job:
        return await self._act(job_id, "redeliver", by)

    async def _act(self, job_id: str, action: Action, by: str) -> Job:
        """An operator's action as one operation of the flusher: checked and applied in one write
        transaction, which no claim or lease can interleave with."""
        if not plausible_job_id(job_id):
            raise JobActionRefused(job_id, action, NO_SUCH_JOB)

        def op(conn: sqlite3.Connection) -> Job | str:
            now = time.time()
            row = conn.execute("SELECT state, outcome IS NOT NULL AS has_outcome, lease_until, deadline FROM jobs WHERE id = ?", (job_id,)).fetchone()
            state = JobState(row["state"]) if row is not None else None
            refusal = action_refusal(
                action,
                state,
                has_outcome=bool(row and row["has_outcome"]),
                lease_until=row["lease_until"] if row else None,
                deadline=row["deadline"] if row else 0.0,
                now=now,
            )
            if refusal is not None:
                return refusal
            free = "(lease_until IS NULL OR lease_until <= ?)"
            if action == "redeliver":
                detail = f"re-delivery asked by {by}"
                sql = (
                    f"UPDATE jobs SET state = {DELIVERING}, next_at = ?, finished_at = NULL, detail = '', internal_errors = 0, lease_owner = NULL,"
                    f" lease_until = NULL WHERE id = ? AND state = {DEAD} AND outcome IS NOT NULL AND deadline > ?"
                )
                params: tuple[Any, ...] = (now, job_id, now)
            elif state is JobState.DELIVERING:
                detail = f"delivery cancelled by the operator ({by})"
                sql = f"UPDATE jobs SET state = {DEAD}, detail = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ? AND state = {DELIVERING} AND {free}"
                params = (storable(detail, 1000), now, job_id, now)
            else:
                detail = f"cancelled by {by}"
                sql = (
                    f"UPDATE jobs SET state = {DELIVERING}, outcome = ?, next_at = ?, detail = ?, lease_owner = NULL, lease_until = NULL"
                    f" WHERE id = ? AND state IN ({QUEUED}, {RUNNING}) AND {free}"
                )
                params = (outcome_json(CANCELLED), now, storable(detail), job_id, now)
            attempt = Attempt(AttemptKind.OPERATOR, action, now, 0.0, AttemptOutcome.OK, detail)
            changed = self._get(conn, job_id) if _update_held(conn, sql, params, job_id, [attempt]) else None
            if changed is None:  # checked above in this transaction: cannot happen
                raise QueueStoreError(f"job {job_id}: {action} did not apply")
            return changed

        done = await self._run(op)
        if isinstance(done, str):
            raise JobActionRefused(job_id, action, done)
        return done

    async def prune(self, finished_before: float, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?", (finished_before, limit))]
            marks = ", ".join("?" * len(ids))
            if ids:
                conn.execute(f"DELETE FROM attempts WHERE job_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            return len(ids)

        return await self._run(op)

    async def end_tenant_jobs(self, tenant: str, detail: str, *, delete: bool) -> builtins.list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            if delete:
                rows = conn.execute("SELECT * FROM jobs WHERE tenant = ?", (tenant,)).fetchall()
                ids = [row["id"] for row in rows]
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ", ".join("?" * len(chunk))
                    conn.execute(f"DELETE FROM attempts WHERE job_id IN ({marks})", chunk)
                    conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk)
            else:
                now = time.time()
                free = f"tenant = ? AND {_PENDING_SQL} AND (lease_until IS NULL OR lease_until <= ?)"
                rows = conn.execute(f"SELECT * FROM jobs WHERE {free}", (tenant, now)).fetchall()
                conn.execute(
                    f"UPDATE jobs SET state = {DEAD}, detail = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL WHERE {free}",
                    (storable(detail, 1000), now, tenant, now),
                )
            return [readable_job_from_row(row) for row in rows]

        return await self._run(op)

    async def finished_since(self, since: float, *, tenant: str | None = None, limit: int = 100000) -> builtins.list[Job]:
        def op(conn: sqlite3.Connection) -> builtins.list[Job]:
            if tenant is None:
                rows = conn.execute("SELECT * FROM jobs WHERE finished_at >= ? ORDER BY finished_at LIMIT ?", (since, limit))
            else:
                rows = conn.execute("SELECT * FROM jobs WHERE finished_at >= ? AND tenant = ? ORDER BY finished_at LIMIT ?", (since, tenant, limit))
            return [readable_job_from_row(row) for row in rows]

        return await self._run(op)

    async def usage_totals(self, since: float, *, tenant: str | None = None) -> builtins.list[PortalUsageCount]:
        """One aggregate statement on the reading connection: no job is loaded, the event loop and the
        flusher go on meanwhile. The numbers are read from the outcome's JSON by SQLite (``json_type``
        first: a string or a boolean where a number belongs counts nothing); each outcome is parsed once
        (SQLite keeps the parse for the next ``json_*`` call on the same text)."""

        def number(path: str) -> str:
            return f"CASE WHEN json_type(outcome, '{path}') IN ('integer', 'real') THEN json_extract(outcome, '{path}') END"

        # The inner query is kept apart (LIMIT -1: not flattened) so that the GROUP BY sorts the small
        # per-job values, not the outcomes: 100,000 jobs with 4 KB transcripts, 1.8 s instead of 2.8 s.
        # A result with a ``kind`` (every result the gateway stores has one) is not empty: the full
        # test renders the result as text (a quarter more time). The day is that of the whole second,
        # as in Python: date() of a time 0.4 ms before midnight would round it up to the next day.
        sql = f"""
            SELECT day, engine, portal, count(*) AS jobs, count(*) - sum(succeeded) AS errors, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                coalesce(sum(completion_tokens), 0) AS completion_tokens, total(cost_usd) AS cost_usd, total(audio_seconds) AS audio_seconds
            FROM (
                SELECT date(CAST(finished_at AS INTEGER), 'unixepoch') AS day, engine, portal,
                    CASE WHEN json_type(outcome, '$.result') IS NOT 'object' THEN 0 WHEN json_type(outcome, '$.result.kind') IS NOT NULL THEN 1
                        ELSE json_extract(outcome, '$.result') <> '{{}}' END AS succeeded,
                    CAST({number("$.result.usage.prompt_tokens")} AS INTEGER) AS prompt_tokens,
                    CAST({number("$.result.usage.completion_tokens")} AS INTEGER) AS completion_tokens,
                    {number("$.result.usage.cost_usd")} AS cost_usd,
                    {number("$.result.duration")} AS audio_seconds
                FROM jobs WHERE finished_at >= ?{" AND tenant = ?" if tenant is not None else ""} LIMIT -1
            ) GROUP BY day, engine, portal ORDER BY day, engine, portal"""
        params = (since,) if tenant is None else (since, tenant)

        def read(conn: sqlite3.Connection) -> builtins.list[PortalUsageCount]:
            return [PortalUsageCount(*row) for row in conn.execute(sql, params)]

        return await self._read(read)

    async def depth(self) -> int:
        return await self._run(lambda conn: conn.execute(f"SELECT count(*) FROM jobs WHERE {_PENDING_SQL}").fetchone()[0])


class _BlockingCalls:
    """One thread that runs blocking calls in order and hands each result back to its event loop."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="sqlite-queue", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return await future

    def stop(self) -> None:
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, fn, args = call
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, like an executor would
                loop.call_soon_threadsafe(_fail, future, exc)
            else:
                loop.call_soon_threadsafe(_succeed, future, result)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _settle(results: list[Result]) -> None:
    """Hand each operation's answer or error to its caller (unless the caller stopped waiting)."""
    for op, result, error in results:
        if op.future.done():
            continue
        if error is not None:
            op.future.set_exception(error)
        else:
            op.future.set_result(result)
