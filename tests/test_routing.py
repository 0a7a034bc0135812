import asyncio
import time

import pytest

from gateway.adapters import AdapterError
from gateway.config import RouteTarget, RoutingSettings
from gateway.routing import Router

pytestmark = pytest.mark.anyio
A, B = RouteTarget("a", "m"), RouteTarget("b", "m")


def router(**settings) -> Router:
    base = {"retries": 2, "backoff_initial": 0.001, "backoff_max": 0.002, "cooldown_failures": 100, "cooldown_seconds": 60}
    return Router(RoutingSettings(**{**base, **settings}))


def scripted(**answers):
    """call() that pops one answer per target label: an exception to raise or a value to return."""
    calls = []

    async def call(target, budget):
        calls.append(target.provider)
        answer = answers[target.provider].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return call, calls


def retryable():
    return AdapterError("HTTP 500", retryable=True, status=500)


async def test_retries_then_falls_back():
    call, calls = scripted(a=[retryable()] * 3, b=["ok"])
    result = await router().run([A, B], call, time.time() + 10)
    assert result.value == "ok" and result.target == B and calls == ["a", "a", "a", "b"]
    assert [a.outcome for a in result.attempts] == ["retryable"] * 3 + ["ok"]


async def test_final_error_skips_retries():
    call, calls = scripted(a=[AdapterError("HTTP 401", retryable=False, status=401)], b=["ok"])
    result = await router().run([A, B], call, time.time() + 10)
    assert result.value == "ok" and calls == ["a", "b"]


async def test_error_codes():
    call, _ = scripted(a=[AdapterError("too long", retryable=False, status=400)])
    assert (await router().run([A], call, time.time() + 10)).error.code == 400
    call, _ = scripted(a=[retryable()] * 3)
    assert (await router().run([A], call, time.time() + 10)).error.code == 503
    call, _ = scripted(a=[AdapterError("bad key", retryable=False, status=401)])
    assert (await router().run([A], call, time.time() + 10)).error.code == 502


async def test_deadline_stops_retries():
    call, calls = scripted(a=[retryable()] * 1000)
    deadline = time.time() + 0.5
    result = await router(retries=1000, backoff_initial=0.05, backoff_max=0.05).run([A], call, deadline)
    assert all(attempt.started_at < deadline for attempt in result.attempts)
    assert time.time() < deadline + 1.5  # stopped, not retrying 1000 times (a loose bound: a loaded machine wakes late)
    assert result.error is not None and result.error.code == 504 and 3 < len(calls) < 20


async def test_budget_passed_to_call_shrinks_with_the_deadline():
    budgets = []

    async def call(target, budget):
        budgets.append(budget)
        return "ok"

    await router().run([A], call, time.time() + 3)
    assert 2.5 < budgets[0] <= 3


async def test_route_deadline_keeps_a_margin():
    r = router(deadline_margin=15)
    assert r.route_deadline(1000.0, ttl=14400) == 985.0
    assert r.route_deadline(1000.0, ttl=40) == 990.0  # a quarter of a short ttl


async def test_cooldown_skips_a_failing_target_then_probes():
    r = router(retries=0, cooldown_failures=2, cooldown_seconds=0.2)
    call, calls = scripted(a=[retryable(), retryable(), "a-back"], b=["b1", "b2", "b3"])
    await r.run([A, B], call, time.time() + 5)
    await r.run([A, B], call, time.time() + 5)  # a fails twice in a row: cooling down
    calls.clear()
    result = await r.run([A, B], call, time.time() + 5)
    assert calls == ["b"] and result.attempts[0].outcome == "skipped"
    await asyncio.sleep(0.25)
    calls.clear()
    result = await r.run([A, B], call, time.time() + 5)
    assert calls == ["a"] and result.value == "a-back"


async def test_all_targets_cooling_waits_for_the_first_to_reopen():
    r = router(retries=0, cooldown_failures=1, cooldown_seconds=0.2)
    call, _calls = scripted(a=[retryable(), "ok"])
    await r.run([A], call, time.time() + 5)
    started = time.monotonic()
    result = await r.run([A], call, time.time() + 5)
    assert result.value == "ok" and time.monotonic() - started >= 0.15
