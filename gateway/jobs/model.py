"""The job record and its states.

A job moves ``queued -> running -> delivering`` and ends in exactly one final state:

- ``delivered`` -- the result reached ``callbackUrl`` (``data:true``);
- ``failed``    -- no result; the error reached ``errorCallbackUrl``;
- ``delivered_unconfirmed`` -- an earlier callback POST may have reached the portal (it
  timed out, the connection broke after the body was sent, or a crash interrupted it),
  and a later one got ``data:false``: the portal most likely took the earlier one, but
  never said so. Hooks treat it as ``delivered`` (``task_succeeded`` for a result,
  ``task_failed`` with the task's own error for a failure);
- ``gone``      -- the portal answered ``data:false``: job unknown, consumed or expired there;
- ``expired``   -- the ``ttl`` passed before the outcome could be delivered;
- ``dead``      -- the outcome can never be delivered (URL refused, portal rejects it), or
  running or delivering it failed unexpectedly too often (the reason is in ``detail``).
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.tasks import Task


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DELIVERED_UNCONFIRMED = "delivered_unconfirmed"
    FAILED = "failed"
    GONE = "gone"
    EXPIRED = "expired"
    DEAD = "dead"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DELIVERED, JobState.DELIVERED_UNCONFIRMED, JobState.FAILED, JobState.GONE, JobState.EXPIRED, JobState.DEAD})


def new_job_id() -> str:
    """Time-ordered and unguessable: 12 hex digits of milliseconds, 12 of randomness."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class JobError:
    """Why a task produced no result, as sent to the portal and to ``task_failed`` hooks."""

    message: str
    code: int | str
    reason: str = "provider_error"
    """provider_error, refused, internal, or for delivery failures: gone, expired, dead."""

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, "reason": self.reason}


@dataclass(frozen=True)
class Outcome:
    """What running the task produced: stored before delivery starts, never recomputed."""

    result: dict[str, Any] | None = None
    """The adapter's typed result as JSON, when the task succeeded."""
    error: JobError | None = None
    provider: str | None = None
    """The route target that produced the result, ``provider/model``."""

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "error": self.error.to_json() if self.error else None, "provider": self.provider}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        error = data.get("error")
        return cls(result=data.get("result"), error=JobError(**error) if error else None, provider=data.get("provider"))


@dataclass(frozen=True)
class Attempt:
    """One provider call or one callback POST, recorded for ``gateway jobs show``."""

    kind: str  # "provider", "download", "callback" or "internal" (an unexpected error in the gateway)
    target: str  # provider/model, the callback host, or for "internal" the stage (execute, deliver)
    started_at: float
    duration: float
    outcome: str  # ok, retryable, final, delivered, gone, retry, rejected, refused, error
    detail: str = ""


@dataclass
class Job:
    id: str
    engine: str
    category: str
    state: JobState
    task: Task
    callback_url: str
    error_callback_url: str
    accepted_at: float
    deadline: float
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
