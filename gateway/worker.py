"""The worker: claim a job, have it executed (:mod:`gateway.execution`), store the outcome, deliver it.

The outcome is stored before the first callback POST, so a failed or repeated delivery
never runs the model again. Each state change is conditional on this worker's lease;
the final one fires ``task_succeeded`` or ``task_failed`` exactly once per final state reached:
a ``dead`` job the operator re-delivers (``gateway jobs redeliver``) becomes final again and
fires again. A job the operator cancels is claimed like any other with an outcome to deliver:
its error goes to ``errorCallbackUrl`` and it ends ``failed`` (one ``task_failed``).

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
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import pluggy

from gateway.adapters import result_from_json
from gateway.backoff import Backoff
from gateway.delivery import Deliverer, DeliveryResult, PortalLanes, delivery_url, portal_host
from gateway.jobs.model import Job
from gateway.jobs.queue import JobQueue, QueueStoreError
from gateway.metrics import Metrics
from gateway.outcomes import Attempt, AttemptKind, AttemptOutcome, DeliveryOutcome, ErrorReason, JobError, JobState, Outcome
from gateway.plugins import notify
from gateway.redaction import Redactor
from gateway.supervision import Supervisor
from gateway.tasks import Task

log = logging.getLogger("gateway.worker")

PRUNE_BATCH = 1000
PRUNE_BACKLOG_PAUSE = 0.5
"""Seconds between batches while a backlog of expired jobs is deleted: up to 2,000 jobs/s a process."""
PRUNE_INTERVAL = 300.0
DELIVERY_FAILURE_STATES = {DeliveryOutcome.GONE: JobState.GONE, DeliveryOutcome.REJECTED: JobState.DEAD, DeliveryOutcome.REFUSED: JobState.DEAD}
MAX_INTERNAL_ERRORS = 5
"""Unexpected errors one job may meet (running or delivering it) before the worker gives up on it."""
DELIVERY_CAPACITY = 512
"""Deliveries one process holds at a time (in flight or waiting in a portal's lane); more stay in the queue."""
STAGES = {"execute": "running the task", "deliver": "delivering the outcome"}
WRITE_TRIES = 7
"""Tries of a queue write that records finished work (a stored outcome, a callback POST's answer):
failing it would run the model or POST the outcome again."""
WRITE_BACKOFF = Backoff(0.05, maximum=2.0)
"""Seconds before the second try of that write, doubled for each next one: the tries span about
3 s, long enough for a database restart or failover to be over before the work is given up."""


def maybe_reached_note(maybe_delivered: bool) -> str:
    """The note added to a final state's detail when an earlier callback POST may have reached the portal."""
    return " (an earlier attempt may have reached the portal)" if maybe_delivered else ""


class Executor(Protocol):
    """What runs a task (:class:`gateway.execution.TaskExecutor`): its outcome and the attempts
    that led to it. The worker only stores and delivers what it answers."""

    async def execute(self, task: Task) -> tuple[Outcome, list[Attempt]]: ...


class Worker:
    def __init__(
        self,
        *,
        queue: JobQueue,
        executor: Executor,
        deliverer: Deliverer,
        pm: pluggy.PluginManager,
        metrics: Metrics,
        concurrency: int,
        lease_seconds: float,
        poll_interval: float,
        retention_seconds: float = 7 * 86400,
        supervisor: Supervisor | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.queue, self.executor, self.deliverer, self.pm, self.metrics = queue, executor, deliverer, pm, metrics
        self.concurrency, self.lease_seconds, self.poll_interval = concurrency, lease_seconds, poll_interval
        self.retention_seconds = retention_seconds
        self.supervisor = supervisor or Supervisor(metrics)
        self.redactor = redactor or Redactor()
        """Masks the runtime's secrets in the error texts stored with a job."""
        self.lanes = PortalLanes(deliverer.settings.max_in_flight_per_portal)
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._inflight: dict[str, asyncio.Task[None]] = {}
        """Jobs holding a model-work slot (``concurrency`` of them)."""
        self._deliveries: dict[str, asyncio.Task[None]] = {}
        """Jobs whose stored outcome is being delivered (in flight or waiting in their portal's lane)."""
        self._maybe_sent: set[str] = set()
        """Jobs held here whose callback may have reached the portal: a POST started (or a crash cut one off)."""
        self._reserved = 0
        """Slots taken but not in ``_inflight``: a job being stored by :meth:`admit`, a synchronous request (:meth:`model_slot`)."""
        self._slot_freed = asyncio.Event()
        self._wake = asyncio.Event()
        self._backlog = False
        self._stopping = False

    # -- jobs accepted by this process ----------------------------------------------
    async def admit(self, job: Job, idempotency_key: str) -> tuple[Job, bool]:
        """Store a job accepted by this process: ``(stored_job, created)`` as :meth:`JobQueue.enqueue`.

        When a model slot is free the job is stored already leased to this worker and starts at
        once (no claim round trip); otherwise the dispatch loop claims it. Whatever happens
        (an error, cancellation), a slot not handed to the job is given back."""
        reserved = len(self._inflight) + self._reserved < self.concurrency and not self._stopping
        handed_over = False
        if reserved:
            self._reserved += 1
        try:
            stored, created = await self.queue.enqueue(job, idempotency_key, lease_owner=self.owner if reserved else None, lease_seconds=self.lease_seconds)
            if created and reserved:
                self._reserved -= 1
                handed_over = True
                self._start(stored)
        finally:
            if reserved and not handed_over:
                self._reserved -= 1
        if created and not handed_over:
            self.wake()
        return stored, created

    def wake(self) -> None:
        """A job is waiting that this worker does not hold yet: claim soon."""
        self._backlog = True
        self._wake.set()

    # -- synchronous requests (the OpenAI-compatible API) ------------------------------
    @contextlib.asynccontextmanager
    async def model_slot(self, timeout: float) -> AsyncIterator[bool]:
        """Hold one of the ``concurrency`` model-work slots for a request served while its client
        waits (no queue): it counts against the same limit as queued jobs, which are claimed into
        the slots left. Yields False when no slot freed up within ``timeout`` seconds (or the
        worker is stopping); the caller then answers "busy"."""
        deadline = time.monotonic() + timeout
        while self._stopping or len(self._inflight) + self._reserved >= self.concurrency:
            remaining = deadline - time.monotonic()
            if self._stopping or remaining <= 0:
                yield False
                return
            freed = asyncio.ensure_future(self._slot_freed.wait())
            try:  # a running job ends, or another request gives its slot back
                await asyncio.wait([freed, *self._inflight.values()], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                freed.cancel()
        self._reserved += 1
        try:
            yield True
        finally:
            self._reserved -= 1
            self._slot_freed.set()
            self._slot_freed = asyncio.Event()
            if self._backlog:
                self._wake.set()  # queued jobs may take the slot

    # -- lifecycle ------------------------------------------------------------------
    def wake_at(self, when: float) -> None:
        """Claim again at Unix time ``when``: a job this worker put back (a retry, a deferral) falls due
        then, and waiting for it costs no poll. Should this process stop first, the poll of any
        process finds the job."""
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + max(0.0, when - time.time()), self.wake)

    async def start(self) -> None:
        self.queue.subscribe(self.wake)
        self.supervisor.start("worker-dispatch", self._dispatch)
        self.supervisor.start("worker-heartbeat", self._heartbeat)
        self.supervisor.start("worker-retention", self._retention)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, let running jobs finish for ``grace`` seconds, hand the rest back.

        Leases keep being renewed during the grace period; the jobs still running after it
        (model work or delivery) are cancelled and released, so that a restart resumes them at once.
        A job whose callback POST had started is released marked maybe-delivered: should the
        retry get ``data:false``, the cut-off POST most likely reached the portal."""
        self._stopping = True
        await self.supervisor.stop("worker-dispatch")
        with contextlib.suppress(TimeoutError):  # settle() waits for a delivery that starts during the grace too
            await asyncio.wait_for(self.settle(), grace)
        held = {**self._inflight, **self._deliveries}
        unfinished = [job_id for job_id, task in held.items() if not task.done()]
        maybe_sent = {job_id for job_id in unfinished if job_id in self._maybe_sent}  # read before cancelling clears it
        cut_off = [held[job_id] for job_id in unfinished]
        for task in cut_off:
            task.cancel()
        await asyncio.gather(*cut_off, return_exceptions=True)
        await self.supervisor.stop("worker-heartbeat")
        await self.supervisor.stop("worker-retention")
        if unfinished:
            await self.queue.release(self.owner, unfinished, maybe_delivered=maybe_sent)
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
            await self.claim_once()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def claim_once(self) -> list[Job]:
        """Claim the due jobs that fit the free model slots and delivery capacity, and start them."""
        free = self.concurrency - len(self._inflight) - self._reserved
        free_deliveries = DELIVERY_CAPACITY - len(self._deliveries)
        if free <= 0 and free_deliveries <= 0:
            return []
        try:
            jobs = await self.queue.claim(self.owner, max(free, 0), self.lease_seconds, delivery_limit=max(free_deliveries, 0))
        except QueueStoreError as exc:  # the database is away (a restart, a failover): one line, no traceback
            log.warning("claiming jobs failed: %s; retrying", exc)
            return []
        except Exception:
            log.exception("claiming jobs failed; retrying")
            return []
        for job in jobs:
            self._start(job)
        to_run = sum(1 for job in jobs if job.outcome is None)
        if (free > 0 and to_run == free) or (free_deliveries > 0 and len(jobs) - to_run == free_deliveries):
            self._backlog = True  # the queue may hold more: claim again when a slot frees
        return jobs

    async def settle(self) -> None:
        """Wait until every job this worker holds has come to rest: final, rescheduled or handed back
        (a job that moves from its model slot to delivery is waited for too)."""
        while running := [*self._inflight.values(), *self._deliveries.values()]:
            await asyncio.wait(running)

    async def _heartbeat(self) -> None:
        """Renew the leases of the jobs this worker holds (running or delivering)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.queue.renew(self.owner, [*self._inflight, *self._deliveries], self.lease_seconds)
            except QueueStoreError as exc:
                log.warning("lease renewal failed: %s; retrying", exc)
            except Exception:
                log.exception("lease renewal failed; retrying")

    async def _retention(self) -> None:
        """Delete final jobs past their retention, a batch at a time (hosted files have their own loop, in the runtime)."""
        pause = self.lease_seconds / 3
        while True:
            await asyncio.sleep(pause)
            deleted = 0
            try:
                deleted = await self.queue.prune(time.time() - self.retention_seconds, PRUNE_BATCH)
                if deleted:
                    log.info("deleted %d job(s) past their retention", deleted)
            except Exception:
                log.exception("job retention failed; trying again later")
            pause = PRUNE_BACKLOG_PAUSE if deleted == PRUNE_BATCH else min(PRUNE_INTERVAL, self.retention_seconds)

    def _start(self, job: Job) -> None:
        """A job this worker now holds: to a model slot, or straight to delivery if its outcome is stored."""
        if job.outcome is not None:
            self._hand_to_delivery(job)
            return
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._inflight[job.id] = task
        task.add_done_callback(lambda done: self._done(self._inflight, job.id, done))

    def _hand_to_delivery(self, job: Job) -> None:
        if job.interrupted_delivery:
            self._maybe_sent.add(job.id)
        task = asyncio.create_task(self._deliver_in_lane(job), name=f"callback-{job.id}")
        self._deliveries[job.id] = task
        task.add_done_callback(lambda done: self._done(self._deliveries, job.id, done))

    def _done(self, held: dict[str, asyncio.Task[None]], job_id: str, task: asyncio.Task[None]) -> None:
        if held.get(job_id) is task:  # the job may already be held again, by a newer task
            del held[job_id]
            if held is self._deliveries:
                self._maybe_sent.discard(job_id)
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
            outcome, attempts = await self.executor.execute(job.task)
            # A result is worth waiting for: the database may be back within a lease (a restart, a failover).
            if not await self._write(job, lambda: self.queue.store_outcome(job.id, self.owner, outcome, attempts), patience=self.lease_seconds):
                log.warning("job %s: lease lost while running; another worker has it", job.id)
                return
            job.outcome, job.state = outcome, JobState.DELIVERING
            log.debug(
                "job %s engine=%s outcome=%s",
                job.id,
                job.engine,
                "result" if outcome.result is not None else f"error code={outcome.error.code if outcome.error else '?'}",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._internal_error(job, "execute", exc, started)
            return
        self._hand_to_delivery(job)

    async def _deliver_in_lane(self, job: Job) -> None:
        """Wait for a slot in the portal's lane and POST; then, with the slot given back, record the
        answer and call the hooks (a slow write or plugin holds none of the portal's slots). When
        too many already wait, put the job back for a while, never past its ttl: a job whose
        portal stays busy ends ``expired`` at its ttl like any other."""
        started = time.time()
        host = portal_host(delivery_url(job))
        delivery: DeliveryResult | None = None
        try:
            async with self.lanes.slot(host) as admitted:
                if admitted and time.time() < job.deadline:
                    self._maybe_sent.add(job.id)
                    delivery = await self.deliverer.attempt(job)
            if delivery is not None:
                await self._record_delivery(job, host, delivery)
            elif admitted or time.time() >= job.deadline:
                unconfirmed = job.interrupted_delivery or job.maybe_delivered
                await self._finish(job, JobState.EXPIRED, "the ttl passed before the outcome could be delivered" + maybe_reached_note(unconfirmed), [])
            else:
                self.metrics.delivery_deferred.labels(host).inc()
                pause = self.deliverer.deferral.delay(0)
                log.debug("job %s: %d callbacks to %s are in flight or waiting; delivery deferred by %.1f s", job.id, self.lanes.users(host), host, pause)
                until = min(time.time() + pause, job.deadline)
                if await self.queue.defer(job.id, self.owner, until, maybe_delivered=job.interrupted_delivery):
                    self.wake_at(until)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The POST may have reached the portal (it said data:true, or the answer was lost):
            # the retry must read a data:false as delivered, and the job must keep a crash's mark.
            sent = delivery is not None and (delivery.outcome == DeliveryOutcome.DELIVERED or delivery.maybe_consumed)
            await self._internal_error(job, "deliver", exc, started, maybe_delivered=sent or job.interrupted_delivery or job.maybe_delivered)

    async def _record_delivery(self, job: Job, host: str, delivery: DeliveryResult) -> None:
        """Turn a callback POST's answer into the job's next step: final, or another attempt later."""
        unconfirmed = job.interrupted_delivery or job.maybe_delivered
        self.metrics.delivery_attempts.labels(job.engine, job.category, delivery.outcome).inc()
        self.metrics.delivery_latency.labels(host).observe(delivery.attempt.duration)
        if delivery.outcome != DeliveryOutcome.DELIVERED:
            self.metrics.delivery_failures.labels(host, delivery.outcome).inc()
        # One INFO line per job (its final state, below); an attempt is worth INFO only when it did not deliver.
        log.log(
            logging.DEBUG if delivery.outcome == DeliveryOutcome.DELIVERED else logging.INFO,
            "job %s callback attempt %d: %s",
            job.id,
            job.delivery_attempts + 1,
            delivery.attempt.detail,
        )
        delivered_state = JobState.DELIVERED if job.outcome and job.outcome.result is not None else JobState.FAILED
        if delivery.outcome == DeliveryOutcome.DELIVERED:
            await self._finish(job, delivered_state, delivery.attempt.detail, [delivery.attempt])
        elif delivery.outcome == DeliveryOutcome.GONE and unconfirmed:
            # An earlier attempt timed out or broke after the body was sent, or a crash cut it
            # off: the portal took that one, most likely, but never said so.
            why = (
                "an attempt interrupted by a crash"
                if job.interrupted_delivery
                else "an earlier attempt that timed out, lost its connection after sending, was cut off or could not be recorded"
            )
            detail = f"portal answered data:false after {why}; that attempt most likely delivered the outcome"
            await self._finish(job, JobState.DELIVERED_UNCONFIRMED, detail, [delivery.attempt])
        elif delivery.outcome in DELIVERY_FAILURE_STATES:
            await self._finish(job, DELIVERY_FAILURE_STATES[delivery.outcome], delivery.attempt.detail, [delivery.attempt])
        elif delivery.outcome == DeliveryOutcome.ERROR:
            await self._internal_error(job, "deliver", delivery.attempt.detail, delivery.attempt.started_at, delivery.attempt, maybe_delivered=unconfirmed)
        else:
            maybe_delivered = unconfirmed or delivery.maybe_consumed
            next_at = self.deliverer.backoff.next_at(job.delivery_attempts, job.deadline)
            if next_at is None:
                detail = f"the ttl passed while delivery failed: {delivery.attempt.detail}{maybe_reached_note(maybe_delivered)}"
                await self._finish(job, JobState.EXPIRED, detail, [delivery.attempt])
            else:
                if await self._write(job, lambda: self.queue.reschedule(job.id, self.owner, next_at, delivery.attempt, maybe_delivered=maybe_delivered)):
                    self.wake_at(next_at)

    async def _write(self, job: Job, write: Callable[[], Awaitable[bool]], *, patience: float = 0.0) -> bool:
        """A queue write that records finished work, tried ``WRITE_TRIES`` times and, with ``patience``,
        for at least that many seconds: if it failed for good, the task would run again or the job be
        POSTed again (a portal that said data:true answers data:false)."""
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                return await write()
            except QueueStoreError as exc:
                if tries >= WRITE_TRIES and time.monotonic() - started >= patience:
                    raise
                log.warning("job %s: recording its progress failed (%s); trying again", job.id, exc)
                await asyncio.sleep(WRITE_BACKOFF.delay(tries - 1))

    async def _internal_error(
        self, job: Job, stage: str, error: Exception | str, started: float, attempt: Attempt | None = None, *, maybe_delivered: bool = False
    ) -> None:
        """Record an unexpected error on the job and try it again later; after too many (or past
        the ttl) give up: a job without an outcome gets an error outcome to deliver, a job whose
        delivery keeps failing ends ``dead`` with the reason. ``maybe_delivered``: a callback POST
        may have reached the portal, remembered so that a retry's data:false means delivered.
        Never raises (but for cancellation)."""
        reason = error if isinstance(error, str) else self.redactor.redact(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        if isinstance(error, QueueStoreError):  # the database is away: one line, it is not this job's bug
            log.warning("job %s: the queue could not be written while %s: %s", job.id, STAGES[stage], reason)
        elif isinstance(error, Exception):
            log.error("job %s: unexpected error while %s: %s", job.id, STAGES[stage], reason, exc_info=error)
        self.metrics.job_errors.labels(stage).inc()
        attempt = attempt or Attempt(AttemptKind.INTERNAL, stage, started, time.time() - started, AttemptOutcome.ERROR, reason[:500])
        errors = job.internal_errors + 1
        try:
            next_at = self.deliverer.backoff.next_at(errors - 1, job.deadline)
            if errors < MAX_INTERNAL_ERRORS and next_at is not None:
                if await self.queue.retry_later(job.id, self.owner, next_at, attempt, maybe_delivered=maybe_delivered):
                    job.internal_errors = errors
                    self.wake_at(next_at)
                    log.info("job %s: unexpected error %d of at most %d; trying again in %.1f s", job.id, errors, MAX_INTERNAL_ERRORS, next_at - time.time())
                return
            gave_up = f"gave up after {errors} unexpected error(s)" if errors >= MAX_INTERNAL_ERRORS else "the ttl leaves no time to try again"
            if job.outcome is None:  # the portal hears of it: an error outcome, delivered like any other
                kind = error if isinstance(error, str) else type(error).__name__
                outcome = Outcome(error=JobError(f"the gateway failed while running the task: {kind}", 500, ErrorReason.INTERNAL))
                if await self.queue.store_outcome(job.id, self.owner, outcome, [attempt]):
                    job.outcome, job.state = outcome, JobState.DELIVERING
                    log.warning("job %s: %s while running the task; delivering an error", job.id, gave_up)
                    self._hand_to_delivery(job)
                return
            await self._finish(job, JobState.DEAD, f"{gave_up} while {STAGES[stage]}: {reason}{maybe_reached_note(maybe_delivered)}", [attempt])
        except asyncio.CancelledError:
            raise
        except QueueStoreError as exc:
            log.warning("job %s: the error could not be recorded (%s); the job resumes when its lease runs out", job.id, exc)
        except Exception:
            log.exception("job %s: the error could not be recorded; the job resumes when its lease runs out", job.id)

    async def _finish(self, job: Job, state: JobState, detail: str, attempts: list[Attempt]) -> None:
        """Record the final state (the write tried a few times), then call the outcome hooks, once."""
        if not await self._write(job, lambda: self.queue.finish(job.id, self.owner, state, detail, attempts)):
            taken = " although the portal took this callback" if any(a.outcome == DeliveryOutcome.DELIVERED for a in attempts) else ""
            log.warning("job %s: the lease was lost before the final state %s could be recorded%s; another worker has the job", job.id, state.value, taken)
            return
        if log.isEnabledFor(logging.INFO):
            log.info("job %s engine=%s final=%s in %.2f s", job.id, job.engine, state.value, time.time() - job.accepted_at)
        await self._announce(job, state, detail)

    async def _announce(self, job: Job, state: JobState, detail: str) -> None:
        """``task_succeeded`` or ``task_failed`` for a job that just became final."""
        outcome = job.outcome
        delivered = state in (JobState.DELIVERED, JobState.DELIVERED_UNCONFIRMED)
        if delivered and outcome is not None and outcome.result is not None:
            await notify(self.pm, "task_succeeded", task=job.task, result=result_from_json(outcome.result), state=state)
            return
        if (delivered or state is JobState.FAILED) and outcome is not None and outcome.error is not None:
            error = outcome.error
        else:
            code = outcome.error.code if outcome is not None and outcome.error is not None else 0
            error = JobError(detail, code, state.value)
        await notify(self.pm, "task_failed", task=job.task, error=error, state=state)
