"""gateway/jobs/reports.py: what `gateway jobs` and the dashboard show, computed in one place.
Pure functions: hand-computed cases, and Hypothesis for the quantile and the ``--since`` parser."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.jobs.model import Job, JobState, Outcome
from gateway.jobs.queue import MAX_LIST_LIMIT, AcceptedCount, Activity, FinishedCount, JobFilter
from gateway.jobs.reports import OUTCOME_GROUPS, EngineRow, MinutePoint, allowed_actions, engine_table, minute_series, parse_since, quantile
from gateway.metrics import END_TO_END_BUCKETS
from gateway.outcomes import FINAL_STATES
from gateway.tasks import Category, Task, TextPrompt

PROPERTIES = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- quantile -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.5, [0, 10, 0, 0], 1.5),  # all in (1, 2]: the middle of it
        (1.0, [0, 10, 0, 0], 2.0),
        (0.0, [0, 10, 0, 0], 1.0),  # the lower edge of the first bucket holding anything
        (0.2, [4, 4, 0, 2], 0.5),  # the first bucket starts at 0
        (0.5, [4, 4, 0, 2], 1.25),
        (0.8, [4, 4, 0, 2], 2.0),
        (0.9, [4, 4, 0, 2], 4.0),  # in +Inf: the highest finite bound
        (1.0, [0, 0, 0, 3], 4.0),
    ],
)
def test_quantile_by_hand(q: float, counts: list[int], expected: float) -> None:
    assert quantile(q, counts, (1.0, 2.0, 4.0)) == pytest.approx(expected)


def test_quantile_on_the_end_to_end_buckets() -> None:
    one_in_5_to_10 = [0] * (len(END_TO_END_BUCKETS) + 1)
    one_in_5_to_10[END_TO_END_BUCKETS.index(10)] = 1
    assert quantile(0.5, one_in_5_to_10) == pytest.approx(7.5)
    assert quantile(0.99, one_in_5_to_10) == pytest.approx(9.95)
    assert quantile(0.5, [0] * (len(END_TO_END_BUCKETS) + 1)) is None  # nothing finished


def test_quantile_refuses_what_it_cannot_answer() -> None:
    with pytest.raises(ValueError, match=re.escape("quantile 1.5 is not within 0..1")):
        quantile(1.5, [1, 0], (1.0,))
    with pytest.raises(ValueError, match="3 bucket counts for 1 bounds: expected 2"):
        quantile(0.5, [1, 0, 0], (1.0,))


bounds_strategy = st.lists(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), min_size=1, max_size=18, unique=True).map(sorted)


@st.composite
def histograms(draw: st.DrawFn) -> tuple[list[float], list[int]]:
    bounds = draw(bounds_strategy)
    counts = draw(st.lists(st.integers(0, 10**6), min_size=len(bounds) + 1, max_size=len(bounds) + 1).filter(lambda c: sum(c) > 0))
    return bounds, counts


@PROPERTIES
@given(histograms(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_quantile_is_monotone_and_within_the_bounds(histogram: tuple[list[float], list[int]], a: float, b: float) -> None:
    bounds, counts = histogram
    low, high = sorted((a, b))
    at_low, at_high = quantile(low, counts, bounds), quantile(high, counts, bounds)
    assert at_low is not None and at_high is not None
    assert 0.0 <= at_low <= at_high <= bounds[-1]


# -- parse_since ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("15m", 900.0), ("2h", 7200.0), ("1d", 86400.0), (" 90M ", 5400.0), ("all", None), ("", None), ("ALL", None)])
def test_parse_since(text: str, seconds: float | None) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["15", "m", "0m", "1.5h", "-1h", "1w", "1000000d", "١٥m", "15 m", "1h30m", "\ud800"])
def test_parse_since_names_the_forms_it_takes(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_since(text)
    assert str(caught.value).endswith("is not a time span: use a number of minutes, hours or days (15m, 2h, 1d), or 'all'")


@PROPERTIES
@given(st.one_of(st.text(max_size=30), st.from_regex(r"[0-9]{1,9}[mhdMHD]?", fullmatch=True)))
def test_parse_since_answers_seconds_or_a_value_error(text: str) -> None:
    try:
        seconds = parse_since(text)
    except ValueError as exc:
        assert "15m, 2h, 1d" in str(exc)
        return
    assert seconds is None or (seconds >= 60 and seconds == int(seconds))


# -- minute_series and engine_table -------------------------------------------------------------------


NOW = 1_800_000_030.0  # 30 s into a minute
MINUTE = int(NOW // 60) * 60


def activity() -> Activity:
    inf = len(END_TO_END_BUCKETS)
    return Activity(
        since=NOW - 3600,
        accepted=(
            AcceptedCount(MINUTE, "text_a", "text", 5),
            AcceptedCount(MINUTE - 60, "text_a", "text", 2),
            AcceptedCount(MINUTE - 59 * 60, "pics_b", "image", 1),  # the oldest minute of the hour
            AcceptedCount(MINUTE - 60 * 60, "pics_b", "image", 9),  # a minute before the window
        ),
        finished=(
            FinishedCount(MINUTE, "text_a", "text", JobState.DELIVERED, 8, 3),
            FinishedCount(MINUTE, "text_a", "text", JobState.DELIVERED_UNCONFIRMED, 8, 1),
            FinishedCount(MINUTE, "text_a", "text", JobState.GONE, 10, 1),
            FinishedCount(MINUTE - 60, "text_a", "text", JobState.DEAD, inf, 1),
            FinishedCount(MINUTE - 60, "pics_b", "image", JobState.EXPIRED, inf, 2),
            FinishedCount(MINUTE - 120, "pics_b", "image", JobState.FAILED, 3, 1),
        ),
        pending={JobState.QUEUED: 4, JobState.RUNNING: 0, JobState.DELIVERING: 1},
    )


def test_outcome_groups_cover_every_final_state_once() -> None:
    grouped = [state for states in OUTCOME_GROUPS.values() for state in states]
    assert sorted(grouped) == sorted(FINAL_STATES) and len(grouped) == len(set(grouped))


def test_minute_series_is_zero_filled_oldest_first() -> None:
    series = minute_series(activity(), NOW)
    assert len(series) == 60 and [p.minute for p in series] == list(range(MINUTE - 59 * 60, MINUTE + 60, 60))
    assert series[-1] == MinutePoint(MINUTE, accepted=5, succeeded=4, failed=1, expired=0)
    assert series[-2] == MinutePoint(MINUTE - 60, accepted=2, succeeded=0, failed=1, expired=2)
    assert series[-3] == MinutePoint(MINUTE - 120, failed=1)
    assert series[0] == MinutePoint(MINUTE - 59 * 60, accepted=1)  # the minute before it is left out
    assert all(p == MinutePoint(p.minute) for p in series[1:-3])
    assert [p.accepted for p in minute_series(activity(), NOW, minutes=2)] == [2, 5]


def test_engine_table_counts_and_quantiles() -> None:
    inf_bound = float(END_TO_END_BUCKETS[-1])
    assert engine_table(activity()) == [
        EngineRow("pics_b", "image", accepted=10, succeeded=0, failed=1, expired=2, p50=inf_bound, p99=inf_bound),
        EngineRow("text_a", "text", accepted=7, succeeded=4, failed=2, expired=0, p50=quantile(0.5, bucketed({8: 4, 10: 1, 16: 1})), p99=inf_bound),
    ]
    assert engine_table(Activity(since=0, accepted=(AcceptedCount(MINUTE, "e", "text", 3),))) == [EngineRow("e", "text", accepted=3)]  # p50/p99 None


def bucketed(counts: dict[int, int]) -> list[int]:
    histogram = [0] * (len(END_TO_END_BUCKETS) + 1)
    for index, count in counts.items():
        histogram[index] = count
    return histogram


def test_engine_table_p50_by_hand() -> None:
    """4 jobs in (5, 10], 1 in (30, 60], 1 past 14400: the rank 3 of 6 falls in (5, 10] at 3/4."""
    [_, text] = engine_table(activity())
    assert text.p50 == pytest.approx(5 + 5 * 3 / 4)


# -- the operator's buttons, the list filter ----------------------------------------------------------


def job(state: JobState, *, outcome: Outcome | None = None, lease_until: float | None = None, ttl: float = 100.0) -> Job:
    now = time.time()
    task = Task(job_id="j", engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    return Job(task, "http://p/cb", "http://p/err", state=state, outcome=outcome, lease_until=lease_until)


def test_allowed_actions() -> None:
    now, result = time.time(), Outcome(result={"kind": "text", "text": "x"})
    assert allowed_actions(job(JobState.QUEUED), now) == {"cancel"}
    assert allowed_actions(job(JobState.RUNNING, lease_until=now + 10), now) == set()
    assert allowed_actions(job(JobState.RUNNING, lease_until=now - 1), now) == {"cancel"}  # its worker is gone
    assert allowed_actions(job(JobState.DELIVERING, outcome=result), now) == {"cancel"}
    assert allowed_actions(job(JobState.DEAD, outcome=result), now) == {"redeliver"}
    assert allowed_actions(job(JobState.DEAD, outcome=result, ttl=-1), now) == set()
    assert allowed_actions(job(JobState.DEAD), now) == set()
    assert allowed_actions(job(JobState.DELIVERED, outcome=result), now) == set()


def test_job_filter_bounds_and_blanks() -> None:
    assert JobFilter(limit=0).limit == 1 and JobFilter(limit=10**9).limit == MAX_LIST_LIMIT == 500 and JobFilter().limit == 50
    assert JobFilter(engine="", portal="", before_id="") == JobFilter()
    assert JobFilter(portal="Acme.Bitrix24.COM").portal == "acme.bitrix24.com"
    for value in ("a\x00b", "\ud800", "a\nb"):
        with pytest.raises(ValueError, match=r"^the engine filter .* holds characters no job has: control characters or lone surrogates$"):
            JobFilter(engine=value)
