"""What happens to a job, named once: its states, the kinds and outcomes of its attempts, and
the records of what running and delivering it produced.

The queue stores these names in SQL, the metrics use them as label values and the logs
print them; each is a :class:`enum.StrEnum`, so it is its own string value wherever it goes.
This module sits below routing, delivery, execution and the queue, which all speak of outcomes.

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
from dataclasses import dataclass
from typing import Any


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DELIVERED_UNCONFIRMED = "delivered_unconfirmed"
    FAILED = "failed"
    GONE = "gone"
    EXPIRED = "expired"
    DEAD = "dead"


PENDING_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING)
FINAL_STATES = frozenset({JobState.DELIVERED, JobState.DELIVERED_UNCONFIRMED, JobState.FAILED, JobState.GONE, JobState.EXPIRED, JobState.DEAD})


class AttemptKind(enum.StrEnum):
    """What an :class:`Attempt` was."""

    PROVIDER = "provider"
    """A call to a route target (``provider/model``)."""
    DOWNLOAD = "download"
    """Fetching the recording of an audio or call task."""
    CALLBACK = "callback"
    """A callback POST to the portal."""
    INTERNAL = "internal"
    """An unexpected error in the gateway while running or delivering the job."""
    OPERATOR = "operator"
    """An operator's action on the job (cancel, re-deliver), from the CLI or the dashboard; ``target`` names the action."""


class AttemptOutcome(enum.StrEnum):
    """How a provider call, a download or an internal step ended (callbacks end in a :class:`DeliveryOutcome`)."""

    OK = "ok"
    RETRYABLE = "retryable"
    """Failed; the same call may succeed later."""
    FINAL = "final"
    """Failed; trying the same call again will not help."""
    SKIPPED = "skipped"
    """Not tried: the target cools down after repeated failures."""
    ERROR = "error"
    """An unexpected error in the gateway."""


class DeliveryOutcome(enum.StrEnum):
    """How one callback POST ended."""

    DELIVERED = "delivered"
    """The portal took it (``data:true``)."""
    GONE = "gone"
    """The portal does not know the job any more (``data:false``)."""
    RETRY = "retry"
    """A transient failure (timeout, 5xx, 429, an answer that is not JSON): try again later."""
    REJECTED = "rejected"
    """The portal refuses it for good (4xx, a redirect, an error status)."""
    REFUSED = "refused"
    """Never sent: the outbound policy refuses the URL, or the URL or body cannot be sent."""
    ERROR = "error"
    """An unexpected failure in the gateway."""


class ErrorReason(enum.StrEnum):
    """Why a task produced no result (:attr:`JobError.reason`); delivery failures use the final state's name."""

    PROVIDER_ERROR = "provider_error"
    REFUSED = "refused"
    """A ``prepare_task`` hook refused the task."""
    DOWNLOAD = "download"
    """The recording could not be downloaded or used."""
    INTERNAL = "internal"
    LIMIT = "limit"
    """The installed portal is over one of its limits (app mode: ``app.limits``)."""
    CANCELLED = "cancelled"
    """The gateway's operator cancelled the job before it ran (``gateway jobs cancel``, the dashboard)."""


@dataclass(frozen=True)
class JobError:
    """Why a task produced no result, as sent to the portal and to ``task_failed`` hooks."""

    message: str
    code: int | str
    reason: str = ErrorReason.PROVIDER_ERROR
    """An :class:`ErrorReason`, or for delivery failures the final state (gone, expired, dead)."""

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code, "reason": str(self.reason)}


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
    """One provider call, download, callback POST or internal error, recorded for ``gateway jobs show``."""

    kind: AttemptKind
    target: str
    """provider/model, the recording's or callback's host, or for ``internal`` the stage (execute, deliver)."""
    started_at: float
    duration: float
    outcome: AttemptOutcome | DeliveryOutcome
    detail: str = ""


def stored_attempt(kind: str, target: str, started_at: float, duration: float, outcome: str, detail: str) -> Attempt:
    """An attempt read back from storage, its names turned back into their enums."""
    attempt_kind = AttemptKind(kind)
    ended = DeliveryOutcome(outcome) if attempt_kind is AttemptKind.CALLBACK else AttemptOutcome(outcome)
    return Attempt(attempt_kind, target, started_at, duration, ended, detail)
