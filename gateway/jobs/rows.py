"""A job as a database row, the same for every SQL backend (SQLite, PostgreSQL).

The task and the outcome are stored as JSON text (not PostgreSQL's ``jsonb``, which refuses
``\\u0000``, a character a portal's prompt may well contain); the other columns are what the
queue's statements select and order by.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.jobs.model import Job
from gateway.jobs.queue import JobFilter, QueueItemError
from gateway.metrics import END_TO_END_BUCKETS
from gateway.outcomes import Attempt, JobState, Outcome
from gateway.tasks import PROMPT_TYPES, Category, Task
from gateway.tenants.model import tenant_key


class Row(Protocol):
    """A row read by name: ``sqlite3.Row`` and ``asyncpg.Record`` both are."""

    def __getitem__(self, key: str) -> Any: ...


def storable(text: str, limit: int = 500) -> str:
    """Text any backend can store: cut to ``limit``; a lone surrogate (from an exception message
    quoting input) is escaped and a NUL (which PostgreSQL's text refuses) replaced, never fatal."""
    text = text[:limit]
    if text.isascii():
        return text.replace("\x00", "\\x00") if "\x00" in text else text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def task_json(job: Job) -> str:
    """The task as stored; a task that is not JSON fails this one job (:class:`QueueItemError`)."""
    try:
        return json.dumps(job.task.to_json())
    except (TypeError, ValueError) as exc:
        raise QueueItemError(f"this job cannot be stored: its task is not JSON: {exc}") from None


INSERT_COLUMNS = (
    "id",
    "idem_key",
    "engine",
    "category",
    "state",
    "task",
    "callback_url",
    "error_callback_url",
    "accepted_at",
    "deadline",
    "next_at",
    "lease_owner",
    "lease_until",
    "tenant",
    "portal",
)
"""A new job's columns, in the order of :func:`insert_values`."""


def insert_values(job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float, now: float) -> tuple[Any, ...]:
    """A new job's row (:data:`INSERT_COLUMNS`): stored already leased to ``lease_owner`` when given."""
    return (
        job.id,
        idempotency_key,
        job.engine,
        str(job.category),
        str(JobState.RUNNING if lease_owner else JobState.QUEUED),
        task_json(job),
        job.callback_url,
        job.error_callback_url,
        job.accepted_at,
        job.deadline,
        now,
        lease_owner,
        now + lease_seconds if lease_owner else None,
        job.tenant,
        job.portal,
    )


def outcome_json(outcome: Outcome) -> str:
    return json.dumps(outcome.to_json())


def job_from_row(row: Row, attempts: list[Attempt] | None = None) -> Job:
    """A job from its row; the task (engine, category, times) from its JSON, the columns are for SQL."""
    outcome = Outcome.from_json(json.loads(row["outcome"])) if row["outcome"] else None
    return _job(row, Task.from_json(json.loads(row["task"])), outcome, row["detail"], attempts)


def readable_job_from_row(row: Row, attempts: list[Attempt] | None = None) -> Job:
    """A job to list, show, report on or end: one whose stored task or outcome cannot be read (a
    bug, a hand edit, a newer gateway's fields) comes back as its columns describe it, with the
    reason first in ``detail``, so one bad row never breaks ``jobs list``, the dashboard or an
    uninstall. Claims keep :func:`job_from_row`: a worker must never run a task it cannot read."""
    reasons = []
    try:
        task = Task.from_json(json.loads(row["task"]))
    except Exception as exc:
        reasons.append(unreadable("job", exc))
        task = _task_from_columns(row)
    try:
        outcome = Outcome.from_json(json.loads(row["outcome"])) if row["outcome"] else None
    except Exception as exc:
        reasons.append(unreadable("outcome", exc))
        outcome = None
    detail = "; ".join(reasons + ([row["detail"]] if row["detail"] else []))
    return _job(row, task, outcome, detail, attempts)


def unreadable(part: str, exc: Exception) -> str:
    """Why a stored ``job`` (its task) or ``outcome`` cannot be read: a claim's reason for ending it
    ``dead``, and the first words of its detail wherever else it is read."""
    return storable(f"the stored {part} cannot be read: {type(exc).__name__}: {exc}")


def _task_from_columns(row: Row) -> Task:
    """What the columns say of a task whose JSON cannot be read; its prompt is empty."""
    try:
        category = Category(row["category"])
    except ValueError:
        category = Category.TEXT
    return Task(
        job_id=row["id"],
        engine=row["engine"],
        category=category,
        prompt=PROMPT_TYPES[category](""),
        accepted_at=row["accepted_at"],
        deadline=row["deadline"],
        portal=row["portal"] or "",
        tenant=tenant_key(row["tenant"]) if row["tenant"] else "",  # a task names its tenant by key; the column holds the member_id
    )


def _job(row: Row, task: Task, outcome: Outcome | None, detail: str, attempts: list[Attempt] | None) -> Job:
    return Job(
        task=task,
        callback_url=row["callback_url"],
        error_callback_url=row["error_callback_url"],
        state=JobState(row["state"]),
        outcome=outcome,
        delivery_attempts=row["delivery_attempts"],
        next_at=row["next_at"],
        finished_at=row["finished_at"],
        detail=detail,
        attempts=attempts or [],
        maybe_delivered=bool(row["maybe_delivered"]),
        internal_errors=row["internal_errors"],
        tenant=row["tenant"] or "",
        lease_until=row["lease_until"],
    )


def callback_host(url: str) -> str:
    """The host of a stored callback URL, lower-case ('' if it has none): the ``portal`` of a job
    stored before that column existed (PostgreSQL's migration 3 reads it with a regular expression)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def filter_where(job_filter: JobFilter, mark: Callable[[int], str]) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause of a :class:`JobFilter` (empty when it matches every job) and its values;
    ``mark(n)`` writes the backend's n-th placeholder (``?`` or ``$n``). Values never enter the SQL text."""
    f = job_filter
    conditions: list[str] = []
    values: list[Any] = []
    for sql, value in (
        ("state = {}", str(f.state) if f.state is not None else None),
        ("engine = {}", f.engine),
        ("category = {}", f.category),
        ("portal = {}", f.portal),
        ("tenant = {}", f.tenant),
        ("accepted_at >= {}", f.accepted_since),
        ("accepted_at < {}", f.accepted_until),
        ("id < {}", f.before_id),
    ):
        if value is not None:
            values.append(value)
            conditions.append(sql.format(mark(len(values))))
    return (f" WHERE {' AND '.join(conditions)}" if conditions else ""), values


def latency_bucket_sql(latency: str) -> str:
    """A SQL expression: the index of the first bound of :data:`~gateway.metrics.END_TO_END_BUCKETS`
    that ``latency`` (an expression, in seconds) does not exceed, ``len(bounds)`` past the last
    (Prometheus's ``le`` buckets). The bounds are the code's own numbers, written as literals."""
    cases = " ".join(f"WHEN {latency} <= {float(bound)!r} THEN {index}" for index, bound in enumerate(END_TO_END_BUCKETS))
    return f"CASE {cases} ELSE {len(END_TO_END_BUCKETS)} END"
