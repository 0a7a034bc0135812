"""The queue protocol every backend implements (SQLite embedded, PostgreSQL for many nodes).

Workers claim jobs with a lease. A worker renews the leases of the jobs it holds; a job
whose lease runs out (its worker died) can be claimed again. Every state change names
the lease owner, so a worker that lost its lease cannot overwrite another's progress.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Protocol

from gateway.jobs.model import Job
from gateway.outcomes import Attempt, JobState, Outcome


class QueueStoreError(Exception):
    """The queue database cannot be opened or written."""


class QueueItemError(QueueStoreError):
    """This one job cannot be stored (a value the database refuses); the queue itself works."""


class JobQueue(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called when another process may have queued a job, so that a worker
        claims at once instead of at its next poll (PostgreSQL: ``LISTEN/NOTIFY``). A backend
        without such a signal (SQLite) never calls it: its workers poll."""
        ...

    async def enqueue(self, job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float) -> tuple[Job, bool]:
        """Store a job durably before returning; ``(existing_job, False)`` if the key is known.

        With ``lease_owner`` the job is stored already claimed by that worker, which saves
        the claim round trip when the accepting process has a free worker slot.
        """
        ...

    async def claim(self, owner: str, limit: int, lease_seconds: float, *, delivery_limit: int | None = None) -> list[Job]:
        """Lease up to ``limit`` jobs that are due: new, resumed after a crash, or due for delivery.

        With ``delivery_limit``, ``limit`` counts the jobs to run and ``delivery_limit`` the jobs
        whose outcome waits for delivery: the two have separate pools in the worker. A stored
        job that cannot be read is marked ``dead`` (with the reason) instead of blocking the claim."""
        ...

    async def renew(self, owner: str, job_ids: list[str], lease_seconds: float) -> None: ...

    async def release(self, owner: str, job_ids: list[str], *, maybe_delivered: frozenset[str] | set[str] = frozenset()) -> None:
        """Give leases back at once (graceful shutdown), so the jobs resume without waiting.

        ``maybe_delivered``: the jobs among them whose callback POST was cut off (it may have
        reached the portal): remembered, as by :meth:`reschedule`."""
        ...

    async def store_outcome(self, job_id: str, owner: str, outcome: Outcome, attempts: list[Attempt]) -> bool:
        """Persist the task's outcome; the job moves to ``delivering``. False if the lease was lost."""
        ...

    async def reschedule(self, job_id: str, owner: str, next_at: float, attempt: Attempt, *, maybe_delivered: bool = False) -> bool:
        """A delivery attempt failed and may be retried at ``next_at``; the lease is released.

        ``maybe_delivered``: the portal may have taken this attempt (it timed out after the body
        was sent); remembered on the job, so a later ``data:false`` is read as delivered."""
        ...

    async def retry_later(self, job_id: str, owner: str, next_at: float, attempt: Attempt, *, maybe_delivered: bool = False) -> bool:
        """An unexpected error while running or delivering: record it (``Job.internal_errors``
        counts them), release the lease, run the job again at ``next_at``. ``maybe_delivered``
        as for :meth:`reschedule` (the error came after a POST the portal may have taken)."""
        ...

    async def defer(self, job_id: str, owner: str, next_at: float, *, maybe_delivered: bool = False) -> bool:
        """Put a delivering job back until ``next_at`` without an attempt (its portal is busy).
        ``maybe_delivered`` keeps a crash-interrupted job's mark, which releasing the lease would lose."""
        ...

    async def finish(self, job_id: str, owner: str, state: JobState, detail: str, attempts: list[Attempt]) -> bool:
        """Record the final state; True only for the one call that made the job final."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def list(self, *, state: JobState | None = None, limit: int = 50) -> list[Job]: ...

    async def prune(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` final jobs (and their attempts) that ended before that time."""
        ...

    async def end_tenant_jobs(self, tenant: str, detail: str, *, delete: bool) -> builtins.list[Job]:
        """An installed portal removed the app: its jobs that no worker holds end ``dead`` with
        ``detail`` (jobs being run finish on their own: the portal refuses their callbacks); with
        ``delete`` every job of the tenant is deleted, attempts included. Returns the jobs ended or
        deleted (their outcomes name the hosted files to delete)."""
        ...

    async def finished_since(self, since: float, *, tenant: str | None = None, limit: int = 100000) -> builtins.list[Job]:
        """Final jobs that ended at or after ``since`` (of one tenant's ``member_id``, if given): what
        ``gateway usage`` adds up."""
        ...

    async def depth(self) -> int:
        """Jobs not yet final."""
        ...
