"""Routes: an engine's ordered targets, tried with retries, fallback and cooldown, within a deadline.

For each target in order: call it; on a retryable error wait (:class:`gateway.backoff.Backoff`:
exponential, equal jitter) and call again, up to ``retries`` more times; on a final error, or when the
retries are spent, fall back to the next target. A target that fails
``cooldown_failures`` times in a row (across jobs) is skipped for ``cooldown_seconds``.
Nothing starts after the route deadline, which keeps a margin before the job's ttl so
that the error callback still reaches the portal in time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.adapters import AdapterError
from gateway.backoff import Backoff
from gateway.config import RouteTarget, RoutingSettings
from gateway.outcomes import Attempt, AttemptKind, AttemptOutcome, JobError

Call = Callable[[RouteTarget, float], Awaitable[Any]]


class CircuitBreaker:
    """Consecutive failures per target; a target over the threshold cools down for a while."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown, self.clock = failures, cooldown, clock
        self._count: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def available_at(self, key: str) -> float:
        """When the target may be tried again (a past time if it may be tried now)."""
        return self._open_until.get(key, 0.0)

    def success(self, key: str) -> None:
        self._count.pop(key, None)
        self._open_until.pop(key, None)

    def failure(self, key: str) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        if self._count[key] >= self.failures:
            self._open_until[key] = self.clock() + self.cooldown


@dataclass
class RouteResult:
    value: Any = None
    target: RouteTarget | None = None
    error: JobError | None = None
    attempts: list[Attempt] = field(default_factory=list)


class Router:
    def __init__(
        self, settings: RoutingSettings, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker(settings.cooldown_failures, settings.cooldown_seconds)
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max, rng)
        """The pause between retries of one target (the worker's recording downloads use it too)."""
        self._sleep = sleep

    def route_deadline(self, job_deadline: float, ttl: float) -> float:
        return job_deadline - min(self.settings.deadline_margin, ttl / 4)

    async def run(self, targets: Sequence[RouteTarget], call: Call, deadline: float) -> RouteResult:
        """Try the targets until one answers; ``deadline`` is a Unix time."""
        outcome = RouteResult()
        last: AdapterError | None = None
        await self._wait_if_all_cooling(targets, deadline)
        now = time.monotonic()
        cooling = {t.label for t in targets if self.breaker.available_at(t.label) > now}
        if len(cooling) == len(targets):
            cooling = set()  # every target is cooling: probe them rather than fail unheard
        for target in targets:
            key = target.label
            if key in cooling:
                outcome.attempts.append(Attempt(AttemptKind.PROVIDER, key, time.time(), 0.0, AttemptOutcome.SKIPPED, "cooling down after repeated failures"))
                continue
            for attempt in range(self.settings.retries + 1):
                remaining = deadline - time.time()
                if remaining <= 0:
                    return self._give_up(outcome, last, deadline_passed=True)
                started = time.time()
                try:
                    outcome.value = await call(target, remaining)
                except AdapterError as exc:
                    last = exc
                    kind = AttemptOutcome.RETRYABLE if exc.retryable else AttemptOutcome.FINAL
                    outcome.attempts.append(Attempt(AttemptKind.PROVIDER, key, started, time.time() - started, kind, exc.message[:500]))
                    if not exc.retryable:
                        break
                    self.breaker.failure(key)
                    if attempt == self.settings.retries:
                        break
                    if not await self.backoff.sleep(attempt, deadline, sleep=self._sleep):
                        return self._give_up(outcome, last, deadline_passed=True)
                    continue
                outcome.attempts.append(Attempt(AttemptKind.PROVIDER, key, started, time.time() - started, AttemptOutcome.OK))
                outcome.target = target
                self.breaker.success(key)
                return outcome
        return self._give_up(outcome, last, deadline_passed=False)

    async def _wait_if_all_cooling(self, targets: Sequence[RouteTarget], deadline: float) -> None:
        """When every target cools down, wait for the first to reopen rather than fail at once."""
        now = time.monotonic()
        reopen = min(self.breaker.available_at(t.label) for t in targets)
        wait = reopen - now
        if wait > 0 and time.time() + wait < deadline:
            await self._sleep(wait)

    @staticmethod
    def _give_up(outcome: RouteResult, last: AdapterError | None, *, deadline_passed: bool) -> RouteResult:
        if last is None:
            outcome.error = JobError("no route target could be tried before the deadline", 504)
        elif not last.retryable and last.status in (400, 413, 415, 422):
            # The provider rejected the request itself (too long, filtered): "Request has failed".
            outcome.error = JobError(f"provider rejected the request: {last.message}", last.status)
        elif deadline_passed:
            outcome.error = JobError(f"no answer before the deadline; last error: {last.message}", 504)
        else:
            outcome.error = JobError(f"every route target failed; last error: {last.message}", 503 if last.retryable else 502)
        return outcome
