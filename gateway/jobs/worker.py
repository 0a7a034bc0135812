"""The worker: claim a job, run its task through the route, store the outcome, deliver it.

The outcome is stored before the first callback POST, so a failed or repeated delivery
never runs the model again. Each state change is conditional on this worker's lease;
the final one fires ``task_succeeded`` or ``task_failed`` exactly once.

Model work and callbacks have separate pools: ``workers.concurrency`` slots run tasks, and
a job whose outcome is stored gives its slot back and waits for its callback in its
portal's lane (:class:`~gateway.delivery.PortalLanes`), so a slow portal holds neither the
model slots nor the other portals' callbacks.

Nothing that goes wrong with one job stops the worker or strands the job: an unexpected
error is recorded on the job as an ``internal`` attempt and the job is tried again with
backoff, at most ``MAX_INTERNAL_ERRORS`` times and within its ttl; then a job without an
outcome gets an error outcome (delivered to ``errorCallbackUrl``) and a job whose delivery
keeps failing ends ``dead`` with the reason. The loops (dispatch, heartbeat, retention) run
under a :class:`~gateway.supervision.Supervisor`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pluggy

from gateway.adapters import AdapterError, ImageResult, Recording, invoke, result_from_json
from gateway.config import Config, EngineConfig, RouteTarget
from gateway.delivery import Deliverer, PortalLanes, delivery_url, portal_host
from gateway.files import ImageHost
from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome
from gateway.jobs.queue import JobQueue
from gateway.metrics import Metrics
from gateway.plugins import call_hook, notify
from gateway.recordings import DownloadError, RecordingFetcher
from gateway.redaction import redact
from gateway.routing import Router
from gateway.supervision import Supervisor
from gateway.tasks import Category, TaskRefused

log = logging.getLogger("gateway.worker")

PRUNE_BATCH = 500
PRUNE_INTERVAL = 300.0
DELIVERY_FAILURE_STATES = {"gone": JobState.GONE, "rejected": JobState.DEAD, "refused": JobState.DEAD}
MAX_INTERNAL_ERRORS = 5
"""Unexpected errors one job may meet (running or delivering it) before the worker gives up on it."""
DELIVERY_CAPACITY = 512
"""Deliveries one process holds at a time (in flight or waiting in a portal's lane); more stay in the queue."""
STAGES = {"execute": "running the task", "deliver": "delivering the outcome"}


class TaskExecutor:
    """Runs one task: ``prepare_task`` hooks, then the engine's route through the adapters."""

    def __init__(self, config: Config, adapters: Mapping[str, Any], router: Router, pm: pluggy.PluginManager, metrics: Metrics,
                 images: ImageHost, recordings: RecordingFetcher) -> None:
        self.config, self.adapters, self.router, self.pm, self.metrics = config, adapters, router, pm, metrics
        self.images, self.recordings = images, recordings

    async def execute(self, job: Job) -> tuple[Outcome, list[Attempt]]:
        task = job.task
        try:
            await call_hook(self.pm.hook.prepare_task, task=task)
        except TaskRefused as exc:
            return Outcome(error=JobError(redact(exc.message), exc.code, "refused")), []
        except Exception as exc:
            log.exception("job %s: a prepare_task hook failed", job.id)
            return Outcome(error=JobError(f"a plugin failed while preparing the task: {type(exc).__name__}", 500, "internal")), []
        engine = self.config.engine(job.engine)
        if engine is None:
            return Outcome(error=JobError(f"engine {job.engine!r} is no longer configured on this gateway", 503, "internal")), []
        deadline = self.router.route_deadline(job.deadline, task.ttl)
        if task.category in (Category.AUDIO, Category.CALL):
            return await self._with_recording(job, engine, deadline)
        return await self._route(job, engine, deadline, None)

    async def _with_recording(self, job: Job, engine: EngineConfig, deadline: float) -> tuple[Outcome, list[Attempt]]:
        """Download the recording once (retrying transient failures), then run the route on it."""
        prompt = job.task.prompt
        host = urlsplit(prompt["file"]).hostname or "?"
        attempts: list[Attempt] = []
        for attempt in range(self.config.routing.retries + 1):
            started = time.time()
            try:
                async with self.recordings.fetch(
                    prompt["file"], mime=prompt["fields"].get("type"), extension=prompt.get("fileExtension"),
                    timeout=max(0.0, deadline - started), job_id=job.id,
                ) as recording:
                    attempts.append(Attempt("download", host, started, time.time() - started, "ok", f"{recording.size} bytes, {recording.content_type}"))
                    outcome, route_attempts = await self._route(job, engine, deadline, recording)
                    return outcome, attempts + route_attempts
            except DownloadError as exc:
                message = redact(exc.message)
                attempts.append(Attempt("download", host, started, time.time() - started, "retryable" if exc.retryable else "final", message[:500]))
                pause = self.router.backoff(attempt)
                if not exc.retryable or attempt == self.config.routing.retries or time.time() + pause >= deadline:
                    return Outcome(error=JobError(f"the recording could not be used: {message}", exc.code, "download")), attempts
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _route(self, job: Job, engine: EngineConfig, deadline: float, recording: Recording | None) -> tuple[Outcome, list[Attempt]]:
        task = job.task

        async def run(target: RouteTarget, budget: float) -> Any:
            result = await invoke(self.adapters[target.provider], task, target.model, target.params, budget,
                                  image_sizes=engine.image_sizes, max_images=engine.max_images, recording=recording)
            if isinstance(result, ImageResult):  # hosted within the attempt: a bad image counts as its failure
                return await self.images.host(result)
            return result

        async def call(target: RouteTarget, budget: float) -> Any:
            try:
                return await asyncio.wait_for(run(target, budget), budget)
            except AdapterError:
                raise
            except TimeoutError:
                raise AdapterError(f"{target.label} did not answer within {budget:.1f}s", retryable=True) from None
            except Exception as exc:
                log.exception("job %s: adapter %s raised unexpectedly", job.id, target.provider)
                raise AdapterError(f"adapter {target.provider} failed: {type(exc).__name__}", retryable=False) from exc

        route = await self.router.run(engine.route, call, deadline)
        for attempt in route.attempts:
            self.metrics.provider_attempts.labels(job.engine, attempt.target.split("/", 1)[0], attempt.outcome).inc()
        attempts = [Attempt(a.kind, a.target, a.started_at, a.duration, a.outcome, redact(a.detail)) for a in route.attempts]
        if route.error is not None:
            error = JobError(redact(route.error.message), route.error.code, route.error.reason)
            return Outcome(error=error), attempts
        assert route.target is not None
        self.metrics.count_usage(job.engine, route.target.provider, route.target.model, getattr(route.value, "usage", None))
        return Outcome(result=route.value.to_json(), provider=route.target.label), attempts


class Worker:
    def __init__(
        self, *, queue: JobQueue, executor: TaskExecutor, deliverer: Deliverer, pm: pluggy.PluginManager,
        metrics: Metrics, concurrency: int, lease_seconds: float, poll_interval: float,
        retention_seconds: float = 7 * 86400, images: ImageHost | None = None, supervisor: Supervisor | None = None,
    ) -> None:
        self.queue, self.executor, self.deliverer, self.pm, self.metrics = queue, executor, deliverer, pm, metrics
        self.concurrency, self.lease_seconds, self.poll_interval = concurrency, lease_seconds, poll_interval
        self.retention_seconds = retention_seconds
        self.images = images
        self.supervisor = supervisor or Supervisor(metrics)
        self.lanes = PortalLanes(deliverer.settings.max_in_flight_per_portal)
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._inflight: dict[str, asyncio.Task[None]] = {}
        """Jobs holding a model-work slot (``concurrency`` of them)."""
        self._deliveries: dict[str, asyncio.Task[None]] = {}
        """Jobs whose stored outcome is being delivered (in flight or waiting in their portal's lane)."""
        self._reserved = 0
        self._wake = asyncio.Event()
        self._backlog = False
        self._stopping = False

    # -- slots for jobs accepted by this process -------------------------------------
    def reserve(self) -> bool:
        """Take a worker slot for a job about to be accepted here (saves a claim round trip)."""
        if len(self._inflight) + self._reserved >= self.concurrency or self._stopping:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1

    def submit(self, job: Job) -> None:
        """Process a job this worker already holds the lease of (see :meth:`reserve`)."""
        self._reserved -= 1
        self._start(job)

    def wake(self) -> None:
        """A job is waiting that this worker does not hold yet: claim soon."""
        self._backlog = True
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.supervisor.start("worker-dispatch", self._dispatch)
        self.supervisor.start("worker-heartbeat", self._heartbeat)
        self.supervisor.start("worker-retention", self._retention)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, let running jobs finish for ``grace`` seconds, hand the rest back.

        Leases keep being renewed during the grace period; the jobs still running after it
        (model work or delivery) are cancelled and released, so that a restart resumes them at once."""
        self._stopping = True
        await self.supervisor.stop("worker-dispatch")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # A job that finishes its model work during the grace period starts its delivery: wait for that too.
        while (running := [*self._inflight.values(), *self._deliveries.values()]) and loop.time() < deadline:
            await asyncio.wait(running, timeout=deadline - loop.time())
        held = {**self._inflight, **self._deliveries}
        unfinished = [job_id for job_id, task in held.items() if not task.done()]
        cut_off = [held[job_id] for job_id in unfinished]
        for task in cut_off:
            task.cancel()
        await asyncio.gather(*cut_off, return_exceptions=True)
        await self.supervisor.stop("worker-heartbeat")
        await self.supervisor.stop("worker-retention")
        if unfinished:
            await self.queue.release(self.owner, unfinished)
            log.info("handed %d unfinished job(s) back to the queue", len(unfinished))

    async def _dispatch(self) -> None:
        """Claim due jobs when told there may be some, and every ``poll_interval`` regardless
        (other processes' jobs, retries falling due, leases running out). Jobs to run fill the
        free model slots, jobs to deliver the free delivery capacity."""
        while True:
            # Cleared before claiming: a wake() that arrives during the claim round trip
            # must end the wait below, not be erased by it.
            self._wake.clear()
            self._backlog = False
            free = self.concurrency - len(self._inflight) - self._reserved
            free_deliveries = DELIVERY_CAPACITY - len(self._deliveries)
            if free > 0 or free_deliveries > 0:
                try:
                    jobs = await self.queue.claim(self.owner, max(free, 0), self.lease_seconds, delivery_limit=max(free_deliveries, 0))
                except Exception:
                    log.exception("claiming jobs failed; retrying")
                    jobs = []
                for job in jobs:
                    self._start(job)
                to_run = sum(1 for job in jobs if job.outcome is None)
                if (free > 0 and to_run == free) or (free_deliveries > 0 and len(jobs) - to_run == free_deliveries):
                    self._backlog = True  # the queue may hold more: claim again when a slot frees
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def _heartbeat(self) -> None:
        """Renew the leases of the jobs this worker holds (running or delivering)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.queue.renew(self.owner, [*self._inflight, *self._deliveries], self.lease_seconds)
            except Exception:
                log.exception("lease renewal failed; retrying")

    async def _retention(self) -> None:
        """Delete final jobs and hosted files past their retention, a batch at a time."""
        pause = self.lease_seconds / 3
        while True:
            await asyncio.sleep(pause)
            deleted = 0
            try:
                deleted = await self.queue.prune(time.time() - self.retention_seconds, PRUNE_BATCH)
                if deleted:
                    log.info("deleted %d job(s) past their retention", deleted)
                if self.images is not None and (files := await self.images.delete_expired()):
                    log.info("deleted %d hosted file(s) past their retention", files)
            except Exception:
                log.exception("job retention failed; trying again later")
            pause = self.lease_seconds / 3 if deleted == PRUNE_BATCH else min(PRUNE_INTERVAL, self.retention_seconds)

    def _start(self, job: Job) -> None:
        """A job this worker now holds: to a model slot, or straight to delivery if its outcome is stored."""
        if job.outcome is not None:
            self._hand_to_delivery(job)
            return
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._inflight[job.id] = task
        task.add_done_callback(lambda done: self._done(self._inflight, job.id, done))

    def _hand_to_delivery(self, job: Job) -> None:
        task = asyncio.create_task(self._deliver_in_lane(job), name=f"callback-{job.id}")
        self._deliveries[job.id] = task
        task.add_done_callback(lambda done: self._done(self._deliveries, job.id, done))

    def _done(self, held: dict[str, asyncio.Task[None]], job_id: str, task: asyncio.Task[None]) -> None:
        if held.get(job_id) is task:  # the job may already be held again, by a newer task
            del held[job_id]
        if self._backlog:
            self._wake.set()

    # -- one job ----------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        """The model work: run the task, store its outcome, then free the slot and hand the job to delivery."""
        started = time.time()
        try:
            if time.time() >= job.deadline:
                await self._finish(job, JobState.EXPIRED, "the ttl passed before the task could run", [])
                return
            outcome, attempts = await self.executor.execute(job)
            if not await self.queue.store_outcome(job.id, self.owner, outcome, attempts):
                log.warning("job %s: lease lost while running; another worker has it", job.id)
                return
            job.outcome, job.state = outcome, JobState.DELIVERING
            log.info("job %s engine=%s outcome=%s", job.id, job.engine, "result" if outcome.result is not None else f"error code={outcome.error.code if outcome.error else '?'}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._internal_error(job, "execute", exc, started)
            return
        self._hand_to_delivery(job)

    async def _deliver_in_lane(self, job: Job) -> None:
        """Wait for a slot in the portal's lane, then deliver; when too many already wait, put the job back for a while."""
        started = time.time()
        host = portal_host(delivery_url(job))
        try:
            async with self.lanes.slot(host) as admitted:
                if admitted:
                    await self._deliver(job, host)
                    return
            self.metrics.delivery_deferred.labels(host).inc()
            pause = self.deliverer.settings.read_timeout * (0.5 + random.random() / 2)
            log.debug("job %s: %d callbacks to %s are in flight or waiting; delivery deferred by %.1f s", job.id, self.lanes.users(host), host, pause)
            await self.queue.defer(job.id, self.owner, time.time() + pause)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._internal_error(job, "deliver", exc, started)

    async def _deliver(self, job: Job, host: str) -> None:
        unconfirmed = job.interrupted_delivery or job.maybe_delivered
        if time.time() >= job.deadline:
            detail = "the ttl passed before the outcome could be delivered"
            await self._finish(job, JobState.EXPIRED, detail + (" (an earlier attempt may have reached the portal)" if unconfirmed else ""), [])
            return
        delivery = await self.deliverer.attempt(job)
        self.metrics.delivery_attempts.labels(job.engine, job.category, delivery.outcome).inc()
        self.metrics.delivery_latency.labels(host).observe(delivery.attempt.duration)
        if delivery.outcome != "delivered":
            self.metrics.delivery_failures.labels(host, delivery.outcome).inc()
        log.info("job %s callback attempt %d: %s", job.id, job.delivery_attempts + 1, delivery.attempt.detail)
        delivered_state = JobState.DELIVERED if job.outcome and job.outcome.result is not None else JobState.FAILED
        if delivery.outcome == "delivered":
            await self._finish(job, delivered_state, delivery.attempt.detail, [delivery.attempt])
        elif delivery.outcome == "gone" and unconfirmed:
            # An earlier attempt timed out or broke after the body was sent, or a crash cut it
            # off: the portal took that one, most likely, but never said so.
            why = "an attempt interrupted by a crash" if job.interrupted_delivery else "an earlier attempt that timed out or lost its connection after sending"
            detail = f"portal answered data:false after {why}; that attempt most likely delivered the outcome"
            await self._finish(job, JobState.DELIVERED_UNCONFIRMED, detail, [delivery.attempt])
        elif delivery.outcome in DELIVERY_FAILURE_STATES:
            await self._finish(job, DELIVERY_FAILURE_STATES[delivery.outcome], delivery.attempt.detail, [delivery.attempt])
        elif delivery.outcome == "error":
            await self._internal_error(job, "deliver", delivery.attempt.detail, delivery.attempt.started_at, delivery.attempt)
        else:
            maybe_delivered = unconfirmed or delivery.maybe_consumed
            next_at = time.time() + self.deliverer.backoff(job.delivery_attempts)
            if next_at >= job.deadline:
                note = " (an earlier attempt may have reached the portal)" if maybe_delivered else ""
                await self._finish(job, JobState.EXPIRED, f"the ttl passed while delivery failed: {delivery.attempt.detail}{note}", [delivery.attempt])
            else:
                await self.queue.reschedule(job.id, self.owner, next_at, delivery.attempt, maybe_delivered=maybe_delivered)

    async def _internal_error(self, job: Job, stage: str, error: Exception | str, started: float, attempt: Attempt | None = None) -> None:
        """Record an unexpected error on the job and try it again later; after too many (or past
        the ttl) give up: a job without an outcome gets an error outcome to deliver, a job whose
        delivery keeps failing ends ``dead`` with the reason. Never raises (but for cancellation)."""
        reason = error if isinstance(error, str) else redact(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        if isinstance(error, Exception):
            log.error("job %s: unexpected error while %s: %s", job.id, STAGES[stage], reason, exc_info=error)
        self.metrics.job_errors.labels(stage).inc()
        attempt = attempt or Attempt("internal", stage, started, time.time() - started, "error", reason[:500])
        errors = job.internal_errors + 1
        try:
            next_at = time.time() + self.deliverer.backoff(errors - 1)
            if errors < MAX_INTERNAL_ERRORS and next_at < job.deadline:
                if await self.queue.retry_later(job.id, self.owner, next_at, attempt):
                    job.internal_errors = errors
                    log.info("job %s: unexpected error %d of at most %d; trying again in %.1f s", job.id, errors, MAX_INTERNAL_ERRORS, next_at - time.time())
                return
            gave_up = f"gave up after {errors} unexpected error(s)" if errors >= MAX_INTERNAL_ERRORS else "the ttl leaves no time to try again"
            if job.outcome is None:  # the portal hears of it: an error outcome, delivered like any other
                kind = error if isinstance(error, str) else type(error).__name__
                outcome = Outcome(error=JobError(f"the gateway failed while running the task: {kind}", 500, "internal"))
                if await self.queue.store_outcome(job.id, self.owner, outcome, [attempt]):
                    job.outcome, job.state = outcome, JobState.DELIVERING
                    log.warning("job %s: %s while running the task; delivering an error", job.id, gave_up)
                    self._hand_to_delivery(job)
                return
            await self._finish(job, JobState.DEAD, f"{gave_up} while {STAGES[stage]}: {reason}", [attempt])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: the error could not be recorded; the job resumes when its lease runs out", job.id)

    async def _finish(self, job: Job, state: JobState, detail: str, attempts: list[Attempt]) -> None:
        if not await self.queue.finish(job.id, self.owner, state, detail, attempts):
            return
        log.info("job %s engine=%s final=%s", job.id, job.engine, state.value)
        outcome = job.outcome
        delivered = state in (JobState.DELIVERED, JobState.DELIVERED_UNCONFIRMED)
        if delivered and outcome is not None and outcome.result is not None:
            await notify(self.pm, "task_succeeded", task=job.task, result=result_from_json(outcome.result))
            return
        if (delivered or state is JobState.FAILED) and outcome is not None and outcome.error is not None:
            error = outcome.error
        else:
            code = outcome.error.code if outcome is not None and outcome.error is not None else 0
            error = JobError(detail, code, state.value)
        await notify(self.pm, "task_failed", task=job.task, error=error)
