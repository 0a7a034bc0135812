"""The connection to the shared database: the driver, a pool per process, and what its errors mean.

asyncpg is imported here and nowhere else, lazily, so the embedded SQLite default neither needs
it installed nor pays for importing it. Every error is sorted once, here:
:class:`~gateway.jobs.queue.QueueItemError` for a value this one operation brought (PostgreSQL
refused it; retrying it will not help), :class:`~gateway.jobs.queue.QueueStoreError` for the
database itself (unreachable, restarting, out of connections): the accept path answers 503 and
the loops back off and try again. Messages never carry the DSN, which may hold a password.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any, TypeVar

from gateway.config import QueueSettings
from gateway.jobs.queue import QueueItemError, QueueStoreError

log = logging.getLogger("gateway.postgres")
ARGUMENT_ERROR = re.compile(r"^(invalid input for query argument \$\d+): .* \((.*)\)$")
T = TypeVar("T")
INSTALL_HINT = "pip install 'bitrix24-ai-gateway[postgres]'"
ITEM_SQLSTATE_CLASSES = ("22", "23")
"""Data exceptions (a value PostgreSQL cannot take: a NUL, a number out of range) and integrity
constraint violations: the operation's own values are wrong, the database is fine."""
COMMAND_TIMEOUT = 30.0
"""Seconds a statement may take before it is given up (a database that hangs, rather than refuses)."""
START_WAIT = 30.0
"""Seconds a starting process waits for the database (a failover, a database starting beside it)."""


class DriverMissing(QueueStoreError):
    """``queue.backend: postgres`` without the driver installed."""


def driver() -> ModuleType:
    """asyncpg, or :class:`DriverMissing` saying how to install it."""
    try:
        import asyncpg
    except ImportError:
        raise DriverMissing(f"queue.backend is postgres but its driver (asyncpg) is not installed: {INSTALL_HINT}") from None
    module: ModuleType = asyncpg
    return module


def describe(exc: BaseException) -> str:
    """What went wrong, for logs and errors: the exception's kind and PostgreSQL's message, never the DSN."""
    sqlstate = getattr(exc, "sqlstate", None)
    message = str(exc).splitlines()[0][:300] if str(exc) else ""
    if quoted := ARGUMENT_ERROR.match(message):  # the driver quotes the value: a callback URL holds the portal's hash
        message = f"{quoted.group(1)} ({quoted.group(2)})"
    if isinstance(exc, OSError) and not sqlstate:
        message = exc.strerror or message  # "Connection refused", without the address list asyncpg adds
    return f"{type(exc).__name__}{f' [{sqlstate}]' if sqlstate else ''}{f': {message}' if message else ''}"


def translate(exc: BaseException) -> QueueStoreError:
    """A driver, socket or timeout error as the queue's own error type."""
    if isinstance(exc, QueueStoreError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate[:2] in ITEM_SQLSTATE_CLASSES or isinstance(exc, (UnicodeError, OverflowError)) or type(exc).__name__ == "DataError":
        return QueueItemError(f"this job cannot be stored: {describe(exc)}")
    return QueueStoreError(f"PostgreSQL: {describe(exc)}")


class Database:
    """One pool of connections to the shared database, opened by the runtime and used by the
    queue, the file store and the token store of this process."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self._pool: Any = None
        self.channels: dict[str, list[Callable[[str], None]]] = {}
        """``NOTIFY`` channels this process listens on, with who to call with each payload (the
        queue's listening connection serves them all; an empty payload after it reconnects means
        "anything may have changed meanwhile")."""

    def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` for each notification on ``channel`` (register before the queue opens)."""
        self.channels.setdefault(channel, []).append(callback)

    async def open(self, *, wait: float = START_WAIT) -> None:
        """Create the pool and check the database answers, waiting up to ``wait`` seconds for it."""
        asyncpg = driver()

        async def create() -> Any:
            pool = await asyncpg.create_pool(
                self.settings.dsn,
                min_size=0,  # no floor to restore while the database is away (the driver logs each try)
                max_size=self.settings.pool_size,
                timeout=self.settings.connect_timeout,
                command_timeout=COMMAND_TIMEOUT,
                max_inactive_connection_lifetime=300.0,
                reset=_keep_session,
            )
            try:  # the pool keeps no connection open by itself: check the database answers now
                async with pool.acquire(timeout=self.settings.connect_timeout) as conn:
                    await conn.execute("SELECT 1")
            except BaseException:
                pool.terminate()
                raise
            return pool

        self._pool = await wait_for_database(create, wait, "opening the connection pool")

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (Exception, TimeoutError):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; any error inside is raised as a queue error (see the module doc)."""
        if self._pool is None:
            raise QueueStoreError("the PostgreSQL pool is not open")
        try:
            async with self._pool.acquire(timeout=self.settings.connect_timeout) as conn:
                yield conn
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc) from exc

    async def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``await work(connection)`` on a pooled connection, errors translated."""
        async with self.connection() as conn:
            return await work(conn)

    async def connect(self) -> Any:
        """A connection of its own, outside the pool (the listener, one-off commands); errors translated."""
        try:
            return await driver().connect(self.settings.dsn, timeout=self.settings.connect_timeout)
        except Exception as exc:
            raise translate(exc) from exc


async def _keep_session(conn: Any) -> None:
    """Release a pooled connection without the driver's reset query (``RESET ALL``, ``UNLISTEN *``,
    ...: one more round trip and transaction per operation). The gateway changes no session state
    on pooled connections (LISTEN has a connection of its own; advisory locks are transaction-level),
    and the driver still rolls back an open transaction before this is called."""


async def wait_for_database(attempt: Callable[[], Awaitable[T]], wait: float, doing: str) -> T:
    """Try ``attempt`` until it succeeds or ``wait`` seconds pass; only a database that cannot be
    reached is waited for (a wrong password or database name fails at once)."""
    deadline = time.monotonic() + wait
    pause = 0.25
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if isinstance(exc, DriverMissing):
                raise
            cause = exc.__cause__ if isinstance(exc, QueueStoreError) and exc.__cause__ is not None else exc
            if not _unreachable(cause) or time.monotonic() + pause > deadline:
                raise QueueStoreError(f"PostgreSQL ({doing}): {describe(cause)}") from exc
            log.warning("PostgreSQL is not reachable (%s); trying again in %.1f s", describe(cause), pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


def _unreachable(exc: BaseException) -> bool:
    """Worth waiting for: no connection, or a server starting up, shutting down or out of slots."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return (
        isinstance(exc, (OSError, TimeoutError))
        or sqlstate[:2] in ("08", "53", "57")
        or type(exc).__name__ in ("ConnectionDoesNotExistError", "InterfaceError")
    )


def run_on_database(settings: QueueSettings, work: Callable[[Any], Awaitable[T]], doing: str, *, wait: float = START_WAIT, migrate: bool = True) -> T:
    """``work(connection)`` on a connection of its own (migrated first, unless ``migrate`` is False),
    from synchronous code; waits up to ``wait`` seconds for a database that cannot be reached yet.
    Raises the queue's errors."""

    from gateway.postgres import schema

    async def main() -> T:
        database = Database(settings)
        conn = await wait_for_database(database.connect, wait, doing)
        try:
            if migrate:
                await schema.migrate(conn)
            return await work(conn)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="postgres") as pool:
        return pool.submit(asyncio.run, main()).result()
