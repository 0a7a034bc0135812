"""Tenants in the shared database (app mode on many nodes).

Token refreshes run inside one transaction that holds a transaction-level advisory lock on the
tenant: a second node that meets ``expired_token`` at the same moment waits, then finds the new
tokens and uses them, so exactly one refresh reaches the OAuth server. An operator's status change
takes the same lock and the row's, and writes the status into the row as it is then. Changes to a
tenant send ``NOTIFY gateway_tenants`` so other nodes drop their cached copy at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.jobs.queue import QueueStoreError
from gateway.postgres.database import Database
from gateway.tenants.model import Registration, Tenant, TenantStatus, Tokens, tenant_key
from gateway.tenants.store import Refresher, StatusChangeRefused, operator_status, record_json, tenant_from_record, unknown_tenant

CHANNEL = "gateway_tenants"
UPSERT = (
    "INSERT INTO gateway_tenants (member_id, tenant_key, record, status, registration, registration_next_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $6)"
    " ON CONFLICT (member_id) DO UPDATE SET record = excluded.record, status = excluded.status, registration = excluded.registration,"
    " registration_next_at = excluded.registration_next_at, updated_at = excluded.updated_at"
)


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
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute(
                UPSERT, tenant.member_id, tenant_key(tenant.member_id), record_json(tenant), str(tenant.status), str(tenant.registration), time.time()
            )
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(tenant.member_id))

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

    async def set_status(self, member_id: str, status: TenantStatus) -> Tenant:
        refused: StatusChangeRefused | None = None
        async with self.db.connection() as conn, conn.transaction():
            # The refresh's advisory lock, then the row: waits for a refresh in flight (whose tokens it then keeps)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('gateway-tenant:' || $1, 0))", member_id)
            text = await conn.fetchval("SELECT record FROM gateway_tenants WHERE member_id = $1 FOR UPDATE", member_id)
            try:
                if text is None:
                    raise unknown_tenant(member_id)
                current = tenant_from_record(text)
                changed = operator_status(current, status)
            except StatusChangeRefused as exc:
                refused = exc  # raised below: inside, the connection would report it as a database error
            else:
                if changed is not current:
                    await conn.execute(
                        "UPDATE gateway_tenants SET record = $1, status = $2, updated_at = $3 WHERE member_id = $4",
                        record_json(changed),
                        str(changed.status),
                        changed.updated_at,
                        member_id,
                    )
                    await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(member_id))
        if refused is not None:
            raise refused
        return changed

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

    async def registration_done(self, tenant: Tenant, owner: str, *, next_at: float | None = None) -> None:
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE gateway_tenants SET record = $1, status = $2, registration = $3, registration_next_at = $4, registration_owner = NULL,"
                " registration_until = NULL, updated_at = $5 WHERE member_id = $6 AND registration_owner = $7",
                record_json(tenant),
                str(tenant.status),
                str(tenant.registration),
                next_at or 0.0,
                time.time(),
                tenant.member_id,
                owner,
            )
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(tenant.member_id))

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self.db.listen(CHANNEL, callback)

    async def forget(self, member_id: str) -> bool:
        async with self.db.connection() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM gateway_tenants WHERE member_id = $1", member_id)
            await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", tenant_key(member_id))
        return bool(status == "DELETE 1")
