"""An operator's disable/enable (``gateway tenants disable|enable``, the dashboard) on each tenant store:
it writes the status into the record as stored at that moment, so a token refresh or an uninstall
that landed after the operator looked is kept, and it waits for a refresh in flight (refresh tokens
are single-use: writing an old one back would lock the portal out). The other writers (a registration's
outcome, ``needs_reinstall``, a refresh's tokens) likewise write only their fields, so none undoes another's."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.config import QueueSettings
from gateway.stores import TENANTS_FILE, Stores
from gateway.tenants.model import Registration, Tenant, TenantStatus, Tokens, tenant_key
from gateway.tenants.service import needs_reinstall
from gateway.tenants.store import SQLiteTenantStore, StatusChangeRefused, TenantStore, set_status

pytestmark = pytest.mark.anyio

MEMBER = "member-of-acme"
KEY = tenant_key(MEMBER)
OLD = Tokens("access-old", "refresh-old", 1000.0)
NEW = Tokens("access-new", "refresh-new", 2000.0)
DISABLE_ELSEWHERE = """
import asyncio, sys
from pathlib import Path
from gateway.tenants.model import TenantStatus
from gateway.tenants.store import SQLiteTenantStore, StatusChangeRefused, set_status

async def main() -> None:
    store = SQLiteTenantStore(Path(sys.argv[1]))
    await store.open()
    try:
        print((await set_status(store, sys.argv[2], TenantStatus.DISABLED)).status)
    except StatusChangeRefused as exc:
        print(f"refused: {exc}")
    finally:
        await store.close()

asyncio.run(main())
"""


def acme(**changes: Any) -> Tenant:
    return Tenant(
        member_id=MEMBER,
        domain="acme.bitrix24.com",
        client_endpoint="https://acme.bitrix24.com/rest/",
        server_endpoint="https://oauth.bitrix.info/rest/",
        application_token="app-token",
        url_secret="u" * 32,
        tokens=OLD,
        registration=Registration.DONE,
        registered_engines=("gpt",),
        limits={"concurrent_jobs": 2.0},
        installed_at=100.0,
        updated_at=100.0,
    ).with_(**changes)


def uninstalled(tenant: Tenant) -> Tenant:
    """What the service stores on a verified uninstall event."""
    return tenant.with_(
        status=TenantStatus.UNINSTALLED, tokens=None, registration=Registration.DONE, registered_engines=(), detail="the portal uninstalled the app"
    )


def refresher_to(tokens: Tokens) -> Callable[[Tenant], Awaitable[Tokens]]:
    async def refresher(_tenant: Tenant) -> Tokens:
        return tokens

    return refresher


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for ``check`` (bounded: 1000 tries); the outcome, not the time, is what tests assert."""
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


class Backend:
    """One backend's tenant stores (several: other processes' or nodes'), and a look at the stored row."""

    def __init__(self, name: str, settings: QueueSettings, data_dir: Path) -> None:
        self.name, self.settings, self.data_dir = name, settings, data_dir
        self._opened: list[Stores] = []

    async def store(self) -> TenantStore:
        stores = Stores.for_queue(self.settings, self.data_dir)
        if self.name == "postgres":
            await stores.queue.open()  # opens the pool the tenant store shares, migrated
        else:
            await stores.tenants.open()
        self._opened.append(stores)
        return stores.tenants

    async def close(self) -> None:
        for stores in self._opened:
            await (stores.queue.close() if self.name == "postgres" else stores.tenants.close())

    async def status_column(self, member_id: str) -> str:
        """The ``status`` column the stores' statements select on (beside the record)."""
        if self.name == "postgres":
            conn = await asyncpg.connect(self.settings.dsn)
            try:
                return str(await conn.fetchval("SELECT status FROM gateway_tenants WHERE member_id = $1", member_id))
            finally:
                await conn.close()
        conn_ = sqlite3.connect(self.data_dir / TENANTS_FILE)
        try:
            return str(conn_.execute("SELECT status FROM tenants WHERE member_id = ?", (member_id,)).fetchone()[0])
        finally:
            conn_.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        settings = QueueSettings(backend="sqlite", path=tmp_path / "q.sqlite3")
    else:
        settings = QueueSettings(backend="postgres", dsn=request.getfixturevalue("postgres_dsn"), pool_size=4)
    backend = Backend(request.param, settings, tmp_path)
    yield backend
    await backend.close()


async def test_a_disable_keeps_the_tokens_a_refresh_wrote_after_the_operator_looked(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme())
    seen = await store.get(MEMBER)  # the operator's page / `tenants list`
    assert seen is not None
    assert await store.refresh(MEMBER, OLD.access_token, refresher_to(NEW)) == NEW
    changed = await set_status(store, seen.member_id, TenantStatus.DISABLED)
    stored = await store.get(MEMBER)
    assert stored is not None and stored.status is TenantStatus.DISABLED and stored.tokens == NEW and stored.last_refresh_at is not None
    assert changed == stored
    assert stored.limits == {"concurrent_jobs": 2.0} and stored.registered_engines == ("gpt",)  # the rest of the record untouched
    assert await backend.status_column(MEMBER) == "disabled"
    enabled = await set_status(store, seen.member_id, TenantStatus.ACTIVE)  # the same old copy, once more
    assert enabled.status is TenantStatus.ACTIVE and enabled.tokens == NEW


async def test_an_uninstall_after_the_operator_looked_refuses_the_change_and_stays(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme(status=TenantStatus.DISABLED))
    seen = await store.get(MEMBER)
    assert seen is not None
    await store.put(uninstalled(seen))
    for status, verb in ((TenantStatus.ACTIVE, "enabled"), (TenantStatus.DISABLED, "disabled")):
        with pytest.raises(StatusChangeRefused) as refused:
            await set_status(store, seen.member_id, status)
        assert str(refused.value) == f"tenant {KEY} (acme.bitrix24.com) has uninstalled the app; it cannot be {verb}"
    stored = await store.get(MEMBER)
    assert stored is not None and stored.status is TenantStatus.UNINSTALLED and stored.tokens is None
    assert await backend.status_column(MEMBER) == "uninstalled"


async def test_the_operator_rules_and_their_messages(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme())
    for status in (TenantStatus.NEEDS_REINSTALL, TenantStatus.UNINSTALLED):
        with pytest.raises(StatusChangeRefused) as refused:
            await set_status(store, MEMBER, status)
        assert str(refused.value) == f"an operator can only disable or enable a tenant, not set it {status}"
    same = await set_status(store, MEMBER, TenantStatus.ACTIVE)  # enabling a serving tenant changes nothing
    assert same == acme()
    disabled = await set_status(store, MEMBER, TenantStatus.DISABLED)
    assert disabled.status is TenantStatus.DISABLED and disabled.updated_at > 100.0
    again = await set_status(store, MEMBER, TenantStatus.DISABLED)  # the same status: nothing written
    assert again == disabled == await store.get(MEMBER)
    assert (await set_status(store, MEMBER, TenantStatus.ACTIVE)).status is TenantStatus.ACTIVE
    await store.put(acme(status=TenantStatus.NEEDS_REINSTALL, detail="reinstall the app"))
    kept = await set_status(store, MEMBER, TenantStatus.ACTIVE)  # a needs_reinstall tenant stays so
    assert kept.status is TenantStatus.NEEDS_REINSTALL and await backend.status_column(MEMBER) == "needs_reinstall"
    assert (await set_status(store, MEMBER, TenantStatus.DISABLED)).status is TenantStatus.DISABLED  # it can be turned off
    assert await backend.status_column(MEMBER) == "disabled"


async def test_a_tenant_forgotten_meanwhile_is_refused_by_its_id(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme())
    seen = await store.get(MEMBER)
    assert seen is not None and await store.forget(MEMBER)
    with pytest.raises(StatusChangeRefused) as refused:
        await set_status(store, seen.member_id, TenantStatus.DISABLED)
    assert str(refused.value) == f"no tenant {KEY}: it was forgotten meanwhile (see `gateway tenants list`)"
    assert MEMBER not in str(refused.value)
    assert await store.get(MEMBER) is None  # not brought back


async def test_a_disable_from_elsewhere_during_a_refresh_waits_for_it_and_keeps_its_tokens(backend: Backend) -> None:
    """Another process (SQLite: the lock file) or node (PostgreSQL: the advisory lock) disables the
    tenant while this one is inside a refresh: the disable waits, then applies to the new record."""
    store = await backend.store()
    await store.put(acme())
    inside, release = asyncio.Event(), asyncio.Event()

    async def slow_refresher(_tenant: Tenant) -> Tokens:
        inside.set()
        await release.wait()
        return NEW

    refreshing = asyncio.create_task(store.refresh(MEMBER, OLD.access_token, slow_refresher))
    await inside.wait()
    if backend.name == "sqlite":
        assert isinstance(store, SQLiteTenantStore)
        elsewhere = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DISABLE_ELSEWHERE, str(store.path), MEMBER, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        await until(lambda: asyncio.to_thread(lock_waiters, store.locks / f"{KEY}.lock"), "the other process waits for the tenant's lock file")
        release.set()
        out, err = await elsewhere.communicate()
        assert elsewhere.returncode == 0, err.decode()
        assert out.decode().strip() == "disabled"
    else:
        other = await backend.store()
        disabling = asyncio.create_task(set_status(other, MEMBER, TenantStatus.DISABLED))
        await until(lambda: advisory_waiters(backend.settings.dsn), "the other node waits for the refresh's locks")
        assert not disabling.done()
        release.set()
        assert (await disabling).status is TenantStatus.DISABLED
    assert await refreshing == NEW
    stored = await store.get(MEMBER)
    assert stored is not None and stored.status is TenantStatus.DISABLED and stored.tokens == NEW


async def test_disables_and_enables_at_once_from_two_stores_end_in_one_state_with_the_tokens(backend: Backend) -> None:
    one, two = await backend.store(), await backend.store()
    await one.put(acme())
    seen = await one.get(MEMBER)  # both operators looked before the refresh
    assert seen is not None
    await two.refresh(MEMBER, OLD.access_token, refresher_to(NEW))
    for _ in range(10):
        results = await asyncio.gather(
            set_status(one, seen.member_id, TenantStatus.DISABLED),
            set_status(two, seen.member_id, TenantStatus.ACTIVE),
            set_status(two, seen.member_id, TenantStatus.DISABLED),
            set_status(one, seen.member_id, TenantStatus.ACTIVE),
        )
        assert all(r.tokens == NEW for r in results)
        stored = await one.get(MEMBER)
        assert stored is not None and stored.status in (TenantStatus.ACTIVE, TenantStatus.DISABLED) and stored.tokens == NEW
        assert stored.limits == {"concurrent_jobs": 2.0} and stored.registered_engines == ("gpt",)
        assert await backend.status_column(MEMBER) == str(stored.status)  # column and record agree
        assert stored == await two.get(MEMBER)


async def test_a_status_change_notifies_the_other_nodes(postgres_dsn: str, tmp_path: Path) -> None:
    backend = Backend("postgres", QueueSettings(backend="postgres", dsn=postgres_dsn, pool_size=4), tmp_path)
    listener = await asyncpg.connect(postgres_dsn)
    try:
        store = await backend.store()
        await store.put(acme())
        heard: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("gateway_tenants", lambda _c, _p, _ch, payload: heard.put_nowait(payload))
        await set_status(store, MEMBER, TenantStatus.DISABLED)
        assert await asyncio.wait_for(heard.get(), 30) == KEY  # the payload is the tenant id, never the member_id
    finally:
        await listener.close()
        await backend.close()


async def test_a_registration_finishing_after_a_disable_and_a_refresh_keeps_both(backend: Backend) -> None:
    """The registration read the tenant when it claimed it; the operator disabled it and a refresh
    landed while it was on the portal: only the registration's fields are written back."""
    store, other = await backend.store(), await backend.store()
    await store.put(acme(registration=Registration.PENDING, registered_engines=()))
    [claimed] = await store.claim_registration("owner-1", 120.0, 4)
    assert claimed.status is TenantStatus.ACTIVE and claimed.tokens == OLD
    await set_status(other, MEMBER, TenantStatus.DISABLED)
    await other.refresh(MEMBER, OLD.access_token, refresher_to(NEW))
    done = claimed.with_(registration=Registration.DONE, registration_attempts=1, registered_engines=("gpt",))
    assert await other.registration_done(done.with_(registered_engines=("lost",)), "owner-2") == await store.get(MEMBER)  # not the lease's owner
    stored = await store.registration_done(done, "owner-1")
    assert stored is not None and stored == await other.get(MEMBER)
    assert stored.status is TenantStatus.DISABLED and stored.tokens == NEW and stored.last_refresh_at is not None
    assert stored.registration is Registration.DONE and stored.registration_attempts == 1 and stored.registered_engines == ("gpt",)
    assert stored.limits == {"concurrent_jobs": 2.0}
    assert await backend.status_column(MEMBER) == "disabled"
    assert await store.claim_registration("owner-3", 120.0, 4) == []  # done: nothing to claim


async def test_a_failed_registration_attempt_keeps_a_disable_and_is_claimed_again(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme(registration=Registration.PENDING, registered_engines=()))
    [claimed] = await store.claim_registration("owner-1", 120.0, 4)
    await set_status(store, MEMBER, TenantStatus.DISABLED)
    retry = claimed.with_(registration_attempts=1, registration_error="portal unreachable")
    stored = await store.registration_done(retry, "owner-1", next_at=1.0)  # due again at once: the lease is released
    assert stored is not None and stored.status is TenantStatus.DISABLED and stored.registration_error == "portal unreachable"
    [again] = await store.claim_registration("owner-2", 120.0, 4)
    assert again == stored and again.registration is Registration.PENDING


async def test_a_reinstall_makes_the_registration_due_now_and_drops_the_one_in_flight(backend: Backend) -> None:
    """A registration claimed with the old tokens is still on the portal when the app is reinstalled:
    its outcome is not stored, and the next claim (at once, whatever its backoff) has the new tokens."""
    store, other = await backend.store(), await backend.store()
    await store.put(acme(registration=Registration.PENDING, registered_engines=()))
    [claimed] = await store.claim_registration("owner-1", 120.0, 4)

    def reinstalled(stored: Tenant) -> Tenant:
        return stored.with_(tokens=NEW, registration=Registration.PENDING, registration_attempts=0)

    assert (await other.update(MEMBER, reinstalled, register_again=True)) == await store.get(MEMBER)
    late = await store.registration_done(claimed.with_(registration=Registration.DONE, registration_attempts=1, registered_engines=("gpt",)), "owner-1")
    assert late is not None and late.registration is Registration.PENDING and late.tokens == NEW  # the old lease wrote nothing
    [again] = await other.claim_registration("owner-2", 120.0, 4)
    assert again.tokens == NEW and again.limits == {"concurrent_jobs": 2.0}

    retry = again.with_(registration_attempts=1, registration_error="portal unreachable")
    await other.registration_done(retry, "owner-2", next_at=time.time() + 3600)  # backing off for an hour
    assert await store.claim_registration("owner-3", 120.0, 4) == []
    await store.update(MEMBER, reinstalled, register_again=True)
    assert [t.tokens for t in await store.claim_registration("owner-3", 120.0, 4)] == [NEW]  # a reinstall does not wait


async def test_two_first_installs_at_once_store_one_record(backend: Backend) -> None:
    """Two installs of a new portal at once (a retried event, two nodes): one adds the record, the
    other finds it there and must write onto it (the service then updates), so one URL secret wins."""
    stores = [await backend.store(), await backend.store()]
    candidates = [acme(registration=Registration.PENDING, registered_engines=(), url_secret=c * 32) for c in "ab"]
    added = await asyncio.gather(*(store.add(tenant) for store, tenant in zip(stores, candidates, strict=True)))
    assert sorted(added) == [False, True]
    stored = await stores[0].get(MEMBER)
    assert stored == candidates[added.index(True)]
    assert await stores[1].add(acme(url_secret="c" * 32)) is False and await stores[1].get(MEMBER) == stored  # nothing written
    [claimed] = await stores[1].claim_registration("owner-1", 120.0, 4)  # due at once
    assert claimed == stored


async def test_a_registration_finishing_after_an_uninstall_leaves_it_uninstalled(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme(registration=Registration.PENDING, registered_engines=()))
    [claimed] = await store.claim_registration("owner-1", 120.0, 4)
    await store.put(uninstalled(claimed))
    stored = await store.registration_done(claimed.with_(registration=Registration.DONE, registration_attempts=1, registered_engines=("gpt",)), "owner-1")
    assert stored is not None and stored.status is TenantStatus.UNINSTALLED and stored.tokens is None and stored.registered_engines == ()
    assert await backend.status_column(MEMBER) == "uninstalled"


async def test_needs_reinstall_marks_only_an_active_tenant_still_holding_the_refused_token(backend: Backend) -> None:
    store = await backend.store()

    async def mark() -> Tenant | None:
        return await store.update(MEMBER, lambda stored: needs_reinstall(stored, OLD.refresh_token, "invalid_grant"))

    for before in (acme(status=TenantStatus.DISABLED), uninstalled(acme()), acme(tokens=NEW)):  # disabled, uninstalled, reinstalled meanwhile
        await store.put(before)
        assert await mark() == before == await store.get(MEMBER)
        assert await backend.status_column(MEMBER) == str(before.status)
    await store.put(acme())
    marked = await mark()
    assert marked is not None and marked.status is TenantStatus.NEEDS_REINSTALL and marked.tokens == OLD and marked == await store.get(MEMBER)
    assert (
        marked.detail
        == "the OAuth server refused the refresh token (invalid_grant): reinstall the app on acme.bitrix24.com (Applications → the app → Reinstall)"
    )
    assert await backend.status_column(MEMBER) == "needs_reinstall"
    assert await store.update("someone-else", lambda stored: stored.with_(detail="x")) is None  # no such tenant: nothing created
    assert await store.get("someone-else") is None


async def test_an_exception_in_a_change_propagates_as_itself_and_writes_nothing(backend: Backend) -> None:
    store = await backend.store()
    await store.put(acme())

    def refuse(_stored: Tenant) -> Tenant:
        raise StatusChangeRefused("no")

    with pytest.raises(StatusChangeRefused) as refused:
        await store.update(MEMBER, refuse)
    assert str(refused.value) == "no"
    assert await store.get(MEMBER) == acme()


async def stored_after_a_write_during_a_sqlite_refresh(backend: Backend, write: Callable[[Tenant], Tenant]) -> Tenant:
    """The tenant as stored after another process writes ``write(seen)`` over the record, with no lock,
    while a refresh waits for the OAuth server; the refresh itself returned the new tokens."""
    store = await backend.store()
    await store.put(acme())
    inside, release = asyncio.Event(), asyncio.Event()

    async def slow_refresher(_tenant: Tenant) -> Tokens:
        inside.set()
        await release.wait()
        return NEW

    refreshing = asyncio.create_task(store.refresh(MEMBER, OLD.access_token, slow_refresher))
    await inside.wait()
    seen = await store.get(MEMBER)
    assert seen is not None
    await (await backend.store()).put(write(seen))
    release.set()
    assert await refreshing == NEW
    stored = await store.get(MEMBER)
    assert stored is not None
    return stored


async def test_a_sqlite_refresh_racing_an_uninstall_leaves_it_uninstalled_without_tokens(tmp_path: Path) -> None:
    """The uninstall lands while the refresh waits for the OAuth server: its new tokens are not written back."""
    backend = Backend("sqlite", QueueSettings(backend="sqlite", path=tmp_path / "q.sqlite3"), tmp_path)
    try:
        stored = await stored_after_a_write_during_a_sqlite_refresh(backend, uninstalled)  # the uninstall event, handled by another process
        assert stored.status is TenantStatus.UNINSTALLED and stored.tokens is None and stored.last_refresh_at is None
        assert await backend.status_column(MEMBER) == "uninstalled"
    finally:
        await backend.close()


async def test_a_sqlite_refresh_writes_only_the_tokens(tmp_path: Path) -> None:
    """A disable and a limits change that land during the OAuth call are kept."""
    backend = Backend("sqlite", QueueSettings(backend="sqlite", path=tmp_path / "q.sqlite3"), tmp_path)
    try:
        stored = await stored_after_a_write_during_a_sqlite_refresh(
            backend, lambda seen: seen.with_(status=TenantStatus.DISABLED, limits={"concurrent_jobs": 5.0})
        )  # a writer that takes no lock
        assert stored.tokens == NEW and stored.last_refresh_at is not None
        assert stored.status is TenantStatus.DISABLED and stored.limits == {"concurrent_jobs": 5.0}
        assert await backend.status_column(MEMBER) == "disabled"
    finally:
        await backend.close()


def lock_waiters(path: Path) -> bool:
    """Whether a process waits for a POSIX lock on ``path`` (``/proc/locks`` lists waiters with ``->``)."""
    if not path.exists():
        return False
    inode = os.stat(path).st_ino
    return any("->" in line and line.split()[-3].endswith(f":{inode}") for line in Path("/proc/locks").read_text().splitlines())


async def advisory_waiters(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"))
    finally:
        await conn.close()
