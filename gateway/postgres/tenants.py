"""Tenants in the shared database (app mode on many nodes).

Token refreshes run inside one transaction that holds a transaction-level advisory lock on the
tenant: a second node that meets ``expired_token`` at the same moment waits, then finds the new
tokens and uses them, so exactly one refresh reaches the OAuth server. Every other change
(:meth:`update`: an operator's status change, a registration's outcome) takes the same lock and the
row's, and writes its fields into the row as it is then. Changes to a tenant send
``NOTIFY gateway_tenants`` so other nodes drop their cached copy at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.jobs.queue import QueueStoreError
from gateway.postgres.database import Database
from gateway.tenants.model import Registration, Tenant, Tokens, tenant_key
from gateway.tenants.store import Change, Refresher, insert_statement, insert_values, record_json, registration_outcome, tenant_from_record

CHANNEL = "gateway_tenants"
MARKS = [f"${n}" for n in range(1, 8)]


class PostgresTenantStore:
    """Shares the process's pool with the job queue, which opens and closes it (and migrates)."""

    def __init__(self, database: Database) -> None:
        self.db = database

    async def open(self) -> None:
        """Nothing of its own to open: the queue opened the pool."""

    async def close(self) -> None:
        """The queue closes the pool."""

    async def get(self, member_id: str) -> Tenant | None:
        text = await self.db.run(lambda c: c.fetchval("SELECT record FROM gateway_tenants WHERE member_id = $1", member_id))
        return tenant_from_record(text) if text else None

    async def by_key(self, key: str) -> Tenant | None:
        text = await self.db.run(lambda c: c.fetchval("SELECT record FROM gateway_tenants WHERE tenant_key = $1", key))
        return tenant_from_record(text) if text else None

    async def all(self) -> list[Tenant]:
        rows = await self.db.run(lambda c: c.fetch("SELECT record FROM gateway_tenants ORDER BY updated_at DESC"))
        return [tenant_from_record(row["record"]) for row in rows]

    async def put(self, tenant: Tenant) -> None:
        await self._insert(tenant, replace=True)

    async def add(self, tenant: Tenant) -> bool:
        return await self._insert(tenant, replace=False)

    async def _insert(self, tenant: Tenant, *, replace: bool) -> bool:
        """The record written (and the other nodes told) or, when ``replace`` is False and one is stored, nothing."""
        async with self.db.connection() as conn, conn.transaction():
            status = await conn.execute(insert_statement("gateway_tenants", MARKS, replace=replace), *insert_values(tenant, time.time()))
            if status != "INSERT 0 1":
                return False
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(tenant.member_id))
            return True

    async def refresh(self, member_id: str, failed_access_token: str, refresher: Refresher) -> Tokens:
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('gateway-tenant:' || $1, 0))", member_id)
            text = await conn.fetchval("SELECT record FROM gateway_tenants WHERE member_id = $1 FOR UPDATE", member_id)
            tenant = tenant_from_record(text) if text else None
            if tenant is None or tenant.tokens is None:
                raise QueueStoreError("the tenant has no tokens to refresh")
            if tenant.tokens.access_token != failed_access_token:
                return tenant.tokens  # another node refreshed while this one waited for the lock
            tokens = await refresher(tenant)
            now = time.time()
            updated = tenant.with_(tokens=tokens, last_refresh_at=now, updated_at=now)
            await conn.execute("UPDATE gateway_tenants SET record = $1, updated_at = $2 WHERE member_id = $3", record_json(updated), now, member_id)
            return tokens

    async def _apply(self, member_id: str, change: Change, lease: tuple[str, float] | None = None, register_again: bool = False) -> Tenant | None:
        """``change`` on the row as it is under the refresh's advisory lock and the row's; ``lease``: (owner,
        next_at) of a registration, whose lease is released, and nothing written unless ``owner`` still holds it;
        ``register_again``: see :meth:`gateway.tenants.store.TenantStore.update`."""
        failed: Exception | None = None
        result: Tenant | None = None
        async with self.db.connection() as conn, conn.transaction():
            # The refresh's advisory lock, then the row: waits for a refresh in flight (whose tokens it then keeps)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('gateway-tenant:' || $1, 0))", member_id)
            row = await conn.fetchrow("SELECT record, registration_owner FROM gateway_tenants WHERE member_id = $1 FOR UPDATE", member_id)
            if row is not None:
                result = stored = tenant_from_record(row["record"])
                if lease is None or row["registration_owner"] == lease[0]:
                    try:
                        changed = change(stored)
                    except Exception as exc:
                        failed = exc  # raised below: inside, the connection would report it as a database error
                    else:
                        result = stored if changed is None else changed
                        if result != stored:
                            await conn.execute(
                                "UPDATE gateway_tenants SET record = $1, status = $2, registration = $3, updated_at = $4 WHERE member_id = $5",
                                record_json(result),
                                str(result.status),
                                str(result.registration),
                                time.time(),
                                member_id,
                            )
                            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(member_id))
                        if lease is not None or register_again:
                            await conn.execute(
                                "UPDATE gateway_tenants SET registration_next_at = $1, registration_owner = NULL, registration_until = NULL WHERE member_id = $2",
                                lease[1] if lease is not None else time.time(),
                                member_id,
                            )
        if failed is not None:
            raise failed
        return result

    async def update(self, member_id: str, change: Change, *, register_again: bool = False) -> Tenant | None:
        return await self._apply(member_id, change, register_again=register_again)

    async def claim_registration(self, owner: str, lease_seconds: float, limit: int) -> list[Tenant]:
        now = time.time()
        rows = await self.db.run(
            lambda c: c.fetch(
                "WITH due AS (SELECT member_id FROM gateway_tenants WHERE registration = $1 AND registration_next_at <= $2"
                " AND (registration_until IS NULL OR registration_until <= $2) ORDER BY registration_next_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
                " UPDATE gateway_tenants t SET registration_owner = $4, registration_until = $2 + $5 FROM due WHERE t.member_id = due.member_id RETURNING t.record",
                str(Registration.PENDING),
                now,
                limit,
                owner,
                lease_seconds,
            )
        )
        return [tenant_from_record(row["record"]) for row in rows]

    async def registration_done(self, tenant: Tenant, owner: str, *, next_at: float | None = None) -> Tenant | None:
        return await self._apply(tenant.member_id, lambda stored: registration_outcome(stored, tenant), (owner, next_at or 0.0))

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self.db.listen(CHANNEL, callback)

    async def forget(self, member_id: str) -> bool:
        async with self.db.connection() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM gateway_tenants WHERE member_id = $1", member_id)
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(member_id))
        return bool(status == "DELETE 1")
