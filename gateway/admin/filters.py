"""The jobs page's query string (hostile: anyone may type a URL) into a typed :class:`JobFilter`.

Every value is either one the page offers (a state, an engine code, a category, a time span) or
dropped with a message saying which and why; nothing else reaches the query."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.jobs.queue import JobFilter
from gateway.jobs.reports import parse_since
from gateway.outcomes import JobState
from gateway.tasks import Category

JOB_ID_RE = re.compile(r"[0-9a-f]{24}")
"""A job id as :func:`gateway.jobs.model.new_job_id` makes them: 24 hex digits (always ``fullmatch``: ``$`` would let a newline through)."""
PORTAL_RE = re.compile(r"[a-z0-9.-]{1,253}(:[0-9]{1,5})?")
SINCE_CHOICES = ("15m", "1h", "6h", "24h", "7d")
PAGE_SIZE = 50


@dataclass(frozen=True)
class JobFilterForm:
    """The filters as the form shows them (strings), and the seconds ``since`` stands for."""

    state: str = ""
    engine: str = ""
    category: str = ""
    portal: str = ""
    since: str = ""
    before: str = ""
    limit: int = PAGE_SIZE
    accepted_since: float | None = field(default=None, compare=False)

    def to_filter(self) -> JobFilter:
        return JobFilter(
            state=JobState(self.state) if self.state else None,
            engine=self.engine or None,
            category=self.category or None,
            portal=self.portal or None,
            accepted_since=self.accepted_since,
            before_id=self.before or None,
            limit=self.limit,
        )

    def query(self) -> dict[str, str]:
        """The filters as query parameters (the next page's link keeps them)."""
        values = {"state": self.state, "engine": self.engine, "category": self.category, "portal": self.portal, "since": self.since}
        return {key: value for key, value in values.items() if value}


def read_job_filters(params: Mapping[str, str], engines: Sequence[str], *, now: float) -> tuple[JobFilterForm, str]:
    """The form's values and, when some were dropped, a message naming them."""
    dropped: list[str] = []

    def pick(name: str, allowed: Sequence[str]) -> str:
        value = params.get(name, "")
        if value and value not in allowed:
            dropped.append(f"{name} {value[:40]!r} is not one of the choices")
            return ""
        return value

    state = pick("state", [str(s) for s in JobState])
    engine = pick("engine", list(engines))
    category = pick("category", [str(c) for c in Category])
    portal = params.get("portal", "").strip().lower()
    if portal and not PORTAL_RE.fullmatch(portal):
        dropped.append(f"portal {portal[:40]!r} is not a host name")
        portal = ""
    since, accepted_since = params.get("since", "").strip(), None
    try:
        span = parse_since(since)
        accepted_since = now - span if span is not None else None
    except ValueError as exc:
        dropped.append(f"since: {exc}")
        since = ""
    before = params.get("before", "")
    if before and not JOB_ID_RE.fullmatch(before):
        dropped.append("before is not a job id")
        before = ""
    problem = ("Ignored: " + "; ".join(dropped) + ".") if dropped else ""
    return JobFilterForm(state, engine, category, portal, since, before, PAGE_SIZE, accepted_since), problem
