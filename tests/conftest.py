"""The core tests' fixtures (``upstream``, ``portal``, ``gateway``, ``anyio_backend``,
``postgres_server``, ``postgres_dsn``) come from the pytest plugin :mod:`gateway.testing.fixtures`,
which the core installs as a ``pytest11`` entry point: the same way a plugin's own tests get them.
The core's own fixtures are below: ``queue`` runs every test that takes it on each queue backend."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import settings

from gateway.config import QueueSettings
from gateway.jobs.queue import JobQueue
from gateway.stores import job_queue

settings.register_profile("gateway", deadline=None)  # correctness, not speed: a loaded CI machine stalls now and then
settings.load_profile("gateway")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("gateway"):
        raise pytest.UsageError(
            "the gateway's pytest plugin is not loaded (entry point pytest11 `gateway` = gateway.testing.fixtures): "
            "install the core with `pip install -e .` (again, if the entry point is new), and do not pass `-p no:gateway`"
        )


class QueueStore(Protocol):
    """One backend's store, for the contract tests: queue objects on it (several: other processes'),
    and a way around the queue to break a stored row and read it back."""

    name: str
    settings: QueueSettings

    async def corrupt_task(self, job_id: str) -> None:
        """Make the stored task of this job unreadable (``{not json``), as a bug or a hand edit would."""
        ...

    async def row(self, job_id: str) -> dict[str, Any]:
        """The stored ``state``, ``detail`` and ``finished_at`` of a job, read without decoding the job."""
        ...


class SQLiteStore:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.settings = QueueSettings(backend="sqlite", path=path)

    def _sql(self, sql: str, *params: Any) -> dict[str, Any] | None:
        conn = sqlite3.connect(self.settings.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            found = conn.execute(sql, params).fetchone()
            return dict(found) if found else None
        finally:
            conn.close()

    async def corrupt_task(self, job_id: str) -> None:
        self._sql("UPDATE jobs SET task = '{not json' WHERE id = ?", job_id)

    async def row(self, job_id: str) -> dict[str, Any]:
        found = self._sql("SELECT state, detail, finished_at FROM jobs WHERE id = ?", job_id)
        assert found is not None, f"no stored job {job_id}"
        return found


class PostgresStore:
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.settings = QueueSettings(backend="postgres", dsn=dsn, pool_size=4)

    async def _fetchrow(self, sql: str, *params: Any) -> dict[str, Any] | None:
        import asyncpg

        conn = await asyncpg.connect(self.settings.dsn)
        try:
            found = await conn.fetchrow(sql, *params)
            return dict(found) if found else None
        finally:
            await conn.close()

    async def corrupt_task(self, job_id: str) -> None:
        await self._fetchrow("UPDATE gateway_jobs SET task = '{not json' WHERE id = $1", job_id)

    async def row(self, job_id: str) -> dict[str, Any]:
        found = await self._fetchrow("SELECT state, detail, finished_at FROM gateway_jobs WHERE id = $1", job_id)
        assert found is not None, f"no stored job {job_id}"
        return found


@pytest.fixture(params=["sqlite", "postgres"])
def queue_store(request: pytest.FixtureRequest, tmp_path: Path) -> QueueStore:
    """Each queue backend in turn: SQLite in ``tmp_path``, PostgreSQL in a fresh database of the
    run's throw-away cluster (``postgres_dsn``; PostgreSQL must be installed: ``make system-packages``)."""
    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "q.sqlite3")
    return PostgresStore(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def queue(queue_store: QueueStore) -> AsyncIterator[JobQueue]:
    """An open queue on each backend in turn (``[sqlite]``, ``[postgres]``), closed after the test."""
    q = job_queue(queue_store.settings)
    await q.open()
    yield q
    await q.close()
