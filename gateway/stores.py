"""The stores a configuration names: the one place that turns ``queue.backend`` into a job queue,
a file store, a tenant store, an API usage store and an engine-token store.

- ``sqlite`` (the embedded default, one machine): the queue file, and hosted files, tenants,
  API usage (``usage.sqlite3``) and generated tokens in ``data_dir``;
- ``postgres`` (any number of nodes): all of them in the shared database, through one connection
  pool per process; each node's ``data_dir`` keeps only what is its own (downloaded recordings).

``gateway serve``/``worker`` (the runtime) and the CLI commands get their stores here, so a new
backend is added once. The PostgreSQL modules (and their driver) are imported only when named.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, QueueSettings
from gateway.engines import EngineDirectory, FileTokenStore, TokenStore, tokens_path
from gateway.files import FileStore, LocalFileStore
from gateway.jobs.queue import JobQueue
from gateway.jobs.sqlite import SQLiteJobQueue
from gateway.supervision import Supervisor
from gateway.tenants.store import SQLiteTenantStore, TenantStore
from gateway.usage.ledger import ApiUsageStore
from gateway.usage.sqlite import SQLiteApiUsageStore

TENANTS_FILE = "tenants.sqlite3"
USAGE_FILE = "usage.sqlite3"


def job_queue(settings: QueueSettings, *, supervisor: Supervisor | None = None) -> JobQueue:
    """The configured queue alone, not opened yet (``await queue.open()``; ``close()`` when done).
    ``supervisor`` restarts its background loops and reports them to ``/-/health``."""
    return Stores.for_queue(settings, Path(), supervisor=supervisor).queue


@dataclass(frozen=True)
class Stores:
    """A process's job queue, file store, tenant store (app mode) and API usage store. The queue's
    ``open()``/``close()`` open and close what they share (the PostgreSQL pool), so the others are
    usable while it is open."""

    queue: JobQueue
    files: FileStore
    tenants: TenantStore
    api_usage: ApiUsageStore

    @classmethod
    def for_config(cls, config: Config, *, supervisor: Supervisor | None = None) -> Stores:
        return cls.for_queue(config.queue, Path(config.data_dir), supervisor=supervisor)

    @classmethod
    def for_queue(cls, settings: QueueSettings, data_dir: Path, *, supervisor: Supervisor | None = None) -> Stores:
        """``data_dir``: where the SQLite default keeps hosted files and tenants."""
        if settings.backend == "postgres":
            from gateway.postgres.database import Database
            from gateway.postgres.files import PostgresFileStore
            from gateway.postgres.queue import PostgresJobQueue
            from gateway.postgres.tenants import PostgresTenantStore
            from gateway.postgres.usage import PostgresApiUsageStore

            database = Database(settings)
            return cls(
                PostgresJobQueue(database, supervisor=supervisor), PostgresFileStore(database), PostgresTenantStore(database), PostgresApiUsageStore(database)
            )
        if settings.backend == "sqlite":
            return cls(
                SQLiteJobQueue(settings.path, supervisor=supervisor),
                LocalFileStore(data_dir / "files"),
                SQLiteTenantStore(data_dir / TENANTS_FILE),
                SQLiteApiUsageStore(data_dir / USAGE_FILE),
            )
        raise ValueError(f"unknown queue backend {settings.backend!r}")  # the config refuses it first


@contextlib.asynccontextmanager
async def api_usage_reader(config: Config) -> AsyncIterator[ApiUsageStore | None]:
    """The API usage store, open, for a command run without (or beside) a gateway; None when the
    SQLite file does not exist (no request was ever counted; nothing is created then)."""
    stores = Stores.for_config(config)
    if config.queue.backend == "sqlite":
        if not (Path(config.data_dir) / USAGE_FILE).exists():
            yield None
            return
        await stores.api_usage.open()
        try:
            yield stores.api_usage
        finally:
            await stores.api_usage.close()
        return
    await stores.queue.open()  # the pool the PostgreSQL stores share (and the schema migrated)
    try:
        yield stores.api_usage
    finally:
        await stores.queue.close()


def token_store(config: Config) -> TokenStore:
    """Where generated engine tokens live for this configuration."""
    if config.queue.backend == "postgres":
        from gateway.postgres.tokens import PostgresTokenStore

        return PostgresTokenStore(config.queue)
    return FileTokenStore(tokens_path(config))


def engine_directory(config: Config) -> EngineDirectory:
    """The configured engines with their tokens (generated ones read from, or added to, the token store)."""
    return EngineDirectory(config, token_store(config))
