"""The job record: one accepted task, where its outcome goes, and how far it got.

The task is stored once; the columns the queue's SQL needs (engine, category, portal,
accepted_at, deadline) are read from it here (:class:`Job`'s properties), in one place. States, attempts
and outcomes are named in :mod:`gateway.outcomes` (a job's states are described there).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from gateway.outcomes import FINAL_STATES, PENDING_STATES, Attempt, JobError, JobState, Outcome
from gateway.tasks import Category, Task

__all__ = ["FINAL_STATES", "PENDING_STATES", "Attempt", "Job", "JobError", "JobState", "Outcome", "new_job_id"]


class _RandomHex:
    """Unguessable hex digits from ``os.urandom``, read 4 KiB at a time: one system call serves
    a thousand job ids instead of one each (a measurable share of a job's CPU under load)."""

    def __init__(self, chunk: int = 4096) -> None:
        self._chunk, self._buffer, self._at = chunk, b"", 0

    def take(self, nbytes: int) -> str:
        if self._at + nbytes > len(self._buffer):
            self._buffer, self._at = os.urandom(self._chunk), 0
        start, self._at = self._at, self._at + nbytes
        return self._buffer[start : self._at].hex()

    def reset(self) -> None:
        self._buffer, self._at = b"", 0


_random_hex = _RandomHex()
os.register_at_fork(after_in_child=_random_hex.reset)  # a forked child must not reuse the parent's bytes


def new_job_id() -> str:
    """Time-ordered and unguessable: 12 hex digits of milliseconds, 12 of randomness."""
    return f"{int(time.time() * 1000):012x}{_random_hex.take(6)}"


@dataclass
class Job:
    task: Task
    callback_url: str
    error_callback_url: str
    state: JobState = JobState.QUEUED
    outcome: Outcome | None = None
    delivery_attempts: int = 0
    next_at: float = 0.0
    finished_at: float | None = None
    detail: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    interrupted_delivery: bool = False
    """Claimed from a worker that died while delivering: a callback may have reached the portal."""
    maybe_delivered: bool = False
    """An earlier callback POST timed out or lost its connection after the body was sent:
    the portal may have taken it, so a later ``data:false`` means ``delivered_unconfirmed``."""
    internal_errors: int = 0
    """Unexpected errors so far while running or delivering this job (bounded, then ``dead``)."""
    tenant: str = ""
    """The installed portal's ``member_id`` for a request to an app engine (app mode); empty in webhook mode."""
    lease_until: float | None = None
    """Until when a worker holds the job, as read from storage (None: nobody holds it). The operator's
    actions are offered only for jobs no worker holds; the queue checks it again when it acts."""

    @property
    def id(self) -> str:
        return self.task.job_id

    @property
    def engine(self) -> str:
        return self.task.engine

    @property
    def category(self) -> Category:
        return self.task.category

    @property
    def portal(self) -> str:
        """The host name of the portal that sent the request, lower-case (the ``portal`` column)."""
        return self.task.portal.lower()

    @property
    def accepted_at(self) -> float:
        return self.task.accepted_at

    @property
    def deadline(self) -> float:
        """Unix time after which the portal no longer accepts a callback (the task's ttl from accept)."""
        return self.task.deadline
