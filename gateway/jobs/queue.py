"""The queue protocol every backend implements (SQLite embedded, PostgreSQL for many nodes).

Workers claim jobs with a lease. A worker renews the leases of the jobs it holds; a job
whose lease runs out (its worker died) can be claimed again. Every state change names
the lease owner, so a worker that lost its lease cannot overwrite another's progress.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.jobs.model import Job
from gateway.outcomes import FINAL_STATES, PENDING_STATES, Attempt, ErrorReason, JobError, JobState, Outcome

MAX_LIST_LIMIT = 500
"""The most jobs one :meth:`JobQueue.list` answers: older ones are a page further (``before_id``)."""


class QueueStoreError(Exception):
    """The queue database cannot be opened or written."""


class QueueItemError(QueueStoreError):
    """This one job cannot be stored (a value the database refuses); the queue itself works."""


class JobActionRefused(Exception):
    """An operator's action (cancel, re-deliver) does not apply to the job as it is now; the message
    says why, in words the operator can act on. Not a :class:`QueueStoreError`: the queue works."""

    def __init__(self, job_id: str, action: str, reason: str) -> None:
        shown = job_id if plausible_job_id(job_id) else ascii(job_id[:64])  # printable wherever the message goes
        super().__init__(f"cannot {action} job {shown}: {reason}")
        self.job_id, self.action, self.reason = job_id, action, reason


Action = Literal["cancel", "redeliver"]
ACTIONS: tuple[Action, ...] = ("cancel", "redeliver")
CANCELLED = Outcome(error=JobError("cancelled by the gateway's operator", "cancelled", ErrorReason.CANCELLED))
"""The outcome of a job the operator cancelled before it ran: delivered to its errorCallbackUrl."""
NO_SUCH_JOB = "no such job: it was never accepted here, or it was deleted after queue.retention_days"
"""Why an action on a job id the queue does not hold is refused."""


def plausible_job_id(job_id: str) -> bool:
    """Could this be a job id (printable ASCII, short)? Anything else (a NUL, a lone surrogate from a
    URL or a terminal) is no job on either backend, never a database error."""
    return 0 < len(job_id) <= 64 and job_id.isascii() and job_id.isprintable()


def action_refusal(action: Action, state: JobState | None, *, has_outcome: bool, lease_until: float | None, deadline: float, now: float) -> str | None:
    """Why ``action`` does not apply to a job in this condition (None: it applies); ``state`` None: no such job.

    One rule for both backends (each applies it inside the transaction that acts) and for the
    dashboard's buttons (:func:`gateway.jobs.reports.allowed_actions`)."""
    if state is None:
        return NO_SUCH_JOB
    held = lease_until is not None and lease_until > now
    if action == "cancel":
        if state in FINAL_STATES:
            return f"it has already ended ({state}): there is nothing to cancel"
        if held and state is JobState.DELIVERING:
            return "a worker is delivering its outcome right now: cancel it while it waits for a delivery retry"
        if held:
            return "a worker is running it: cancel it while it is queued or waiting for a delivery retry"
        return None
    if state in PENDING_STATES:
        return f"it is still {state}: the gateway delivers it by itself; re-delivery is for jobs that ended dead"
    if state is not JobState.DEAD:
        return f"it ended {state}, not dead: only a dead job's outcome can be delivered again"
    if not has_outcome:
        return "nothing to deliver: it has no stored outcome (it ended before its task produced one)"
    if deadline <= now:
        return "its deadline passed: the portal no longer accepts a callback for it"
    return None


@dataclass(frozen=True)
class JobFilter:
    """Which jobs :meth:`JobQueue.list` answers, newest first. Every field left None matches any job;
    an empty string counts as None (a form's blank field)."""

    state: JobState | None = None
    engine: str | None = None
    category: str | None = None
    portal: str | None = None
    """The portal's host name, any case."""
    tenant: str | None = None
    """An installed portal's ``member_id`` (app mode)."""
    accepted_since: float | None = None
    """Unix time: jobs accepted at or after it."""
    accepted_until: float | None = None
    """Unix time: jobs accepted before it."""
    before_id: str | None = None
    """Only jobs older than this one (job ids are time-ordered): the next page after a page that ended with it."""
    limit: int = 50
    """Clamped to 1..:data:`MAX_LIST_LIMIT`."""

    def __post_init__(self) -> None:
        """Blanks to None; a value with characters no stored job has (a NUL, a lone surrogate: neither
        backend could even compare it) is a ValueError naming the filter, for a 400 or a usage error."""
        for name in ("engine", "category", "portal", "tenant", "before_id"):
            value = getattr(self, name)
            if value == "":
                object.__setattr__(self, name, None)
            elif value is not None and not value.isprintable():
                raise ValueError(f"the {name} filter {value[:40]!a} holds characters no job has: control characters or lone surrogates")
        if self.portal is not None:
            object.__setattr__(self, "portal", self.portal.lower())
        object.__setattr__(self, "limit", max(1, min(MAX_LIST_LIMIT, int(self.limit))))


@dataclass(frozen=True)
class AcceptedCount:
    """Jobs accepted in one minute for one engine (``minute``: Unix time of its start, a multiple of 60)."""

    minute: int
    engine: str
    category: str
    count: int


@dataclass(frozen=True)
class FinishedCount:
    """Jobs that became final in one minute, per engine, final state and end-to-end latency bucket."""

    minute: int
    engine: str
    category: str
    state: JobState
    bucket: int
    """Index into :data:`gateway.metrics.END_TO_END_BUCKETS` of the first bound >= the latency
    (``finished_at - accepted_at``); ``len(END_TO_END_BUCKETS)`` for the ``+Inf`` bucket."""
    count: int


@dataclass(frozen=True)
class Activity:
    """What the queue did since ``since``, counted by the database (no job is loaded): what the
    dashboard's overview and ``gateway jobs stats`` read (:mod:`gateway.jobs.reports`)."""

    since: float
    accepted: tuple[AcceptedCount, ...] = ()
    finished: tuple[FinishedCount, ...] = ()
    pending: Mapping[JobState, int] = field(default_factory=dict)
    """Jobs not yet final per state (queued, running, delivering), all of them whatever their age."""


@dataclass(frozen=True)
class PortalUsageCount:
    """Portal jobs that ended on one UTC day, of one engine and one portal, added up by the database from
    their stored outcomes (:meth:`JobQueue.usage_totals`): ``gateway usage`` and the dashboard read these,
    never the jobs themselves (a month of jobs, transcripts included, does not fit in memory)."""

    day: str
    """``YYYY-MM-DD``: the UTC day of ``finished_at``."""
    engine: str
    portal: str
    """The portal's host name, lower-case (the ``portal`` column)."""
    jobs: int
    errors: int
    """Jobs that ended without a result (no outcome, an error outcome, or an empty result)."""
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    audio_seconds: float
    """The sum of the results' ``duration`` (audio and call transcripts)."""


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

    async def list(self, filter: JobFilter | None = None, *, state: JobState | None = None, limit: int = 50) -> builtins.list[Job]:
        """Jobs matching ``filter``, newest first; without one, ``state`` and ``limit`` make it."""
        ...

    async def activity(self, since: float) -> Activity:
        """Counts of jobs accepted and finished since ``since`` per minute and engine (finished ones per
        final state and latency bucket too), and the pending jobs per state: aggregate SQL only."""
        ...

    async def cancel(self, job_id: str, by: str) -> Job:
        """The operator stops a job no worker holds, in one transaction (a claim cannot slip in between).

        A job not yet run (``queued``, or ``running`` with no live lease: waiting to run again) gets an
        error outcome (``JobError("cancelled by the gateway's operator", "cancelled", "cancelled")``) and
        is due for delivery at once: a worker delivers it to ``errorCallbackUrl`` (the portal's user sees
        an error, nothing waits forever) and it ends ``failed``, firing ``task_failed`` as usual. A job
        waiting for a delivery retry ends ``dead`` at once ("delivery cancelled by the operator (by)");
        no worker holds it, so no hook fires for it. Either way an ``operator`` attempt records who.
        Raises :class:`JobActionRefused` (see :func:`action_refusal`) otherwise."""
        ...

    async def redeliver(self, job_id: str, by: str) -> Job:
        """The operator has a ``dead`` job's stored outcome delivered again, while its deadline is ahead:
        it becomes ``delivering``, due at once, ``finished_at`` cleared, its internal errors forgotten,
        ``maybe_delivered`` kept; an ``operator`` attempt records who. A worker then delivers it and it
        ends in a final state again, whose hooks fire again (once per final state reached). Raises
        :class:`JobActionRefused` otherwise."""
        ...

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
        """Final jobs that ended at or after ``since`` (of one tenant's ``member_id``, if given), loaded whole,
        at most ``limit``: the jobs :meth:`usage_totals` must add up to (its contract test). To count, use that."""
        ...

    async def usage_totals(self, since: float, *, tenant: str | None = None) -> builtins.list[PortalUsageCount]:
        """Final jobs that ended at or after ``since`` (of one tenant's ``member_id``, if given), added up per
        UTC day, engine and portal by one aggregate statement: what ``gateway usage`` and the dashboard show.

        The numbers are those of :func:`gateway.usage.report.portal_usage` on the same jobs: ``result.usage``'s
        ``prompt_tokens`` and ``completion_tokens`` (truncated to integers), its ``cost_usd`` and the result's
        ``duration``, each counted where it is a JSON number; a job whose outcome has no result (or an empty one) is an error."""
        ...

    async def depth(self) -> int:
        """Jobs not yet final."""
        ...
