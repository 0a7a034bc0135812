"""What one installed portal may use: requests per minute, jobs at once, audio minutes per day.

Counted in this process (each node enforces the limits on the jobs it runs, so N nodes let a
tenant use up to N times a limit; the figures are a guard against one portal starving the
others, not billing). A task over a limit ends at once with an error callback that says which
limit and when it frees up, and ``gateway_tenant_limited_total{tenant,limit}`` counts it.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Mapping

from gateway.config import TenantLimits

DAY = 86400.0


LIMIT_KEYS = ("requests_per_minute", "concurrent_jobs", "audio_minutes_per_day")


def with_overrides(defaults: TenantLimits, overrides: Mapping[str, float]) -> TenantLimits:
    """A tenant's limits: its own (``gateway tenants limits``; 0: none) over ``app.limits``."""

    def pick(key: str, default: float | None) -> float | None:
        if key not in overrides:
            return default
        return overrides[key] or None

    rpm, concurrent = pick("requests_per_minute", defaults.requests_per_minute), pick("concurrent_jobs", defaults.concurrent_jobs)
    return TenantLimits(
        requests_per_minute=int(rpm) if rpm is not None else None,
        concurrent_jobs=int(concurrent) if concurrent is not None else None,
        audio_minutes_per_day=pick("audio_minutes_per_day", defaults.audio_minutes_per_day),
    )


class TenantLimiter:
    def __init__(self, limits: TenantLimits) -> None:
        self.defaults = limits
        self._own: dict[str, TenantLimits] = {}
        """Tenants with limits of their own, by tenant id (kept up to date by the tenant service)."""
        self._starts: dict[str, deque[float]] = defaultdict(deque)
        self._running: dict[str, int] = defaultdict(int)
        self._audio: dict[str, tuple[int, float]] = {}
        """Per tenant: (UTC day number, seconds of audio transcribed that day)."""

    def admit(self, tenant: str, *, audio: bool = False, now: float | None = None) -> tuple[str, str] | None:
        """None when the task may run (it then counts until :meth:`release`), else ``(limit, message)``."""
        now = time.time() if now is None else now
        limits = self.limits_for(tenant)
        if limits.requests_per_minute is not None:
            starts = self._starts[tenant]
            while starts and starts[0] <= now - 60:
                starts.popleft()
            if len(starts) >= limits.requests_per_minute:
                wait = 60 - (now - starts[0])
                return "requests_per_minute", f"this portal's limit of {limits.requests_per_minute} requests per minute is reached; try again in {wait:.0f} s"
        if limits.concurrent_jobs is not None and self._running[tenant] >= limits.concurrent_jobs:
            return "concurrent_jobs", f"this portal already has {limits.concurrent_jobs} requests in progress (its limit); try again when one is done"
        if audio and limits.audio_minutes_per_day is not None and self.audio_seconds(tenant, now) >= limits.audio_minutes_per_day * 60:
            return "audio_minutes_per_day", f"this portal's {limits.audio_minutes_per_day:g} minutes of audio for today (UTC) are used up"
        if limits.requests_per_minute is not None:
            self._starts[tenant].append(now)
        self._running[tenant] += 1
        return None

    def limits_for(self, tenant: str) -> TenantLimits:
        return self._own.get(tenant, self.defaults)

    def set_overrides(self, overrides: Mapping[str, Mapping[str, float]]) -> None:
        """Every tenant's own limits (tenant id → keys of :data:`LIMIT_KEYS`); the others get the defaults."""
        self._own = {tenant: with_overrides(self.defaults, own) for tenant, own in overrides.items() if own}

    def release(self, tenant: str) -> None:
        self._running[tenant] = max(0, self._running[tenant] - 1)

    def audio_seconds(self, tenant: str, now: float | None = None) -> float:
        day = int((time.time() if now is None else now) // DAY)
        recorded_day, seconds = self._audio.get(tenant, (day, 0.0))
        return seconds if recorded_day == day else 0.0

    def record_audio(self, tenant: str, seconds: float, now: float | None = None) -> None:
        day = int((time.time() if now is None else now) // DAY)
        self._audio[tenant] = (day, self.audio_seconds(tenant, now) + max(0.0, seconds))
