"""The queue protocol every backend implements (SQLite embedded; others later).

Workers claim jobs with a lease. A worker renews the leases of the jobs it holds; a job
whose lease runs out (its worker died) can be claimed again. Every state change names
the lease owner, so a worker that lost its lease cannot overwrite another's progress.
"""

from __future__ import annotations

from typing import Protocol

from gateway.jobs.model import Attempt, Job, JobState, Outcome


class JobQueue(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float) -> tuple[Job, bool]:
        """Store a job durably before returning; ``(existing_job, False)`` if the key is known.

        With ``lease_owner`` the job is stored already claimed by that worker, which saves
        the claim round trip when the accepting process has a free worker slot.
        """
        ...

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        """Lease up to ``limit`` jobs that are due: new, resumed after a crash, or due for delivery."""
        ...

    async def renew(self, owner: str, job_ids: list[str], lease_seconds: float) -> None: ...

    async def release(self, owner: str, job_ids: list[str]) -> None:
        """Give leases back at once (graceful shutdown), so the jobs resume without waiting."""
        ...

    async def store_outcome(self, job_id: str, owner: str, outcome: Outcome, attempts: list[Attempt]) -> bool:
        """Persist the task's outcome; the job moves to ``delivering``. False if the lease was lost."""
        ...

    async def reschedule(self, job_id: str, owner: str, next_at: float, attempt: Attempt) -> bool:
        """A delivery attempt failed and may be retried at ``next_at``; the lease is released."""
        ...

    async def finish(self, job_id: str, owner: str, state: JobState, detail: str, attempts: list[Attempt]) -> bool:
        """Record the final state; True only for the one call that made the job final."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def list(self, *, state: JobState | None = None, limit: int = 50) -> list[Job]: ...

    async def prune(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` final jobs (and their attempts) that ended before that time."""
        ...

    async def depth(self) -> int:
        """Jobs not yet final."""
        ...
