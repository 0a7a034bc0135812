"""Backoff: how long to wait before trying again, the one schedule every retry in the gateway uses.

Provider calls (:mod:`gateway.routing`), recording downloads, callback deliveries
(:mod:`gateway.delivery`), the worker's retries after an unexpected error, queue writes and
the portal's REST calls (:mod:`gateway.bitrix.rest`) all wait ``Backoff.delay(attempt)``.

The schedule is exponential with *equal jitter*: the ceiling for retry ``attempt`` (counted
from 0) is ``min(maximum, initial * 2**attempt)`` and the pause is drawn uniformly from
``[ceiling / 2, ceiling]``. Half of it is fixed, so a retry never comes back at once to an
upstream that just said "too many requests" (full jitter, ``[0, ceiling]``, sometimes
does); the random half spreads the retries of jobs that failed together, so they do not
return together.

Why not ``tenacity`` or ``stamina``: both wrap *one call* in a retry loop. Here the loops
are ours and differ: a provider call falls back to the next target and gives up at the
route's deadline; a delivery is rescheduled through the queue (the "attempt" is a counter
stored on the job, the pause a ``next_at`` written to SQLite), bounded by the job's ttl;
REST calls classify the portal's answers. What they share is the schedule and the rule
"never wait past the deadline", which is this module, with no dependency.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

MAX_DOUBLINGS = 60
"""Beyond this many doublings the ceiling is ``maximum`` anyway; the bound keeps ``2**attempt`` a float."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter (see the module docstring); ``rng`` returns a float in [0, 1)."""

    initial: float
    maximum: float = math.inf
    rng: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def ceiling(self, attempt: int) -> float:
        """The longest pause before retry ``attempt`` (0 for the first retry): ``min(maximum, initial * 2**attempt)``."""
        return min(self.maximum, self.initial * 2.0 ** min(max(attempt, 0), MAX_DOUBLINGS))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0 for the first retry), in ``[ceiling / 2, ceiling]``."""
        return self.ceiling(attempt) * (0.5 + self.rng() / 2)

    def next_at(self, attempt: int, deadline: float, *, now: float | None = None) -> float | None:
        """The Unix time to try again, or None when that would not be before ``deadline`` (a Unix time)."""
        at = (time.time() if now is None else now) + self.delay(attempt)
        return at if at < deadline else None

    async def sleep(self, attempt: int, deadline: float, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> bool:
        """Wait before retry ``attempt`` and return True; return False at once, without waiting,
        when the wait would reach ``deadline`` (a Unix time): the caller gives up now rather than later."""
        pause = self.delay(attempt)
        if time.time() + pause >= deadline:
            return False
        await sleep(pause)
        return True
