"""What is PostgreSQL's own beyond the queue contract: migrations under an advisory lock, a schema
from a newer gateway refused, errors sorted into "this item" and "the database" without leaking
the DSN or the portal's hash, engine tokens that every node agrees on, the missing driver."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time

import asyncpg
import pytest

from gateway.config import QueueSettings
from gateway.jobs.queue import QueueItemError, QueueStoreError
from gateway.postgres import schema
from gateway.postgres.database import Database, DriverMissing, driver, run_on_database, translate
from gateway.postgres.tokens import PostgresTokenStore
from gateway.stores import job_queue
from gateway.testing.runner import free_port

pytestmark = pytest.mark.anyio


async def test_nodes_starting_at_once_apply_each_migration_exactly_once(postgres_dsn):
    connections = [await asyncpg.connect(postgres_dsn) for _ in range(6)]
    try:
        applied = await asyncio.gather(*(schema.migrate(conn) for conn in connections))
        assert sorted(len(a) for a in applied) == [0, 0, 0, 0, 0, len(schema.MIGRATIONS)]
        rows = await connections[0].fetch("SELECT version FROM gateway_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in schema.MIGRATIONS]
        statuses = await schema.status(connections[0])
        assert all(s.applied_at is not None for s in statuses)
    finally:
        for conn in connections:
            await conn.close()


async def test_a_schema_from_a_newer_gateway_is_refused_with_both_versions(postgres_dsn):
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await schema.migrate(conn)
        await conn.execute("INSERT INTO gateway_migrations (version, name) VALUES ($1, 'from the future')", schema.LATEST + 1)
        with pytest.raises(schema.SchemaTooNew, match=f"version {schema.LATEST + 1}, newer than this gateway knows \\({schema.LATEST}\\)"):
            await schema.migrate(conn)
    finally:
        await conn.close()
    queue = job_queue(QueueSettings(backend="postgres", dsn=postgres_dsn))
    with pytest.raises(QueueStoreError, match="upgrade this node"):
        await queue.open()


async def test_a_database_that_does_not_exist_fails_at_once_and_keeps_the_password_out(postgres_server):
    dsn = postgres_server.dsn("no_such_database").replace("gateway@", "gateway:Pa55-SECRET@")
    database = Database(QueueSettings(backend="postgres", dsn=dsn))
    started = time.monotonic()
    with pytest.raises(QueueStoreError) as caught:
        await database.open(wait=20)
    assert time.monotonic() - started < 10  # not waited for: it will not appear by waiting
    assert "no_such_database" in str(caught.value) and "SECRET" not in str(caught.value)


async def test_an_unreachable_database_is_waited_for_then_named(caplog):
    settings = QueueSettings(backend="postgres", dsn=f"postgresql://gateway:Pa55-SECRET@127.0.0.1:{free_port()}/gateway", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(QueueStoreError, match="opening the connection pool") as caught:
        await Database(settings).open(wait=1.5)
    assert 0.5 < time.monotonic() - started < 10  # tried again with backoff, never past the wait
    assert "SECRET" not in str(caught.value) and "SECRET" not in caplog.text
    assert "PostgreSQL is not reachable" in caplog.text


async def test_values_postgres_refuses_fail_that_item_without_quoting_it(postgres_dsn):
    conn = await asyncpg.connect(postgres_dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as server_side:
            await conn.execute("SELECT $1::text", "a\x00b")
        with pytest.raises(Exception) as client_side:
            await conn.execute("SELECT $1::text", "https://portal/cb?hash=SECRETHASH\ud800")
    finally:
        await conn.close()
    for exc in (server_side.value, client_side.value):
        error = translate(exc)
        assert isinstance(error, QueueItemError), error
        assert "SECRETHASH" not in str(error)
    assert not isinstance(translate(ConnectionRefusedError(111, "Connection refused")), QueueItemError)


def test_nodes_generating_tokens_at_once_agree_on_them(postgres_dsn):
    settings = QueueSettings(backend="postgres", dsn=postgres_dsn)
    codes = ["text_a", "image_b", "audio_c"]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        seen = list(pool.map(lambda _: PostgresTokenStore(settings).load(codes), range(5)))
    assert all(tokens == seen[0] for tokens in seen) and sorted(seen[0]) == sorted(codes)
    assert all(len(token) == 32 for token in seen[0].values())
    assert PostgresTokenStore(settings).load([*codes, "new_d"])["text_a"] == seen[0]["text_a"]  # kept; only the new one is added


def test_run_on_database_migrates_first_unless_told_not_to(postgres_dsn):
    settings = QueueSettings(backend="postgres", dsn=postgres_dsn)

    async def tables(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'gateway_%'"))

    assert run_on_database(settings, tables, "counting", migrate=False) == 0
    assert run_on_database(settings, tables, "counting") == 7  # gateway_migrations, four tables of migration 1, tenants of 2, API usage of 4


def test_without_the_driver_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if not installed
    with pytest.raises(DriverMissing, match=r"pip install 'bitrix24-ai-gateway\[postgres\]'"):
        driver()
