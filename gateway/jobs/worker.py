"""The worker: claim a job, run its task through the route, store the outcome, deliver it.

The outcome is stored before the first callback POST, so a failed or repeated delivery
never runs the model again. Each state change is conditional on this worker's lease;
the final one fires ``task_succeeded`` or ``task_failed`` exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pluggy

from gateway.adapters import AdapterError, ImageResult, Recording, invoke, result_from_json
from gateway.config import Config, EngineConfig, RouteTarget
from gateway.delivery import Deliverer
from gateway.files import ImageHost
from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome
from gateway.jobs.queue import JobQueue
from gateway.metrics import Metrics
from gateway.plugins import call_hook, notify
from gateway.recordings import DownloadError, RecordingFetcher
from gateway.redaction import redact
from gateway.routing import Router
from gateway.tasks import Category, TaskRefused

log = logging.getLogger("gateway.worker")

PRUNE_BATCH = 500
PRUNE_INTERVAL = 300.0
DELIVERY_FAILURE_STATES = {"gone": JobState.GONE, "rejected": JobState.DEAD, "refused": JobState.DEAD}


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
        retention_seconds: float = 7 * 86400, images: ImageHost | None = None,
    ) -> None:
        self.queue, self.executor, self.deliverer, self.pm, self.metrics = queue, executor, deliverer, pm, metrics
        self.concurrency, self.lease_seconds, self.poll_interval = concurrency, lease_seconds, poll_interval
        self.retention_seconds = retention_seconds
        self.images = images
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._reserved = 0
        self._wake = asyncio.Event()
        self._backlog = False
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []

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
        self._spawn(job)

    def wake(self) -> None:
        """A job is waiting that this worker does not hold yet: claim soon."""
        self._backlog = True
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loops = [asyncio.create_task(self._dispatch(), name="gateway-dispatch"), asyncio.create_task(self._heartbeat(), name="gateway-heartbeat")]

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, let running jobs finish for ``grace`` seconds, hand the rest back.

        Leases keep being renewed during the grace period; the jobs still running after it
        are cancelled and released, so that a restart resumes them at once."""
        self._stopping = True
        dispatch, heartbeat = self._loops
        dispatch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatch
        running = list(self._inflight.values())
        if running:
            await asyncio.wait(running, timeout=grace)
        unfinished = [job_id for job_id, task in self._inflight.items() if not task.done()]
        cut_off = [self._inflight[job_id] for job_id in unfinished]
        for task in cut_off:
            task.cancel()
        await asyncio.gather(*cut_off, return_exceptions=True)
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        if unfinished:
            await self.queue.release(self.owner, unfinished)
            log.info("handed %d unfinished job(s) back to the queue", len(unfinished))

    async def _dispatch(self) -> None:
        """Claim due jobs when told there may be some, and every ``poll_interval`` regardless
        (other processes' jobs, retries falling due, leases running out)."""
        while True:
            # Cleared before claiming: a wake() that arrives during the claim round trip
            # must end the wait below, not be erased by it.
            self._wake.clear()
            self._backlog = False
            free = self.concurrency - len(self._inflight) - self._reserved
            if free > 0:
                try:
                    jobs = await self.queue.claim(self.owner, free, self.lease_seconds)
                except Exception:
                    log.exception("claiming jobs failed; retrying")
                    jobs = []
                for job in jobs:
                    self._spawn(job)
                if jobs and len(jobs) == free:
                    self._backlog = True  # the queue may hold more: claim again when a slot frees
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _heartbeat(self) -> None:
        """Renew the leases of running jobs; now and then, delete jobs past their retention."""
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.queue.renew(self.owner, list(self._inflight), self.lease_seconds)
                if time.monotonic() >= next_prune:
                    deleted = await self.queue.prune(time.time() - self.retention_seconds, PRUNE_BATCH)
                    next_prune = time.monotonic() + (0 if deleted == PRUNE_BATCH else min(PRUNE_INTERVAL, self.retention_seconds))
                    if deleted:
                        log.info("deleted %d job(s) past their retention", deleted)
                    if self.images is not None and (files := await self.images.delete_expired()):
                        log.info("deleted %d hosted file(s) past their retention", files)
            except Exception:
                log.exception("lease renewal or job retention failed")

    def _spawn(self, job: Job) -> None:
        task = asyncio.create_task(self._process(job), name=f"job-{job.id}")
        self._inflight[job.id] = task
        task.add_done_callback(lambda _: self._done(job.id))

    def _done(self, job_id: str) -> None:
        self._inflight.pop(job_id, None)
        if self._backlog:
            self._wake.set()

    # -- one job ----------------------------------------------------------------------
    async def _process(self, job: Job) -> None:
        try:
            if job.outcome is None:
                if time.time() >= job.deadline:
                    await self._finish(job, JobState.EXPIRED, "the ttl passed before the task could run", [])
                    return
                outcome, attempts = await self.executor.execute(job)
                if not await self.queue.store_outcome(job.id, self.owner, outcome, attempts):
                    log.warning("job %s: lease lost while running; another worker has it", job.id)
                    return
                job.outcome, job.state = outcome, JobState.DELIVERING
                log.info("job %s engine=%s outcome=%s", job.id, job.engine, "result" if outcome.result is not None else f"error code={outcome.error.code if outcome.error else '?'}")
            await self._deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: internal error; it resumes when its lease runs out", job.id)

    async def _deliver(self, job: Job) -> None:
        if time.time() >= job.deadline:
            await self._finish(job, JobState.EXPIRED, "the ttl passed before the outcome could be delivered", [])
            return
        delivery = await self.deliverer.attempt(job)
        self.metrics.delivery_attempts.labels(job.engine, job.category, delivery.outcome).inc()
        log.info("job %s callback attempt %d: %s", job.id, job.delivery_attempts + 1, delivery.attempt.detail)
        delivered_state = JobState.DELIVERED if job.outcome and job.outcome.result is not None else JobState.FAILED
        if delivery.outcome == "delivered":
            await self._finish(job, delivered_state, delivery.attempt.detail, [delivery.attempt])
        elif delivery.outcome == "gone" and job.interrupted_delivery:
            # The previous worker died during a callback: the portal consumed that one.
            detail = "portal answered data:false after an attempt interrupted by a crash, which delivered the outcome"
            await self._finish(job, delivered_state, detail, [delivery.attempt])
        elif delivery.outcome in DELIVERY_FAILURE_STATES:
            await self._finish(job, DELIVERY_FAILURE_STATES[delivery.outcome], delivery.attempt.detail, [delivery.attempt])
        else:
            next_at = time.time() + self.deliverer.backoff(job.delivery_attempts)
            if next_at >= job.deadline:
                await self._finish(job, JobState.EXPIRED, f"the ttl passed while delivery failed: {delivery.attempt.detail}", [delivery.attempt])
            else:
                await self.queue.reschedule(job.id, self.owner, next_at, delivery.attempt)

    async def _finish(self, job: Job, state: JobState, detail: str, attempts: list[Attempt]) -> None:
        if not await self.queue.finish(job.id, self.owner, state, detail, attempts):
            return
        log.info("job %s engine=%s final=%s", job.id, job.engine, state.value)
        outcome = job.outcome
        if state is JobState.DELIVERED and outcome is not None and outcome.result is not None:
            await notify(self.pm, "task_succeeded", task=job.task, result=result_from_json(outcome.result))
            return
        if state is JobState.FAILED and outcome is not None and outcome.error is not None:
            error = outcome.error
        else:
            code = outcome.error.code if outcome is not None and outcome.error is not None else 0
            error = JobError(detail, code, state.value)
        await notify(self.pm, "task_failed", task=job.task, error=error)
