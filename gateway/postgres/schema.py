"""Versioned schema migrations for the shared database.

Each migration runs once, in order, in one transaction with its row in ``gateway_migrations``.
``migrate`` holds a transaction-level advisory lock while it looks and applies, so nodes that
start at the same moment apply each migration exactly once: the others wait, then find nothing
to do. A database migrated by a newer gateway than this one is refused (its statements may not
match the tables any more) rather than half-used.

A new migration is appended to :data:`MIGRATIONS` with the next number; a released one is never
edited. Tables carry the ``gateway_`` prefix, so the gateway can share a database with others.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.jobs.queue import QueueStoreError
from gateway.outcomes import PENDING_STATES

MIGRATION_LOCK = 0x6761_7465_7761_7900  # "gateway\0": one key for the gateway's schema in this database
PENDING_SQL = f"state IN ({', '.join(repr(str(state)) for state in PENDING_STATES)})"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs, attempts, engine tokens and hosted files",
        f"""
        CREATE TABLE gateway_jobs (
            id text PRIMARY KEY,
            idem_key text NOT NULL UNIQUE,
            engine text NOT NULL,
            category text NOT NULL,
            state text NOT NULL,
            task text NOT NULL,
            callback_url text NOT NULL,
            error_callback_url text NOT NULL,
            accepted_at double precision NOT NULL,
            deadline double precision NOT NULL,
            next_at double precision NOT NULL,
            lease_owner text,
            lease_until double precision,
            outcome text,
            delivery_attempts integer NOT NULL DEFAULT 0,
            finished_at double precision,
            detail text NOT NULL DEFAULT '',
            maybe_delivered boolean NOT NULL DEFAULT false,
            internal_errors integer NOT NULL DEFAULT 0
        );
        CREATE INDEX gateway_jobs_pending ON gateway_jobs (next_at) WHERE {PENDING_SQL};
        CREATE INDEX gateway_jobs_state ON gateway_jobs (state, id);
        CREATE INDEX gateway_jobs_finished ON gateway_jobs (finished_at) WHERE finished_at IS NOT NULL;
        CREATE TABLE gateway_attempts (
            seq bigserial PRIMARY KEY,
            job_id text NOT NULL REFERENCES gateway_jobs (id) ON DELETE CASCADE,
            kind text NOT NULL,
            target text NOT NULL,
            started_at double precision NOT NULL,
            duration double precision NOT NULL,
            outcome text NOT NULL,
            detail text NOT NULL
        );
        CREATE INDEX gateway_attempts_job ON gateway_attempts (job_id, seq);
        CREATE TABLE gateway_engine_tokens (
            code text PRIMARY KEY,
            token text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE gateway_files (
            name text PRIMARY KEY,
            content_type text NOT NULL,
            data bytea NOT NULL,
            created_at double precision NOT NULL
        );
        CREATE INDEX gateway_files_created ON gateway_files (created_at);
        """,
    ),
    Migration(
        2,
        "app mode: tenants, and the tenant of each job",
        """
        ALTER TABLE gateway_jobs ADD COLUMN tenant text NOT NULL DEFAULT '';
        CREATE INDEX gateway_jobs_tenant ON gateway_jobs (tenant) WHERE tenant <> '';
        CREATE TABLE gateway_tenants (
            member_id text PRIMARY KEY,
            tenant_key text NOT NULL UNIQUE,
            record text NOT NULL,
            status text NOT NULL,
            registration text NOT NULL,
            registration_next_at double precision NOT NULL DEFAULT 0,
            registration_owner text,
            registration_until double precision,
            updated_at double precision NOT NULL
        );
        CREATE INDEX gateway_tenants_registration ON gateway_tenants (registration_next_at) WHERE registration = 'pending';
        """,
    ),
    Migration(
        3,
        "the portal of each job, and jobs by acceptance time (dashboard filters and charts)",
        r"""
        ALTER TABLE gateway_jobs ADD COLUMN portal text NOT NULL DEFAULT '';
        UPDATE gateway_jobs SET portal = lower(btrim(coalesce(substring(callback_url from '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?(\[[^]/]*\]|[^/?#:]+)'), ''), '[]'));
        CREATE INDEX gateway_jobs_portal ON gateway_jobs (portal, id);
        CREATE INDEX gateway_jobs_accepted ON gateway_jobs (accepted_at);
        """,
    ),
    Migration(
        4,
        "usage of the OpenAI-compatible API per UTC day, key and engine",
        """
        CREATE TABLE gateway_api_usage (
            day text NOT NULL,
            api_key text NOT NULL,
            engine text NOT NULL,
            requests bigint NOT NULL DEFAULT 0,
            errors bigint NOT NULL DEFAULT 0,
            prompt_tokens bigint NOT NULL DEFAULT 0,
            completion_tokens bigint NOT NULL DEFAULT 0,
            cost_usd double precision NOT NULL DEFAULT 0,
            audio_seconds double precision NOT NULL DEFAULT 0,
            PRIMARY KEY (day, api_key, engine)
        );
        """,
    ),
)
LATEST = MIGRATIONS[-1].version


class SchemaTooNew(QueueStoreError):
    """The database was migrated by a newer gateway than this one."""


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    applied_at: datetime | None
    """None: not applied yet."""


async def _ensure_table(conn: Any) -> None:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS gateway_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )


async def migrate(conn: Any) -> list[Migration]:
    """Apply the migrations this database lacks, under the advisory lock; the ones applied now."""
    applied_now: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await _ensure_table(conn)
        applied = {row["version"] for row in await conn.fetch("SELECT version FROM gateway_migrations")}
        _refuse_newer(applied)
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO gateway_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name)
            applied_now.append(migration)
    return applied_now


async def status(conn: Any) -> list[MigrationStatus]:
    """Every migration this gateway knows, with when it was applied (None: pending)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)  # a fresh database: one creates the table
        await _ensure_table(conn)
        applied = {row["version"]: row["applied_at"] for row in await conn.fetch("SELECT version, applied_at FROM gateway_migrations")}
    _refuse_newer(set(applied))
    return [MigrationStatus(m.version, m.name, applied.get(m.version)) for m in MIGRATIONS]


def _refuse_newer(applied: set[int]) -> None:
    if applied and max(applied) > LATEST:
        raise SchemaTooNew(
            f"the database's schema is at version {max(applied)}, newer than this gateway knows ({LATEST}): "
            "upgrade this node to the version the other nodes run"
        )
