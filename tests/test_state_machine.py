"""The job state machine in-process: the worker and delivery against a fake clock, a mock portal
(``httpx.MockTransport`` behind the real :class:`~gateway.delivery.Deliverer`) and a real queue:
each test runs on SQLite and on PostgreSQL (the ``queue`` fixture of tests/conftest.py).

No loop runs and nothing sleeps: a test claims with :meth:`Worker.claim_once`, waits for the
jobs it holds with :meth:`Worker.settle`, and moves the clock itself. Every transition is
covered -- ``queued -> running -> delivering`` and each final state -- and the crash points:
a lease lost while running, a worker that dies during a callback POST."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.config import DeliverySettings
from gateway.delivery import Deliverer
from gateway.hookspecs import hookimpl
from gateway.jobs.model import Job, new_job_id
from gateway.jobs.sqlite import SQLiteJobQueue
from gateway.metrics import Metrics
from gateway.netguard import OutboundPolicy
from gateway.outcomes import Attempt, AttemptKind, DeliveryOutcome, JobError, JobState, Outcome
from gateway.plugins import get_plugin_manager
from gateway.tasks import Category, Task, TextPrompt
from gateway.worker import Worker

pytestmark = pytest.mark.anyio
LEASE = 30.0
SETTINGS = DeliverySettings(connect_timeout=1, read_timeout=5, backoff_initial=1, backoff_max=4, max_in_flight_per_portal=2)
RESULT = Outcome(result={"kind": "text", "text": "hi", "usage": None}, provider="up/m")
FAILURE = Outcome(error=JobError("every route target failed; last error: 503", 503))


class FakeClock:
    """``time.time`` for the whole process (worker, delivery, queue): it moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "time", fake)
    return fake


class Hooks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @hookimpl
    def task_succeeded(self, task: Any, result: Any) -> None:
        self.calls.append(("succeeded", task.job_id))

    @hookimpl
    def task_failed(self, task: Any, error: Any) -> None:
        self.calls.append(("failed", error.reason))


class Executor:
    """Answers every task with ``outcome``; with ``gate``, only once the gate is set."""

    def __init__(self, outcome: Outcome = RESULT, gate: asyncio.Event | None = None) -> None:
        self.outcome, self.gate, self.tasks = outcome, gate, []

    async def execute(self, task: Task) -> tuple[Outcome, list[Attempt]]:
        self.tasks.append(task.job_id)
        if self.gate is not None:
            await self.gate.wait()
        return self.outcome, []


Answer = Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


class Portal:
    """The portal's callback endpoints: answers from a script, requests recorded."""

    def __init__(self, *answers: Answer) -> None:
        self.answers, self.requests = list(answers), []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        response = answer(request)
        return await response if asyncio.iscoroutine(response) else response  # type: ignore[return-value]


def data(value: bool) -> Answer:
    return lambda request: httpx.Response(200, json={"status": "success", "data": value, "errors": []})


def status(code: int) -> Answer:
    return lambda request: httpx.Response(code)


def lost_after_sending(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out waiting for the answer", request=request)


class MockPortalDeliverer(Deliverer):
    """The real deliverer, its HTTP client on a mock transport: no socket, no DNS."""

    def __init__(self, portal: Portal) -> None:
        super().__init__(OutboundPolicy(["*"], True), SETTINGS, rng=lambda: 0.0)
        self.portal = portal

    async def open(self) -> None:
        self._client = httpx.AsyncClient(transport=httpx.MockTransport(self.portal.handle), follow_redirects=False)


async def make_worker(queue: SQLiteJobQueue, executor: Executor, portal: Portal, hooks: Hooks) -> Worker:
    deliverer = MockPortalDeliverer(portal)
    await deliverer.open()
    return Worker(
        queue=queue,
        executor=executor,
        deliverer=deliverer,
        pm=get_plugin_manager([(hooks, "hooks")]),
        metrics=Metrics(),
        concurrency=2,
        lease_seconds=LEASE,
        poll_interval=60,
    )


async def submit(queue: SQLiteJobQueue, ttl: float = 600.0, callback: str = "http://portal.test/cb?hash=a") -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    job, created = await queue.enqueue(Job(task, callback, callback.replace("/cb", "/err")), job_id, lease_owner=None, lease_seconds=LEASE)
    assert created and job.state is JobState.QUEUED
    return job


async def step(worker: Worker) -> list[Job]:
    """One claim, then every job it took run to its next resting point."""
    jobs = await worker.claim_once()
    await worker.settle()
    return jobs


async def stored(queue: SQLiteJobQueue, job: Job) -> Job:
    found = await queue.get(job.id)
    assert found is not None
    return found


def callbacks(job: Job) -> list[str]:
    return [a.outcome for a in job.attempts if a.kind is AttemptKind.CALLBACK]


# -- queued -> running -> delivering -> final ------------------------------------------------
async def test_a_result_the_portal_takes_is_delivered(clock, queue):
    hooks, portal = Hooks(), Portal(data(True))
    worker = await make_worker(queue, Executor(), portal, hooks)
    job = await submit(queue)
    [claimed] = await worker.claim_once()
    assert claimed.state is JobState.RUNNING and (await stored(queue, job)).state is JobState.RUNNING
    await worker.settle()
    job = await stored(queue, job)
    assert job.state is JobState.DELIVERED and callbacks(job) == [DeliveryOutcome.DELIVERED]
    assert [str(r.url) for r in portal.requests] == ["http://portal.test/cb?hash=a"]
    assert json.loads(portal.requests[0].content) == {"result": "hi"}
    assert hooks.calls == [("succeeded", job.id)]


async def test_an_error_outcome_the_portal_takes_is_failed(clock, queue):
    hooks, portal = Hooks(), Portal(data(True))
    worker = await make_worker(queue, Executor(FAILURE), portal, hooks)
    job = await submit(queue)
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.FAILED
    assert str(portal.requests[0].url) == "http://portal.test/err?hash=a"
    assert json.loads(portal.requests[0].content)["api_request_completed"] is False
    assert hooks.calls == [("failed", "provider_error")]


async def test_data_false_is_gone(clock, queue):
    hooks = Hooks()
    worker = await make_worker(queue, Executor(), Portal(data(False)), hooks)
    job = await submit(queue)
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.GONE and callbacks(job) == [DeliveryOutcome.GONE]
    assert hooks.calls == [("failed", "gone")]


@pytest.mark.parametrize("answer", [status(404), status(302)], ids=["http 404", "redirect"])
async def test_a_portal_that_refuses_the_callback_for_good_leaves_the_job_dead(clock, queue, answer):
    hooks = Hooks()
    worker = await make_worker(queue, Executor(), Portal(answer), hooks)
    job = await submit(queue)
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.DEAD and callbacks(job) == [DeliveryOutcome.REJECTED]
    assert hooks.calls == [("failed", "dead")]


async def test_a_callback_url_that_cannot_be_sent_to_is_refused_and_dead(clock, queue):
    worker = await make_worker(queue, Executor(), Portal(data(True)), Hooks())
    job = await submit(queue, callback="http://portal.test:99999/cb?hash=a")
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.DEAD and callbacks(job) == [DeliveryOutcome.REFUSED]


async def test_a_failed_attempt_is_retried_when_due_then_delivered(clock, queue):
    hooks, portal = Hooks(), Portal(status(503), data(True))
    worker = await make_worker(queue, Executor(), portal, hooks)
    job = await submit(queue)
    await step(worker)
    waiting = await stored(queue, job)
    assert waiting.state is JobState.DELIVERING and waiting.delivery_attempts == 1 and waiting.next_at > clock.now
    assert await step(worker) == []  # not due yet: nothing is claimed
    clock.advance(waiting.next_at - clock.now)
    [again] = await step(worker)
    assert again.state is JobState.DELIVERING and not again.interrupted_delivery
    job = await stored(queue, job)
    assert job.state is JobState.DELIVERED and callbacks(job) == [DeliveryOutcome.RETRY, DeliveryOutcome.DELIVERED]
    assert hooks.calls == [("succeeded", job.id)]  # once, for the attempt that made it final


async def test_data_false_after_an_answer_lost_in_flight_is_delivered_unconfirmed(clock, queue):
    hooks = Hooks()
    worker = await make_worker(queue, Executor(), Portal(lost_after_sending, data(False)), hooks)
    job = await submit(queue)
    await step(worker)
    assert (await stored(queue, job)).maybe_delivered
    clock.advance(SETTINGS.backoff_initial)
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.DELIVERED_UNCONFIRMED and callbacks(job) == [DeliveryOutcome.RETRY, DeliveryOutcome.GONE]
    assert hooks.calls == [("succeeded", job.id)]


async def test_a_job_claimed_after_its_ttl_expires_without_running(clock, queue):
    hooks, executor = Hooks(), Executor()
    worker = await make_worker(queue, executor, Portal(data(True)), hooks)
    job = await submit(queue, ttl=60)
    clock.advance(61)
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.EXPIRED and executor.tasks == [] and callbacks(job) == []
    assert hooks.calls == [("failed", "expired")]


async def test_retries_that_would_outlast_the_ttl_end_expired(clock, queue):
    portal = Portal(status(503))
    worker = await make_worker(queue, Executor(), portal, Hooks())
    job = await submit(queue, ttl=60)
    clock.advance(59.5)  # the next attempt (1 s of backoff at the least) would come after the ttl
    await step(worker)
    job = await stored(queue, job)
    assert job.state is JobState.EXPIRED and "the ttl passed while delivery failed" in job.detail
    assert len(portal.requests) == 1


# -- crash points ------------------------------------------------------------------------------
async def test_a_worker_that_lost_its_lease_while_running_does_not_overwrite_the_new_owner(clock, queue):
    hooks, portal, gate = Hooks(), Portal(data(True)), asyncio.Event()
    slow = await make_worker(queue, Executor(gate=gate), portal, hooks)
    job = await submit(queue)
    await slow.claim_once()  # running, held by the slow worker: its model never answers in time
    clock.advance(LEASE + 1)  # no heartbeat: the lease runs out
    other = await make_worker(queue, Executor(), portal, hooks)
    [taken] = await other.claim_once()
    assert taken.state is JobState.RUNNING
    await other.settle()
    assert (await stored(queue, job)).state is JobState.DELIVERED
    gate.set()
    await slow.settle()  # its outcome comes too late: the store is refused, nothing else happens
    job = await stored(queue, job)
    assert job.state is JobState.DELIVERED and len(portal.requests) == 1
    assert hooks.calls == [("succeeded", job.id)]


@pytest.mark.parametrize(
    "answer, final, seen",
    [
        (data(False), JobState.DELIVERED_UNCONFIRMED, DeliveryOutcome.GONE),
        (data(True), JobState.DELIVERED, DeliveryOutcome.DELIVERED),
    ],
    ids=["data false", "data true"],
)
async def test_a_worker_that_died_during_the_callback_leaves_an_interrupted_delivery(clock, queue, answer, final, seen):
    hooks, sent, hung = Hooks(), asyncio.Event(), asyncio.Event()

    async def never_answers(request: httpx.Request) -> httpx.Response:
        sent.set()
        await hung.wait()
        raise AssertionError("the crashed worker's POST never ends")

    crashed = await make_worker(queue, Executor(), Portal(never_answers), hooks)
    job = await submit(queue)
    await crashed.claim_once()
    await sent.wait()  # the POST is in flight when the process dies
    clock.advance(LEASE + 1)
    restarted = await make_worker(queue, Executor(), Portal(answer), hooks)
    [resumed] = await step(restarted)
    assert resumed.interrupted_delivery and resumed.outcome == RESULT
    job = await stored(queue, job)
    assert job.state is final and callbacks(job) == [seen]
    assert hooks.calls == [("succeeded", job.id)]
    await crashed.stop(grace=0)  # cleanup of the "dead" worker: its job is another's now, nothing is released
    assert (await stored(queue, job)).state is final
