"""Usage as people read it: the portal's finished jobs and the API's stored counts as one kind of
row, totals per day for a chart, and CSV for a spreadsheet. Pure functions: ``gateway usage`` and
the admin dashboard fetch the counts (:meth:`~gateway.jobs.queue.JobQueue.usage_totals`, the API's
ledger), and both shape them here, so they never disagree.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import asdict, astuple, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from gateway.jobs.model import Job
from gateway.jobs.queue import PortalUsageCount
from gateway.usage.ledger import ApiUsageRow

PORTAL, API = "portal", "api"
SURFACES = (PORTAL, API)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV injection list)."""
ESCAPED_STARTS = (*FORMULA_STARTS, "'")


@dataclass(frozen=True)
class UsageRow:
    """What one portal (portal jobs) or one API key (API requests) used of one engine on one UTC day."""

    day: str
    surface: str
    """``portal`` (jobs from a Bitrix24 portal) or ``api`` (the OpenAI-compatible API)."""
    engine: str
    who: str
    """The portal's host for portal jobs, the key's name for the API."""
    requests: int = 0
    errors: int = 0
    """Portal jobs that ended without a result; API requests answered with an error."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    audio_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.surface == PORTAL:  # the names `gateway usage --json` gave portal rows before API rows existed
            data["jobs"], data["results"] = self.requests, self.requests - self.errors
        return data


CSV_COLUMNS = tuple(f.name for f in fields(UsageRow))


@dataclass(frozen=True)
class DailyTotal:
    """Every surface, engine and portal or key of one day added up: one point of a chart."""

    day: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    audio_seconds: float = 0.0


def portal_usage_rows(counts: Iterable[PortalUsageCount]) -> list[UsageRow]:
    """The queue's counts of finished portal jobs (:meth:`~gateway.jobs.queue.JobQueue.usage_totals`) as report rows."""
    return merged(
        UsageRow(c.day, PORTAL, c.engine, c.portal, c.jobs, c.errors, c.prompt_tokens, c.completion_tokens, c.cost_usd, c.audio_seconds) for c in counts
    )


def portal_usage(jobs: Iterable[Job]) -> list[UsageRow]:
    """The same rows added up in Python from loaded jobs: the reference each backend's
    :meth:`~gateway.jobs.queue.JobQueue.usage_totals` is tested against (tests/test_queue_contract.py).
    Not for serving: a month of jobs, transcripts included, does not fit in memory.

    Final jobs by the UTC day they ended, engine and portal host; a job whose outcome has no result
    (or an empty one) is an error; a usage count or a duration counts where it is a number."""
    totals: dict[tuple[str, str, str], list[Any]] = {}
    for job in jobs:
        day = datetime.fromtimestamp(job.finished_at or job.accepted_at, UTC).date().isoformat()
        counts = totals.setdefault((day, job.engine, job.portal), [0, 0, 0, 0, 0.0, 0.0])
        counts[0] += 1
        result = job.outcome.result if job.outcome is not None else None
        if not result or not isinstance(result, dict):
            counts[1] += 1
            continue
        usage = result.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        counts[2] += int(_number(usage.get("prompt_tokens")))
        counts[3] += int(_number(usage.get("completion_tokens")))
        counts[4] += float(_number(usage.get("cost_usd")))
        counts[5] += float(_number(result.get("duration")))
    return [UsageRow(day, PORTAL, engine, who, *counts) for (day, engine, who), counts in sorted(totals.items())]


def api_usage(rows: Iterable[ApiUsageRow]) -> list[UsageRow]:
    """The API's stored rows (one per day, key and engine) as report rows."""
    return merged(UsageRow(r.day, API, r.engine, r.api_key, *r.counts()) for r in rows)


def merged(*groups: Iterable[UsageRow]) -> list[UsageRow]:
    """Rows of any sources as one list by day, surface, engine and who; rows with the same four are added up."""
    totals: dict[tuple[str, str, str, str], UsageRow] = {}
    for group in groups:
        for row in group:
            key = (row.day, row.surface, row.engine, row.who)
            totals[key] = _add(totals[key], row) if key in totals else row
    return [totals[key] for key in sorted(totals)]


def daily_totals(rows: Iterable[UsageRow]) -> list[DailyTotal]:
    """One total per day that has rows, by day."""
    totals: dict[str, DailyTotal] = {}
    for row in rows:
        before = totals.get(row.day) or DailyTotal(row.day)
        totals[row.day] = DailyTotal(row.day, *(a + b for a, b in zip(astuple(before)[1:], astuple(row)[4:], strict=True)))
    return [totals[day] for day in sorted(totals)]


def csv_cell(value: str | int | float) -> str:
    """A value as a CSV cell a spreadsheet shows and never runs: text that starts like a formula gets
    a ``'`` in front (which spreadsheets hide), and so does text that starts with ``'`` itself, so
    that removing one leading ``'`` always gives the value back."""
    text = repr(value) if isinstance(value, float) else str(value)  # repr: the float back exactly
    return "'" + text if text.startswith(ESCAPED_STARTS) else text


def to_csv(rows: Iterable[UsageRow]) -> str:
    """A header row (:data:`CSV_COLUMNS`), then one line per row in that column order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([csv_cell(value) for value in astuple(row)])
    return out.getvalue()


def _number(value: Any) -> int | float:
    """A JSON number as it is, anything else (None, a string, a boolean) as 0: what the databases count."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _add(a: UsageRow, b: UsageRow) -> UsageRow:
    return UsageRow(a.day, a.surface, a.engine, a.who, *(x + y for x, y in zip(astuple(a)[4:], astuple(b)[4:], strict=True)))
