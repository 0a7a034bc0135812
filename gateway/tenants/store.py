"""Where tenants are kept: the protocol, the record's serialisation, and the SQLite store.

A tenant is stored as one JSON record beside the few columns the store's statements select on
(status, registration due time and lease). Tokens and the application token are in the record:
the store's file (mode 0600) or database is as secret as the app's ``client_secret``.

Two operations need care across processes and nodes:

- :meth:`TenantStore.refresh` runs a token refresh under a per-portal lock (refresh tokens are
  single-use: two processes refreshing at once would lock the portal out). Inside the lock the
  record is read again; if another process has refreshed meanwhile, its tokens are used and the
  OAuth server is not called;
- :meth:`TenantStore.claim_registration` leases tenants whose engines are due to be registered,
  so one process registers each tenant at a time.

Changes to part of a stored tenant go through :meth:`TenantStore.update`: under the refresh's lock,
in one transaction, it reads the record afresh and writes only the fields its change sets, so no
writer undoes another's: an operator's disable (:func:`set_status`), a registration's
outcome, a refresh's new single-use tokens and an uninstall that landed meanwhile are all kept.
(:meth:`TenantStore.put` stores a whole record: an install's or an uninstall's.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from gateway.jobs.queue import QueueStoreError
from gateway.jobs.sqlite import open_database, run_in_thread
from gateway.tenants.model import Registration, Tenant, TenantStatus, Tokens, tenant_key

Refresher = Callable[[Tenant], Awaitable[Tokens]]
Change = Callable[[Tenant], "Tenant | None"]
"""A pure function (no I/O: it runs inside the store's transaction) from the record as stored to the
record to store, or None to leave it as it is."""


class TenantStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, member_id: str) -> Tenant | None: ...

    async def by_key(self, key: str) -> Tenant | None:
        """The tenant whose URL id (:func:`~gateway.tenants.model.tenant_key`) this is."""
        ...

    async def all(self) -> list[Tenant]: ...

    async def put(self, tenant: Tenant) -> None:
        """Store the record (insert or replace), with its registration due at once when pending."""
        ...

    async def add(self, tenant: Tenant) -> bool:
        """Store a tenant not stored yet (a first install), its registration due at once; False, and
        nothing written, when its ``member_id`` is stored already (another install got there first)."""
        ...

    async def refresh(self, member_id: str, failed_access_token: str, refresher: Refresher) -> Tokens:
        """Tokens newer than ``failed_access_token``: another process's if it refreshed meanwhile,
        else ``refresher``'s (called under the per-portal lock, its tokens stored before the lock
        is released). ``refresher`` may raise; nothing is stored then."""
        ...

    async def update(self, member_id: str, change: Change, *, register_again: bool = False) -> Tenant | None:
        """Apply ``change`` to the record as stored now, atomically with refreshes, status changes and
        other updates (the per-tenant lock, one transaction), writing its result only if it differs.
        The tenant as stored afterwards; None if there is no such tenant (``change`` is not called).
        An exception ``change`` raises propagates as itself, nothing written. ``register_again`` (a
        reinstall): the registration is due now and one in flight loses its lease, so its outcome,
        made with the tokens from before, is not stored."""
        ...

    async def claim_registration(self, owner: str, lease_seconds: float, limit: int) -> list[Tenant]:
        """Tenants whose engine registration is pending and due, leased to ``owner``."""
        ...

    async def registration_done(self, tenant: Tenant, owner: str, *, next_at: float | None = None) -> Tenant | None:
        """Store a registration attempt's outcome (``tenant``'s registration fields, see :func:`registration_outcome`)
        onto the record as stored and release the lease; ``next_at``: try again then. Nothing is written
        if ``owner`` no longer holds the lease. The tenant as stored afterwards (None: forgotten)."""
        ...

    async def forget(self, member_id: str) -> bool: ...

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Have ``callback(tenant_key)`` called when another process changes a tenant (``""``: any may
        have changed), so cached copies are dropped at once. A store without such a signal never calls it."""
        ...


class StatusChangeRefused(Exception):
    """An operator's disable or enable that cannot apply to this tenant; the message says why."""


def operator_status(tenant: Tenant, status: TenantStatus) -> Tenant:
    """The operator's rules, applied by the stores to the record as stored: ``tenant`` itself when
    nothing changes (enabling a tenant that is not disabled, or the same status), else a copy with
    the new status. Refuses any other status and an uninstalled tenant."""
    if status not in (TenantStatus.DISABLED, TenantStatus.ACTIVE):
        raise StatusChangeRefused(f"an operator can only disable or enable a tenant, not set it {status}")
    if tenant.status is TenantStatus.UNINSTALLED:
        raise StatusChangeRefused(
            f"tenant {tenant.key} ({tenant.domain}) has uninstalled the app; it cannot be {'disabled' if status is TenantStatus.DISABLED else 'enabled'}"
        )
    if status is TenantStatus.ACTIVE and tenant.status is not TenantStatus.DISABLED:
        return tenant  # enabling a serving tenant changes nothing (a needs_reinstall one stays so)
    if tenant.status is status:
        return tenant
    return tenant.with_(status=status, updated_at=time.time())


def unknown_tenant(member_id: str) -> StatusChangeRefused:
    return StatusChangeRefused(f"no tenant {tenant_key(member_id)}: it was forgotten meanwhile (see `gateway tenants list`)")


def registration_outcome(stored: Tenant, attempt: Tenant) -> Tenant:
    """A registration attempt's fields on the record as stored: its status and tokens (a disable or a
    refresh meanwhile) are kept, and an uninstall meanwhile keeps the record as it is (its engines are gone)."""
    if stored.status is TenantStatus.UNINSTALLED:
        return stored
    changed = stored.with_(
        registration=attempt.registration,
        registration_attempts=attempt.registration_attempts,
        registration_error=attempt.registration_error,
        registered_engines=attempt.registered_engines,
    )
    return stored if changed == stored else changed.with_(updated_at=time.time())


async def set_status(store: TenantStore, member_id: str, status: TenantStatus) -> Tenant:
    """An operator turns a tenant off (``disabled``: its requests get 403) or on again (``active``);
    what ``gateway tenants disable|enable`` and the dashboard both do. :func:`operator_status`'s rules
    are applied to the record as stored now (:meth:`TenantStore.update`): only the status and
    ``updated_at`` are written. :class:`StatusChangeRefused` for a refusal or an unknown tenant."""
    result = await store.update(member_id, lambda stored: operator_status(stored, status))
    if result is None:
        raise unknown_tenant(member_id)
    return result


def insert_statement(table: str, marks: Sequence[str], *, replace: bool) -> str:
    """The statement both stores write a whole record with (``marks``: their 7 placeholders, for
    :func:`insert_values`); ``replace``: over the one stored (``put``), else only if none is (``add``)."""
    conflict = (
        "DO UPDATE SET record = excluded.record, status = excluded.status, registration = excluded.registration,"
        " registration_next_at = excluded.registration_next_at, updated_at = excluded.updated_at"
        if replace
        else "DO NOTHING"
    )
    columns = "member_id, tenant_key, record, status, registration, registration_next_at, updated_at"
    return f"INSERT INTO {table} ({columns}) VALUES ({', '.join(marks)}) ON CONFLICT (member_id) {conflict}"


def insert_values(tenant: Tenant, now: float) -> tuple[str, str, str, str, str, float, float]:
    """The values of :func:`insert_statement`: the registration due ``now`` (when pending)."""
    return (tenant.member_id, tenant_key(tenant.member_id), record_json(tenant), str(tenant.status), str(tenant.registration), now, now)


def record_json(tenant: Tenant) -> str:
    data = asdict(tenant)
    data["status"], data["registration"] = str(tenant.status), str(tenant.registration)
    data["registered_engines"] = list(tenant.registered_engines)
    return json.dumps(data)


def tenant_from_record(text: str) -> Tenant:
    data: dict[str, Any] = json.loads(text)
    tokens = data.pop("tokens", None)
    return Tenant(
        **{
            **data,
            "tokens": Tokens(**tokens) if tokens else None,
            "status": TenantStatus(data["status"]),
            "registration": Registration(data["registration"]),
            "registered_engines": tuple(data.get("registered_engines") or ()),
        }
    )


SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    member_id TEXT PRIMARY KEY,
    tenant_key TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    status TEXT NOT NULL,
    registration TEXT NOT NULL,
    registration_next_at REAL NOT NULL DEFAULT 0,
    registration_owner TEXT,
    registration_until REAL,
    updated_at REAL NOT NULL
);
"""


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


class SQLiteTenantStore:
    """Tenants in ``data_dir/tenants.sqlite3``: app mode on one machine (processes on it share the
    file; refreshes are serialised by a lock file per tenant, which holds across those processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.locks = path.parent / "tenant-locks"
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._member_locks: dict[str, asyncio.Lock] = {}

    async def open(self) -> None:
        def setup() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            return open_database(self.path, _create_schema)

        try:
            self._conn = await asyncio.to_thread(setup)
        except (OSError, sqlite3.Error) as exc:
            raise QueueStoreError(f"cannot open the tenant store {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._conn is None:
            raise QueueStoreError("the tenant store is not open")
        try:
            return await run_in_thread(self._lock, self._conn, fn)
        except sqlite3.Error as exc:
            raise QueueStoreError(f"tenant store {self.path}: {exc}") from exc

    async def get(self, member_id: str) -> Tenant | None:
        row = await self._run(lambda c: c.execute("SELECT record FROM tenants WHERE member_id = ?", (member_id,)).fetchone())
        return tenant_from_record(row[0]) if row else None

    async def by_key(self, key: str) -> Tenant | None:
        row = await self._run(lambda c: c.execute("SELECT record FROM tenants WHERE tenant_key = ?", (key,)).fetchone())
        return tenant_from_record(row[0]) if row else None

    async def all(self) -> list[Tenant]:
        rows = await self._run(lambda c: c.execute("SELECT record FROM tenants ORDER BY updated_at DESC").fetchall())
        return [tenant_from_record(row[0]) for row in rows]

    async def put(self, tenant: Tenant) -> None:
        await self._insert(tenant, replace=True)

    async def add(self, tenant: Tenant) -> bool:
        return await self._insert(tenant, replace=False)

    async def _insert(self, tenant: Tenant, *, replace: bool) -> bool:
        sql, values = insert_statement("tenants", ["?"] * 7, replace=replace), insert_values(tenant, time.time())
        cursor = await self._run(lambda c: c.execute(sql, values))
        return bool(cursor.rowcount)

    @contextlib.contextmanager
    def _file_lock(self, member_id: str) -> Iterator[None]:
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / f"{tenant_key(member_id)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _tenant_lock(self, member_id: str) -> AsyncIterator[None]:
        """The per-tenant lock of refreshes and status changes: a lock file serialises processes; POSIX
        locks belong to a process, so tasks within this one are serialised by an asyncio lock first."""
        async with self._member_locks.setdefault(member_id, asyncio.Lock()):
            lock = self._file_lock(member_id)
            try:
                await asyncio.to_thread(lock.__enter__)
            except OSError as exc:  # the data_dir unwritable, out of file descriptors: the store is unavailable
                raise QueueStoreError(f"cannot take the tenant's lock file in {self.locks}: {exc.strerror}") from None
            try:
                yield
            finally:
                lock.__exit__(None, None, None)

    async def refresh(self, member_id: str, failed_access_token: str, refresher: Refresher) -> Tokens:
        async with self._tenant_lock(member_id):
            tenant = await self.get(member_id)
            if tenant is None or tenant.tokens is None:
                raise QueueStoreError("the tenant has no tokens to refresh")
            if tenant.tokens.access_token != failed_access_token:
                return tenant.tokens  # another process refreshed while this one waited
            tokens = await refresher(tenant)

            def new_tokens(stored: Tenant) -> Tenant | None:
                # Only the token fields, onto the record as stored after the OAuth call: an uninstall meanwhile stays wiped
                if stored.status is TenantStatus.UNINSTALLED or stored.tokens is None:
                    return None
                now = time.time()
                return stored.with_(tokens=tokens, last_refresh_at=now, updated_at=now)

            await self._run(lambda c: self._apply(c, member_id, new_tokens))
            return tokens

    @staticmethod
    def _apply(c: sqlite3.Connection, member_id: str, change: Change, lease: tuple[str, float] | None = None, register_again: bool = False) -> Tenant | None:
        """``change`` on the record read in the transaction that writes it; ``lease``: (owner, next_at) of a
        registration, whose lease is released, and nothing written unless ``owner`` still holds it;
        ``register_again``: see :meth:`TenantStore.update`."""
        c.execute("BEGIN IMMEDIATE")  # the write lock before the read: no other process writes in between
        try:
            row = c.execute("SELECT record, registration_owner FROM tenants WHERE member_id = ?", (member_id,)).fetchone()
            result = None
            if row is not None:
                result = stored = tenant_from_record(row[0])
                if lease is None or row[1] == lease[0]:
                    changed = change(stored)
                    result = stored if changed is None else changed
                    if result != stored:
                        c.execute(
                            "UPDATE tenants SET record = ?, status = ?, registration = ?, updated_at = ? WHERE member_id = ?",
                            (record_json(result), str(result.status), str(result.registration), time.time(), member_id),
                        )
                    if lease is not None or register_again:
                        c.execute(
                            "UPDATE tenants SET registration_next_at = ?, registration_owner = NULL, registration_until = NULL WHERE member_id = ?",
                            (lease[1] if lease is not None else time.time(), member_id),
                        )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return result

    async def update(self, member_id: str, change: Change, *, register_again: bool = False) -> Tenant | None:
        async with self._tenant_lock(member_id):
            result: Tenant | None = await self._run(lambda c: self._apply(c, member_id, change, register_again=register_again))
            return result

    async def claim_registration(self, owner: str, lease_seconds: float, limit: int) -> list[Tenant]:
        def op(c: sqlite3.Connection) -> list[Tenant]:
            now = time.time()
            c.execute("BEGIN IMMEDIATE")
            try:
                rows = c.execute(
                    "SELECT member_id, record FROM tenants WHERE registration = ? AND registration_next_at <= ?"
                    " AND (registration_until IS NULL OR registration_until <= ?) ORDER BY registration_next_at LIMIT ?",
                    (str(Registration.PENDING), now, now, limit),
                ).fetchall()
                c.executemany(
                    "UPDATE tenants SET registration_owner = ?, registration_until = ? WHERE member_id = ?", [(owner, now + lease_seconds, r[0]) for r in rows]
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return [tenant_from_record(r[1]) for r in rows]

        result: list[Tenant] = await self._run(op)
        return result

    async def registration_done(self, tenant: Tenant, owner: str, *, next_at: float | None = None) -> Tenant | None:
        def outcome(stored: Tenant) -> Tenant:
            return registration_outcome(stored, tenant)

        async with self._tenant_lock(tenant.member_id):
            result: Tenant | None = await self._run(lambda c: self._apply(c, tenant.member_id, outcome, (owner, next_at or 0.0)))
            return result

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Processes sharing the file send each other no signal: their caches expire (2 s)."""

    async def forget(self, member_id: str) -> bool:
        cursor = await self._run(lambda c: c.execute("DELETE FROM tenants WHERE member_id = ?", (member_id,)))
        return bool(cursor.rowcount)
