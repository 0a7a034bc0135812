"""API usage in ``data_dir/usage.sqlite3``: the embedded default, shared by the processes of one machine.

A file of its own rather than a table in the queue's: the queue's file is the accept path's
(group commit, one writer connection) and this one is written once per flush per process.
Statements run in a thread (a flush waits for another process's write lock there, not on the
event loop). ``BEGIN IMMEDIATE`` takes the write lock before the UPSERTs, so the flushes of
``serve --processes N`` queue up and add up.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.jobs.queue import QueueStoreError
from gateway.jobs.sqlite import open_database, run_in_thread
from gateway.usage.ledger import COUNTERS, ApiUsageRow

T = TypeVar("T")
SCHEMA = """
CREATE TABLE IF NOT EXISTS api_usage (
    day TEXT NOT NULL,
    api_key TEXT NOT NULL,
    engine TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    audio_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, api_key, engine)
) WITHOUT ROWID;
"""
UPSERT = (
    f"INSERT INTO api_usage (day, api_key, engine, {', '.join(COUNTERS)}) VALUES ({', '.join('?' * (3 + len(COUNTERS)))})"
    f" ON CONFLICT (day, api_key, engine) DO UPDATE SET {', '.join(f'{c} = {c} + excluded.{c}' for c in COUNTERS)}"
)
SELECT = f"SELECT day, api_key, engine, {', '.join(COUNTERS)} FROM api_usage WHERE day >= ? ORDER BY day, api_key, engine"


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


class SQLiteApiUsageStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection

    async def open(self) -> None:
        def setup() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open_database(self.path, _create_schema)  # processes starting together race to switch to WAL: retried there

        try:
            self._conn = await asyncio.to_thread(setup)
        except (OSError, sqlite3.Error) as exc:
            raise QueueStoreError(f"cannot open the API usage store {self.path}: {exc}") from exc

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise QueueStoreError(f"the API usage store {self.path} is not open")
        try:
            return await run_in_thread(self._lock, self._conn, fn)
        except sqlite3.Error as exc:
            raise QueueStoreError(f"API usage store {self.path}: {exc}") from exc

    async def add(self, rows: Sequence[ApiUsageRow]) -> None:
        values = [(*row.key, *row.counts()) for row in rows]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")  # waits up to busy_timeout for another process's write
            try:
                conn.executemany(UPSERT, values)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        if values:
            await self._run(write)

    async def rows(self, since_day: str) -> list[ApiUsageRow]:
        found: list[Any] = await self._run(lambda conn: conn.execute(SELECT, (since_day,)).fetchall())
        return [ApiUsageRow(*row) for row in found]
