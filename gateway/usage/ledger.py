"""Usage of the OpenAI-compatible API, counted in memory per request and added to a store in batches.

``/v1`` requests leave no job behind, so without this nothing durable says who used what. Counting
must cost the request path nothing: :meth:`ApiUsageLedger.record` adds to an in-memory counter
keyed by (UTC day, key name, engine) and never does I/O. A supervised loop ("usage-flush") hands
the counters to the store every :data:`FLUSH_INTERVAL` seconds, and the runtime flushes once more
at stop.

A flush is one transaction of UPSERTs that *add* to the stored row, so any number of processes
and nodes write the same table and their counts add up. What a flush takes out of memory is put
back if the write fails (counted again with the next one, never lost); a flush cancelled while
its write runs waits for the write's outcome first, so a write that committed is never counted
twice. One case stays ambiguous, as with any database: a connection lost during ``COMMIT`` leaves
the outcome unknown; the counts are then kept and written again (counted twice at worst, never lost).

Memory is bounded by what the configuration names: at most ``keys x engines`` counters per UTC
day that has not been stored yet (two days around midnight; more only while the store is down).
Key names are not secrets (``api_keys[].name``); the secrets never reach the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.adapters import Usage
from gateway.jobs.queue import QueueStoreError

log = logging.getLogger("gateway.usage")
FLUSH_INTERVAL = 5.0
"""Seconds between flushes: what a crash (SIGKILL) of a process can lose at most."""
FLUSH_LOOP = "usage-flush"
"""The flush loop's name under the runtime's Supervisor (``/-/health``, the dashboard)."""
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "audio_seconds")
"""The counted columns, in the order of :class:`ApiUsageRow` and of both stores' statements."""
LOG_EVERY = 12
"""While the store fails, warn at the first failure and then every this many (a minute at 5 s)."""
DAY = 86400


def utc_day(timestamp: float) -> str:
    """``YYYY-MM-DD`` of a Unix time, in UTC: the day a row counts for."""
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


@dataclass(frozen=True)
class ApiUsageRow:
    """The counts of one (UTC day, API key name, engine): an increment to add, or a stored total."""

    day: str
    api_key: str
    engine: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    audio_seconds: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.day, self.api_key, self.engine)

    def counts(self) -> tuple[int, int, int, int, float, float]:
        """The counters in :data:`COUNTERS` order (the stores' statement parameters after the key)."""
        return (self.requests, self.errors, self.prompt_tokens, self.completion_tokens, self.cost_usd, self.audio_seconds)


class ApiUsageStore(Protocol):
    """Where the counts are added up: SQLite (``data_dir/usage.sqlite3``) or the shared PostgreSQL database.
    Errors are :class:`~gateway.jobs.queue.QueueStoreError` (the storage error every store raises)."""

    where: str
    """Where the rows are, for messages (a path or a table; never a DSN)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, rows: Sequence[ApiUsageRow]) -> None:
        """Add each row's counts to the stored row of its (day, key, engine), created at zero if
        missing, all in one transaction: every row is added, or none."""
        ...

    async def rows(self, since_day: str) -> list[ApiUsageRow]:
        """The stored rows of ``since_day`` (``YYYY-MM-DD``) and later, by day, key and engine."""
        ...


class _Counts:
    """One mutable counter of the ledger (a dataclass would cost more per request)."""

    __slots__ = COUNTERS

    def __init__(self) -> None:
        self.requests = self.errors = self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = self.audio_seconds = 0.0

    def add(self, other: _Counts) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


Key = tuple[str, str, str]


class ApiUsageLedger:
    """This process's API usage not yet stored, and its store. :meth:`record` on the request path;
    :meth:`run` as the "usage-flush" loop; :meth:`close` at stop (a last flush)."""

    def __init__(self, store: ApiUsageStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._pending: dict[Key, _Counts] = {}
        self._flushing = asyncio.Lock()
        self._day_number, self._day = -1, ""
        self.failures = 0
        """Flushes that failed in a row (0: the last one succeeded)."""
        self.last_error = ""
        """Why the last flush failed, while it keeps failing (for the dashboard and logs)."""

    # -- the request path ---------------------------------------------------------------
    def record(self, key: str, engine: str, *, error: bool, usage: Usage | None = None, audio_seconds: float | None = None) -> None:
        """Count one request of ``key`` (its name) to ``engine``: no I/O, O(1)."""
        now = self.clock()
        if int(now // DAY) != self._day_number:
            self._day_number, self._day = int(now // DAY), utc_day(now)
        counts = self._pending.get((self._day, key, engine))
        if counts is None:
            counts = self._pending[(self._day, key, engine)] = _Counts()
        counts.requests += 1
        if error:
            counts.errors += 1
        if usage is not None:
            counts.prompt_tokens += max(0, int(usage.prompt_tokens or 0))
            counts.completion_tokens += max(0, int(usage.completion_tokens or 0))
            counts.cost_usd += _amount(usage.cost_usd)
        counts.audio_seconds += _amount(audio_seconds)

    # -- reading ------------------------------------------------------------------------------
    def pending(self) -> list[ApiUsageRow]:
        """What this process counted and has not stored yet, by day, key and engine."""
        return [_row(key, counts) for key, counts in sorted(self._pending.items())]

    async def rows(self, since_day: str) -> list[ApiUsageRow]:
        """The stored rows with this process's counts not yet stored added (what the dashboard shows:
        up to date for this process, other processes' last seconds arrive with their next flush)."""
        totals: dict[Key, _Counts] = {}
        async with self._flushing:  # a batch being written is in neither the store nor memory until its flush ends
            stored = await self.store.rows(since_day)
        for row in [*stored, *self.pending()]:
            if row.day >= since_day:
                totals.setdefault(row.key, _Counts()).add(_counts(row))
        return [_row(key, counts) for key, counts in sorted(totals.items())]

    # -- storing ---------------------------------------------------------------------------------
    async def open(self) -> None:
        await self.store.open()

    async def flush(self) -> int:
        """Add the counts so far to the store in one transaction; the number of rows written.
        Raises the store's :class:`QueueStoreError`, with the counts kept for the next flush."""
        async with self._flushing:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, {}  # requests from now on count into a new dict
            rows = [_row(key, counts) for key, counts in sorted(batch.items())]  # one order: concurrent writers lock rows alike
            write = asyncio.ensure_future(self.store.add(rows))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The write goes on (a thread, a transaction): learn its outcome before deciding.
                with contextlib.suppress(BaseException):
                    await write
                if write.cancelled() or write.exception() is not None:
                    self._put_back(batch)
                raise
            except BaseException:
                self._put_back(batch)
                raise
            return len(rows)

    def _put_back(self, batch: dict[Key, _Counts]) -> None:
        for key, counts in batch.items():
            self._pending.setdefault(key, _Counts()).add(counts)

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """The flush loop. A store that fails is logged and tried again (the counts wait in memory);
        anything else raises to the Supervisor, which restarts the loop."""
        while True:
            await asyncio.sleep(interval)
            await self._flush_logged()

    async def _flush_logged(self) -> bool:
        try:
            await self.flush()
        except QueueStoreError as exc:
            self.failures += 1
            self.last_error = str(exc)[:300]
            if self.failures % LOG_EVERY == 1:
                log.warning(
                    "API usage: cannot write to %s (%s); %d row(s) kept in memory, trying again (failure %d)",
                    self.store.where,
                    self.last_error,
                    len(self._pending),
                    self.failures,
                )
            return False
        if self.failures:
            log.info("API usage: written to %s again after %d failed attempt(s)", self.store.where, self.failures)
        self.failures, self.last_error = 0, ""
        return True

    async def close(self) -> None:
        """The last flush, then the store closed. Counts the store refuses now are lost: logged as such."""
        try:
            if not await self._flush_logged():
                log.error("API usage: %d row(s) of counts could not be written to %s at stop and are lost", len(self._pending), self.store.where)
        finally:
            await self.store.close()


def _amount(value: float | None) -> float:
    """A non-negative finite amount (a provider's cost or a duration), else 0."""
    return float(value) if value is not None and math.isfinite(value) and value > 0 else 0.0


def _row(key: Key, counts: _Counts) -> ApiUsageRow:
    return ApiUsageRow(*key, *(getattr(counts, name) for name in COUNTERS))


def _counts(row: ApiUsageRow) -> _Counts:
    counts = _Counts()
    for name, value in zip(COUNTERS, row.counts(), strict=True):
        setattr(counts, name, value)
    return counts
