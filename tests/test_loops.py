"""In-process: background loops that restart, and jobs that reach a final state whatever goes wrong with them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gateway.config import DeliverySettings, parse_config
from gateway.delivery import Deliverer, DeliveryResult, PortalLanes, portal_host
from gateway.hookspecs import hookimpl
from gateway.jobs.model import FINAL_STATES, Attempt, Job, JobState, Outcome, new_job_id
from gateway.jobs.sqlite import QueueStoreError, SQLiteJobQueue
from gateway.metrics import Metrics, MetricsRecorder
from gateway.netguard import OutboundPolicy
from gateway.plugins import get_plugin_manager
from gateway.supervision import Supervisor
from gateway.tasks import Category, Task, TextPrompt
from gateway.testing import make_config
from gateway.worker import MAX_INTERNAL_ERRORS, WRITE_TRIES, Worker

pytestmark = pytest.mark.anyio
FAST = DeliverySettings(connect_timeout=1, read_timeout=2, backoff_initial=0.01, backoff_max=0.05, max_in_flight_per_portal=2)


def make_job(callback_url: str = "http://portal.test/cb?hash=a", ttl: float = 100.0) -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    error_url = callback_url.replace("/cb", "/err")
    return Job(task, callback_url, error_url)


class Hooks:
    """Records the outcome hooks, as a third-party plugin would see them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    @hookimpl
    def task_succeeded(self, task: Any, result: Any) -> None:
        self.calls.append(("succeeded", task.job_id, result))

    @hookimpl
    def task_failed(self, task: Any, error: Any) -> None:
        self.calls.append(("failed", task.job_id, error))


class Executor:
    """Runs ``behave(job)`` for every task: return an outcome or raise."""

    def __init__(self, behave: Callable[[Job], Outcome]) -> None:
        self.behave, self.calls = behave, 0

    async def execute(self, job: Job) -> tuple[Outcome, list[Attempt]]:
        self.calls += 1
        return self.behave(job), []


class ScriptedDeliverer(Deliverer):
    """Answers callbacks from a script instead of the network: ``answer(job) -> DeliveryResult`` (or raise)."""

    def __init__(self, answer: Callable[[Job], Any], settings: DeliverySettings = FAST) -> None:
        super().__init__(OutboundPolicy(["*"], True), settings)
        self.answer = answer
        self.sent: list[tuple[str, Outcome | None]] = []
        self.in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}

    async def attempt(self, job: Job) -> DeliveryResult:
        host = portal_host(job.callback_url)
        self.sent.append((job.id, job.outcome))
        self.in_flight[host] = self.in_flight.get(host, 0) + 1
        self.most_in_flight[host] = max(self.most_in_flight.get(host, 0), self.in_flight[host])
        try:
            result = self.answer(job)
            return await result if asyncio.iscoroutine(result) else result
        finally:
            self.in_flight[host] -= 1


def answer(outcome: str, detail: str = "", maybe_consumed: bool = False) -> DeliveryResult:
    return DeliveryResult(outcome, Attempt("callback", "portal.test", time.time(), 0.01, outcome, detail), maybe_consumed)


@pytest.fixture
def hooks(monkeypatch) -> Hooks:
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "")
    return Hooks()


def make_worker(
    queue: SQLiteJobQueue,
    executor: Executor,
    deliverer: Deliverer,
    hooks: object,
    concurrency: int = 4,
    metrics: Metrics | None = None,
    plugins: tuple[tuple[object, str], ...] = (),
) -> Worker:
    return Worker(
        queue=queue,
        executor=executor,
        deliverer=deliverer,
        pm=get_plugin_manager([(hooks, "hooks"), *plugins]),
        metrics=metrics or Metrics(),  # type: ignore[arg-type]
        concurrency=concurrency,
        lease_seconds=5,
        poll_interval=0.05,
    )


class FailingWrites(SQLiteJobQueue):
    """A queue whose ``finish`` / ``reschedule`` raise :class:`QueueStoreError` the first ``failures[name]`` times
    (a disk I/O error), or whose ``finish`` finds the lease lost (``lose_lease``)."""

    def __init__(self, path: Any, *, lose_lease: bool = False, **failures: int) -> None:
        super().__init__(path)
        self.failures, self.lose_lease = failures, lose_lease

    def _fail(self, name: str) -> None:
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise QueueStoreError(f"queue database {self.path}: disk I/O error")

    async def finish(self, *args: Any, **kwargs: Any) -> bool:
        self._fail("finish")
        if self.lose_lease:
            return False
        return await super().finish(*args, **kwargs)

    async def reschedule(self, *args: Any, **kwargs: Any) -> bool:
        self._fail("reschedule")
        return await super().reschedule(*args, **kwargs)


@contextlib.asynccontextmanager
async def opened(queue: SQLiteJobQueue) -> AsyncIterator[SQLiteJobQueue]:
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


class FullLanes(PortalLanes):
    """Every portal's line is full: no delivery is admitted."""

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[bool]:
        yield False


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def wait_final(queue: SQLiteJobQueue, job_id: str, timeout: float = 10.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await queue.get(job_id)
        if job is not None and job.state in FINAL_STATES:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} is still {job.state.value if job else 'missing'} after {timeout} s: {job.detail if job else ''}")


async def run_jobs(worker: Worker, queue: SQLiteJobQueue, *jobs: Job) -> list[Job]:
    await worker.start()
    try:
        for i, job in enumerate(jobs):
            await queue.enqueue(job, f"key-{job.id}-{i}", lease_owner=None, lease_seconds=5)
        worker.wake()
        return [await wait_final(queue, job.id) for job in jobs]
    finally:
        await worker.stop(grace=1)


def result(_: Job) -> Outcome:
    return Outcome(result={"kind": "text", "text": "hi", "usage": None}, provider="up/m")


# -- the supervisor --------------------------------------------------------------------
async def test_a_loop_that_raises_is_restarted_counted_and_reported_down_meanwhile():
    metrics = Metrics()
    supervisor = Supervisor(metrics, restart_initial=0.2)
    runs = 0
    running = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"crash {runs}")
        running.set()
        await asyncio.Event().wait()

    supervisor.start("test-loop", loop)
    await asyncio.sleep(0.05)
    assert supervisor.down() == {"test-loop": "RuntimeError: crash 1"}
    await asyncio.wait_for(running.wait(), 5)
    assert supervisor.down() == {}
    assert metrics.loop_restarts.labels("test-loop")._value.get() == 2
    await supervisor.stop("test-loop")


async def test_a_loop_that_returns_is_done_not_restarted():
    supervisor = Supervisor(Metrics(), restart_initial=0.01)
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1

    await asyncio.wait_for(supervisor.start("once", loop), 5)
    await asyncio.sleep(0.05)
    assert runs == 1 and supervisor.down() == {}


async def test_health_answers_503_naming_the_loop_while_it_is_down(tmp_path, upstream, monkeypatch):
    from gateway.app import create_app

    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "openai")
    config = parse_config(make_config(upstream.url, data_dir=str(tmp_path / "var")), tmp_path / "gateway.yaml")
    app = create_app(config)
    rt = app.state.runtime
    rt.loops.restart_initial = 0.5
    await rt.start(app)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            assert (await client.get("/-/health")).json() == {"status": "ok", "queue_depth": 0}
            real = rt.queue._run_batch
            crashed = asyncio.Event()

            async def crash_once(batch: Any) -> None:
                rt.queue._run_batch = real
                crashed.set()
                raise RuntimeError("flusher bug")

            rt.queue._run_batch = crash_once
            depth = asyncio.ensure_future(rt.queue.depth())  # the operation the flusher dies on
            await asyncio.wait_for(crashed.wait(), 5)
            down = await client.get("/-/health")
            assert down.status_code == 503
            assert down.json() == {
                "status": "error",
                "error": "background loop(s) down: queue-flusher",
                "loops_down": {"queue-flusher": "RuntimeError: flusher bug"},
            }
            with pytest.raises(Exception, match="the flusher stopped"):
                await depth
            deadline = time.monotonic() + 5
            while (up := await client.get("/-/health")).status_code != 200 and time.monotonic() < deadline:  # noqa: ASYNC110 -- polls over HTTP
                await asyncio.sleep(0.05)
            assert up.json() == {"status": "ok", "queue_depth": 0}
            assert 'gateway_loop_restarts_total{loop="queue-flusher"} 1.0' in (await client.get("/metrics")).text
    finally:
        await rt.stop(app)


# -- one job's unexpected errors ---------------------------------------------------------
async def test_a_task_that_raises_is_retried_then_the_portal_gets_an_error(queue, hooks):
    def boom(job: Job) -> Outcome:
        raise RuntimeError("model bug")

    executor = Executor(boom)
    deliverer = ScriptedDeliverer(lambda job: answer("delivered", "portal answered data:true"))
    [job] = await run_jobs(make_worker(queue, executor, deliverer, hooks), queue, make_job())
    assert job.state is JobState.FAILED
    assert executor.calls == MAX_INTERNAL_ERRORS
    assert [(a.kind, a.target, a.outcome, a.detail) for a in job.attempts] == [
        ("internal", "execute", "error", "RuntimeError: model bug")
    ] * MAX_INTERNAL_ERRORS + [("callback", "portal.test", "delivered", "portal answered data:true")]
    [(_, sent_outcome)] = deliverer.sent
    assert sent_outcome.error.message == "the gateway failed while running the task: RuntimeError" and sent_outcome.error.code == 500
    assert [(kind, error.reason) for kind, _, error in hooks.calls] == [("failed", "internal")]


async def test_a_task_that_raises_once_is_run_again(queue, hooks):
    def flaky(job: Job) -> Outcome:
        if executor.calls == 1:
            raise OSError("disk full")
        return result(job)

    executor = Executor(flaky)
    deliverer = ScriptedDeliverer(lambda job: answer("delivered"))
    [job] = await run_jobs(make_worker(queue, executor, deliverer, hooks), queue, make_job())
    assert job.state is JobState.DELIVERED and job.detail == ""
    assert [a.kind for a in job.attempts] == ["internal", "callback"] and job.attempts[0].detail == "OSError: disk full"
    assert [kind for kind, _, _ in hooks.calls] == ["succeeded"]


async def test_a_delivery_that_raises_ends_dead_with_the_reason(queue, hooks):
    def raise_(job: Job) -> DeliveryResult:
        raise RuntimeError("delivery bug")

    deliverer = ScriptedDeliverer(raise_)
    [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job())
    assert job.state is JobState.DEAD
    assert job.detail == f"gave up after {MAX_INTERNAL_ERRORS} unexpected error(s) while delivering the outcome: RuntimeError: delivery bug"
    assert len(deliverer.sent) == MAX_INTERNAL_ERRORS
    assert [(a.kind, a.target) for a in job.attempts] == [("internal", "deliver")] * MAX_INTERNAL_ERRORS
    assert [(kind, error.reason, error.message) for kind, _, error in hooks.calls] == [("failed", "dead", job.detail)]


async def test_an_unexpected_delivery_error_within_a_short_ttl_ends_dead_at_once(queue, hooks):
    deliverer = ScriptedDeliverer(
        lambda job: answer("error", "unexpected error during the callback POST: KeyError: 'x'"), DeliverySettings(backoff_initial=30, backoff_max=30)
    )
    [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job(ttl=10))
    assert job.state is JobState.DEAD
    assert job.detail == "the ttl leaves no time to try again while delivering the outcome: unexpected error during the callback POST: KeyError: 'x'"


async def test_data_false_after_a_timed_out_attempt_is_delivered_unconfirmed(queue, hooks):
    answers = iter(
        [
            answer("retry", "ReadTimeout (after the callback was sent: the portal may have taken it)", maybe_consumed=True),
            answer("retry", "ConnectError: refused"),
            answer("gone", "portal answered data:false"),
        ]
    )
    deliverer = ScriptedDeliverer(lambda job: next(answers))
    [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job())
    assert job.state is JobState.DELIVERED_UNCONFIRMED
    assert job.detail.startswith("portal answered data:false after an earlier attempt that timed out")
    assert [kind for kind, _, _ in hooks.calls] == ["succeeded"]


async def test_delivered_unconfirmed_is_counted_under_its_own_state(queue, hooks):
    answers = iter([answer("retry", "ReadTimeout", maybe_consumed=True), answer("gone", "portal answered data:false")])
    metrics = Metrics()
    worker = make_worker(
        queue, Executor(result), ScriptedDeliverer(lambda job: next(answers)), hooks, metrics=metrics, plugins=((MetricsRecorder(metrics), "gateway.metrics"),)
    )
    [job] = await run_jobs(worker, queue, make_job())
    assert job.state is JobState.DELIVERED_UNCONFIRMED
    assert metrics.finished.labels("e", "text", "delivered_unconfirmed")._value.get() == 1
    assert metrics.finished.labels("e", "text", "delivered")._value.get() == 0


# -- a failed queue write after a callback POST never turns a delivery into "gone" --------
async def test_a_finish_write_that_fails_once_after_data_true_is_retried_not_posted_again(tmp_path, hooks):
    answers = iter([answer("delivered", "portal answered data:true")])
    deliverer = ScriptedDeliverer(lambda job: next(answers, answer("gone", "portal answered data:false")))  # the portal consumed the job
    async with opened(FailingWrites(tmp_path / "q.sqlite3", finish=1)) as queue:
        [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job())
    assert job.state is JobState.DELIVERED and job.detail == "portal answered data:true"
    assert len(deliverer.sent) == 1
    assert [kind for kind, _, _ in hooks.calls] == ["succeeded"]


async def test_a_finish_write_that_keeps_failing_after_data_true_ends_delivered_unconfirmed(tmp_path, hooks):
    answers = iter([answer("delivered", "portal answered data:true")])
    deliverer = ScriptedDeliverer(lambda job: next(answers, answer("gone", "portal answered data:false")))  # the portal consumed the job
    async with opened(FailingWrites(tmp_path / "q.sqlite3", finish=WRITE_TRIES)) as queue:
        [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job())
    assert job.state is JobState.DELIVERED_UNCONFIRMED
    assert job.detail == (
        "portal answered data:false after an earlier attempt that timed out, lost its connection after sending, "
        "was cut off or could not be recorded; that attempt most likely delivered the outcome"
    )
    assert [(a.kind, a.outcome) for a in job.attempts] == [("internal", "error"), ("callback", "gone")]
    assert [kind for kind, _, _ in hooks.calls] == ["succeeded"]


async def test_a_reschedule_write_that_fails_after_a_maybe_consumed_attempt_keeps_the_mark(tmp_path, hooks):
    answers = iter(
        [
            answer("retry", "ReadTimeout (after the callback was sent: the portal may have taken it)", maybe_consumed=True),
            answer("gone", "portal answered data:false"),
        ]
    )
    deliverer = ScriptedDeliverer(lambda job: next(answers))
    async with opened(FailingWrites(tmp_path / "q.sqlite3", reschedule=WRITE_TRIES)) as queue:
        [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job())
    assert job.state is JobState.DELIVERED_UNCONFIRMED
    assert [kind for kind, _, _ in hooks.calls] == ["succeeded"]


async def test_a_lost_lease_after_a_delivered_callback_is_logged_without_the_url(tmp_path, hooks, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.worker")
    deliverer = ScriptedDeliverer(lambda job: answer("delivered", "portal answered data:true"))
    job = make_job()
    async with opened(FailingWrites(tmp_path / "q.sqlite3", lose_lease=True)) as queue:
        worker = make_worker(queue, Executor(result), deliverer, hooks)
        await worker.start()
        try:
            await queue.enqueue(job, job.id, lease_owner=None, lease_seconds=5)
            worker.wake()
            await eventually(lambda: any("lease was lost" in r.getMessage() for r in caplog.records), "the lost lease is logged")
        finally:
            await worker.stop(grace=1)
    [record] = [r for r in caplog.records if "lease was lost" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert (
        record.getMessage()
        == f"job {job.id}: the lease was lost before the final state delivered could be recorded although the portal took this callback; another worker has the job"
    )
    assert hooks.calls == []


# -- stopping cuts off POSTs: those (and only those) may have reached the portal ----------
async def test_posts_cut_off_by_the_stop_grace_are_remembered_as_maybe_delivered(queue, hooks):
    hang = asyncio.Event()

    async def hung(job: Job) -> DeliveryResult:
        await hang.wait()
        return answer("delivered")

    deliverer = ScriptedDeliverer(hung)
    worker = make_worker(queue, Executor(result), deliverer, hooks)
    jobs = [make_job() for _ in range(FAST.max_in_flight_per_portal + 1)]
    await worker.start()
    for job in jobs:
        await queue.enqueue(job, job.id, lease_owner=None, lease_seconds=5)
    worker.wake()
    await eventually(lambda: worker.lanes.users("portal.test") == len(jobs), "every job is in the portal's lane")
    await worker.stop(grace=0.1)
    posted = {job_id for job_id, _ in deliverer.sent}
    assert len(posted) == FAST.max_in_flight_per_portal  # the last one waited in line: never POSTed
    stored = {job.id: await queue.get(job.id) for job in jobs}
    assert {job_id: (job.state, job.maybe_delivered) for job_id, job in stored.items()} == {job.id: (JobState.DELIVERING, job.id in posted) for job in jobs}

    restarted = make_worker(queue, Executor(result), ScriptedDeliverer(lambda job: answer("gone", "portal answered data:false")), hooks)
    await restarted.start()
    try:
        restarted.wake()
        final = {job.id: (await wait_final(queue, job.id)).state for job in jobs}
    finally:
        await restarted.stop(grace=1)
    assert final == {job.id: JobState.DELIVERED_UNCONFIRMED if job.id in posted else JobState.GONE for job in jobs}


# -- the lane: a full line defers, never past the ttl; the hooks run outside the slot -------
async def test_a_delivery_whose_portal_line_is_full_is_deferred_and_counted(queue, hooks):
    worker = make_worker(queue, Executor(result), ScriptedDeliverer(lambda job: answer("delivered")), hooks)
    worker.lanes = FullLanes(1)
    job = make_job()
    await worker.start()
    try:
        await queue.enqueue(job, job.id, lease_owner=None, lease_seconds=5)
        worker.wake()
        await eventually(lambda: worker.metrics.delivery_deferred.labels("portal.test")._value.get() == 1, "the delivery is deferred")
        await eventually(lambda: job.id not in worker._deliveries, "the deferred job is handed back")
    finally:
        await worker.stop(grace=1)
    stored = await queue.get(job.id)
    assert stored.state is JobState.DELIVERING and stored.attempts == [] and stored.delivery_attempts == 0
    assert time.time() < stored.next_at <= time.time() + FAST.read_timeout
    assert await queue.claim("other", 0, 5, delivery_limit=10) == []  # the lease is given back, the job waits for next_at
    assert 'gateway_delivery_deferred_total{portal="portal.test"} 1.0' in worker.metrics.render().decode()


async def test_a_delivery_whose_portal_line_stays_full_expires_at_its_ttl(queue, hooks):
    deliverer = ScriptedDeliverer(lambda job: answer("delivered"))
    worker = make_worker(queue, Executor(result), deliverer, hooks)
    worker.lanes = FullLanes(1)
    [job] = await run_jobs(worker, queue, make_job(ttl=0.5))  # each deferral (1-2 s) would outlast the ttl
    assert job.state is JobState.EXPIRED and job.detail == "the ttl passed before the outcome could be delivered"
    assert job.next_at <= job.deadline  # never deferred past the ttl
    assert deliverer.sent == [] and worker.metrics.delivery_deferred.labels("portal.test")._value.get() >= 1
    assert [(kind, error.reason) for kind, _, error in hooks.calls] == [("failed", "expired")]


class SlowHooks(Hooks):
    """A plugin whose ``task_succeeded`` takes as long as ``release`` says."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    @hookimpl
    async def task_succeeded(self, task: Any, result: Any) -> None:
        self.calls.append(("succeeded", task.job_id, result))
        await self.release.wait()


async def test_a_slow_hook_does_not_hold_the_portal_lane(queue, monkeypatch):
    monkeypatch.setenv("GATEWAY_LOAD_PLUGINS", "")
    hooks = SlowHooks()
    one_slot = DeliverySettings(connect_timeout=1, read_timeout=2, backoff_initial=0.01, backoff_max=0.05, max_in_flight_per_portal=1)
    deliverer = ScriptedDeliverer(lambda job: answer("delivered"), one_slot)
    worker = make_worker(queue, Executor(result), deliverer, hooks)
    jobs = [make_job(), make_job()]
    await worker.start()
    try:
        for job in jobs:
            await queue.enqueue(job, job.id, lease_owner=None, lease_seconds=5)
        worker.wake()
        await eventually(lambda: len(hooks.calls) >= 1, "the first job's hook is called")
        await eventually(lambda: len(deliverer.sent) == 2, "the second callback is POSTed while the first job's hook still runs")
        hooks.release.set()
        assert {(await wait_final(queue, job.id)).state for job in jobs} == {JobState.DELIVERED}
    finally:
        hooks.release.set()
        await worker.stop(grace=1)


async def test_data_false_after_plain_failures_is_still_gone(queue, hooks):
    answers = iter([answer("retry", "ConnectError: refused"), answer("gone", "portal answered data:false")])
    deliverer = ScriptedDeliverer(lambda job: next(answers))
    [job] = await run_jobs(make_worker(queue, Executor(result), deliverer, hooks), queue, make_job())
    assert job.state is JobState.GONE


# -- delivery has its own pool, one lane per portal ---------------------------------------
async def test_a_hung_portal_holds_neither_model_slots_nor_other_portals(queue, hooks):
    release = asyncio.Event()

    async def hang_for_slow(job: Job) -> DeliveryResult:
        if portal_host(job.callback_url) == "slow.test":
            await release.wait()
        return answer("delivered")

    deliverer = ScriptedDeliverer(hang_for_slow)
    worker = make_worker(queue, Executor(result), deliverer, hooks, concurrency=1)
    await worker.start()
    try:
        slow = [make_job("http://slow.test/cb?hash=s") for _ in range(5)]
        fast = [make_job("http://fast.test/cb?hash=f") for _ in range(3)]
        for job in slow + fast:
            await queue.enqueue(job, job.id, lease_owner=None, lease_seconds=5)
        worker.wake()
        finished = [await wait_final(queue, job.id) for job in fast]  # one model slot, the slow portal hung
        assert {job.state for job in finished} == {JobState.DELIVERED}
        assert deliverer.most_in_flight["slow.test"] == FAST.max_in_flight_per_portal
        assert [(await queue.get(job.id)).state for job in slow] == [JobState.DELIVERING] * len(slow)
        release.set()
        assert {(await wait_final(queue, job.id)).state for job in slow} == {JobState.DELIVERED}
        assert deliverer.most_in_flight["slow.test"] == FAST.max_in_flight_per_portal
    finally:
        await worker.stop(grace=1)


async def test_a_portal_lane_admits_a_bounded_line():
    lanes = PortalLanes(per_portal=1)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> bool:
        async with lanes.slot("p") as admitted:
            entered.set()
            await release.wait()
            return admitted

    holders = [asyncio.ensure_future(hold()) for _ in range(lanes.max_users)]
    await asyncio.wait_for(entered.wait(), 5)
    async with lanes.slot("p") as admitted:
        assert not admitted  # the line is full: the worker defers this one
    async with lanes.slot("other") as admitted:
        assert admitted  # another portal's lane is free
    release.set()
    assert await asyncio.gather(*holders) == [True] * lanes.max_users
    assert lanes.users("p") == 0


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("http://127.0.0.1:abc/cb?hash=x", "the callback cannot be sent: callback URL: is not a valid URL (Invalid port: 'abc')"),
        ("http://127.0.0.1/c\tb?hash=x", "the callback cannot be sent: callback URL: contains '\\t' at position 18"),
        ("http://127.0.0.1:70000/cb?hash=x", "the callback cannot be sent: callback URL: port 70000 is out of range (1-65535)"),
        ("http://127.0.0.1/cb?hash=\ud800", "the callback cannot be sent: callback URL: contains '\\ud800'"),
        ("http://a..127.0.0.1/cb?hash=x", "the callback cannot be sent: callback URL: the host name has an empty label"),
    ],
)
async def test_a_callback_url_httpx_refuses_is_refused_not_raised(url, detail):
    deliverer = Deliverer(OutboundPolicy(["127.0.0.1"], True), FAST)
    await deliverer.open()
    try:
        job = make_job(url)
        job.outcome = Outcome(result={"kind": "text", "text": "hi", "usage": None})
        delivery = await deliverer.attempt(job)
    finally:
        await deliverer.close()
    assert delivery.outcome == "refused"
    assert delivery.attempt.detail.startswith(detail)


def test_the_per_portal_cap_is_a_config_key(tmp_path):
    from gateway.config import ConfigError

    def delivery(**settings: Any) -> DeliverySettings:
        return parse_config(make_config("http://127.0.0.1:9", delivery=settings), tmp_path / "gateway.yaml").delivery

    assert delivery().max_in_flight_per_portal == 8
    assert delivery(max_in_flight_per_portal=3).max_in_flight_per_portal == 3
    with pytest.raises(ConfigError, match=r"delivery.max_in_flight_per_portal.*must be at least 1"):
        delivery(max_in_flight_per_portal=0)


def test_portal_metric_labels_are_capped():
    """Hosts come from the request body: past the cap they share one label, /metrics stays bounded."""
    from gateway.metrics import MAX_PORTAL_LABELS, Metrics

    metrics = Metrics()
    for i in range(MAX_PORTAL_LABELS + 50):
        metrics.delivery_failures.labels(f"p{i}.bitrix24.com", "retry").inc()
        metrics.delivery_latency.labels(f"p{i}.bitrix24.com").observe(0.01)
    text = metrics.render().decode()
    assert text.count("gateway_delivery_failures_total{") == MAX_PORTAL_LABELS + 1
    assert 'gateway_delivery_failures_total{outcome="retry",portal="other"} 50.0' in text
    assert f'portal="p{MAX_PORTAL_LABELS - 1}.bitrix24.com"' in text and f'portal="p{MAX_PORTAL_LABELS}.bitrix24.com"' not in text
