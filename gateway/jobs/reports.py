"""What operators read about jobs, computed once for ``gateway jobs`` and the admin dashboard:
a job's summary, its result in one line, per-minute and per-engine counts, latency quantiles,
the ``--since`` durations, and which operator actions a job allows.

Pure functions of what the queue answered (:class:`~gateway.jobs.queue.Activity`, jobs): no I/O,
so that the CLI and the dashboard cannot disagree, and every number is testable without a server.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.jobs.model import Job
from gateway.jobs.queue import ACTIONS, Activity, action_refusal
from gateway.metrics import END_TO_END_BUCKETS
from gateway.outcomes import JobState

OUTCOME_GROUPS: dict[str, frozenset[JobState]] = {
    "succeeded": frozenset({JobState.DELIVERED, JobState.DELIVERED_UNCONFIRMED}),
    "failed": frozenset({JobState.FAILED, JobState.GONE, JobState.DEAD}),
    "expired": frozenset({JobState.EXPIRED}),
}
"""The final states as the overview counts them: the portal's user got the result; got an error or
nothing; the ttl ran out first."""
GROUP_OF: dict[JobState, str] = {state: group for group, states in OUTCOME_GROUPS.items() for state in states}
SINCE_FORMS = "a number of minutes, hours or days (15m, 2h, 1d), or 'all'"
_SINCE_RE = re.compile(r"([0-9]{1,6})([mhd])", re.ASCII)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}


def iso_time(timestamp: float | None) -> str:
    """A Unix time as UTC ISO 8601 to the millisecond; ``-`` for none."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_summary(job: Job) -> dict[str, Any]:
    """A job as ``gateway jobs list --json`` prints it (no callback URL: it carries the portal's secret hash)."""
    outcome = job.outcome
    summary: dict[str, Any] = {
        "id": job.id,
        "engine": job.engine,
        "category": job.category,
        "state": job.state.value,
        "portal": job.task.portal,
        "accepted_at": iso_time(job.accepted_at),
        "deadline": iso_time(job.deadline),
        "finished_at": iso_time(job.finished_at),
        "delivery_attempts": job.delivery_attempts,
        "detail": job.detail,
    }
    if job.finished_at:
        summary["seconds_to_final"] = round(job.finished_at - job.accepted_at, 3)
    if outcome is not None:
        summary["provider"] = outcome.provider
        if outcome.result is not None:
            summary["result"] = {"kind": outcome.result.get("kind"), "chars": len(outcome.result.get("text") or ""), "usage": outcome.result.get("usage")}
        if outcome.error is not None:
            summary["error"] = outcome.error.to_json()
    return summary


def describe_result(result: dict[str, Any]) -> str:
    """One line for a stored result: its kind, its size and what it consumed (``jobs show``, a job's page)."""
    kind = result.get("kind") or "result"
    if kind == "images":
        size = f"{len(result.get('urls') or [])} image(s)"
    else:
        size = f"{len(result.get('text') or '')} characters"
        if result.get("language"):
            size += f", language {result['language']}"
        if result.get("duration"):
            size += f", {result['duration']:.1f} s of audio"
    usage = result.get("usage") or {}
    spent = [
        f"{usage[key]} {label} tokens"
        for key, label in (("prompt_tokens", "prompt"), ("completion_tokens", "completion"), ("total_tokens", "total"))
        if usage.get(key) is not None
    ]
    if usage.get("cost_usd") is not None:
        spent.append(f"${usage['cost_usd']:.6f}")
    return f"{kind}, {size}" + (f"; {', '.join(spent)}" if spent else "")


def allowed_actions(job: Job, now: float) -> set[str]:
    """The operator actions (``cancel``, ``redeliver``) that apply to the job as read: where the
    dashboard shows a button. The queue checks again, atomically, when the action is asked for."""
    return {
        action
        for action in ACTIONS
        if action_refusal(action, job.state, has_outcome=job.outcome is not None, lease_until=job.lease_until, deadline=job.deadline, now=now) is None
    }


def parse_since(text: str) -> float | None:
    """``15m``, ``2h``, ``1d`` -> seconds; ``all`` or blank -> None (no limit). Anything else is a
    ValueError that names the accepted forms."""
    value = text.strip().lower()
    if value in ("", "all"):
        return None
    found = _SINCE_RE.fullmatch(value)
    if found is None or int(found.group(1)) == 0:
        raise ValueError(f"{text[:40]!r} is not a time span: use {SINCE_FORMS}")
    return float(int(found.group(1)) * _UNIT_SECONDS[found.group(2)])


def quantile(q: float, bucket_counts: Sequence[int], bounds: Sequence[float] = END_TO_END_BUCKETS) -> float | None:
    """The ``q`` quantile of a histogram as Prometheus's ``histogram_quantile`` estimates it.

    ``bucket_counts`` are per bucket (not cumulative), one per bound plus the ``+Inf`` bucket last.
    The value is interpolated linearly inside the bucket the rank falls in, the first bucket starting
    at 0; a rank in the ``+Inf`` bucket answers the highest finite bound. Empty buckets are passed
    over, so ``q = 0`` answers the lower edge of the first bucket holding anything (Prometheus: NaN).
    None when the histogram is empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} is not within 0..1")
    if len(bucket_counts) != len(bounds) + 1:
        raise ValueError(f"{len(bucket_counts)} bucket counts for {len(bounds)} bounds: expected {len(bounds) + 1} (the last for +Inf)")
    total = sum(bucket_counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(bucket_counts):
        if count > 0 and below + count >= rank:
            if index == len(bounds):
                return float(bounds[-1])
            start = float(bounds[index - 1]) if index > 0 else 0.0
            end = float(bounds[index])
            value = start + (end - start) * (rank - below) / count
            return min(end, max(start, value))  # rounding must not leave the bucket (monotone in q)
        below += count
    return float(bounds[-1])  # not reached: the last non-empty bucket holds rank <= total


@dataclass(frozen=True)
class MinutePoint:
    """One minute of the overview's chart: jobs accepted in it, and jobs that became final in it by outcome group."""

    minute: int
    """Unix time of the minute's start."""
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0


def minute_series(activity: Activity, now: float, minutes: int = 60) -> list[MinutePoint]:
    """The last ``minutes`` minutes, oldest first, the current one included, zero-filled."""
    current = int(now // 60) * 60
    first = current - (minutes - 1) * 60
    counts: dict[int, dict[str, int]] = {minute: defaultdict(int) for minute in range(first, current + 60, 60)}
    for accepted in activity.accepted:
        if accepted.minute in counts:
            counts[accepted.minute]["accepted"] += accepted.count
    for finished in activity.finished:
        if finished.minute in counts:
            counts[finished.minute][GROUP_OF[finished.state]] += finished.count
    return [MinutePoint(minute, **values) for minute, values in counts.items()]


@dataclass(frozen=True)
class EngineRow:
    """One engine's line of the overview and of ``gateway jobs stats``."""

    engine: str
    category: str
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    p50: float | None = None
    """End-to-end seconds (acceptance to final state) of the jobs that became final; None if none did."""
    p99: float | None = None


def engine_table(activity: Activity) -> list[EngineRow]:
    """Per engine and category, sorted: accepted, final by outcome group, p50 and p99 from the latency buckets."""
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(END_TO_END_BUCKETS) + 1))
    for accepted in activity.accepted:
        counts[accepted.engine, accepted.category]["accepted"] += accepted.count
    for finished in activity.finished:
        key = (finished.engine, finished.category)
        counts[key][GROUP_OF[finished.state]] += finished.count
        buckets[key][min(finished.bucket, len(END_TO_END_BUCKETS))] += finished.count
    rows = []
    for (engine, category), values in sorted(counts.items()):
        histogram = buckets.get((engine, category))
        p50 = quantile(0.5, histogram) if histogram else None
        p99 = quantile(0.99, histogram) if histogram else None
        rows.append(EngineRow(engine, category, **values, p50=p50, p99=p99))
    return rows
