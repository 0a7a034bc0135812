"""Execution: what running one task means -- the middle of the pipeline.

accept (protocol -> typed task -> queue) -> **execute** (route -> adapter -> result) ->
deliver (outcome -> callback). :class:`TaskExecutor` takes a task and returns its outcome
and the attempts that led to it: ``prepare_task`` hooks, the recording's download for
audio and call tasks, the engine's route through the adapters, hosting generated images,
usage metrics. It never raises for a failure of the task (a refused, failed or unroutable
task is an error outcome); the worker (:mod:`gateway.worker`) stores the outcome and
hands it to delivery, and knows nothing of what happened here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from gateway.adapters import AdapterError, AudioRequest, HostedImages, ImageRequest, ImageResult, TextChunk, TextRequest, TextResult, Transcript, Usage
from gateway.config import Config, EngineConfig, RouteTarget
from gateway.delivery import portal_host
from gateway.files import ImageHost
from gateway.languages import language_code
from gateway.metrics import Metrics
from gateway.outcomes import Attempt, AttemptKind, AttemptOutcome, ErrorReason, JobError, Outcome
from gateway.plugins import call_hook
from gateway.recordings import DownloadError, Recording, RecordingFetcher
from gateway.redaction import Redactor
from gateway.routing import Router
from gateway.tasks import PROMPT_TYPES, AudioPrompt, CallPrompt, ImagePrompt, Task, TaskRefused, TextPrompt
from gateway.tenants.limits import TenantLimiter

log = logging.getLogger("gateway.execution")
PORTAL = "portal"
"""The ``surface`` label of work that came from a portal (the other: ``openai``, the OpenAI-compatible API)."""


def text_request(task: Task, model: str, params: Mapping[str, Any], timeout: float) -> TextRequest:
    """The typed request for a text task: the request's temperature and max_tokens over the route's."""
    return TextRequest(
        model=model,
        messages=task.messages(),
        temperature=task.temperature if task.temperature is not None else params.get("temperature"),
        max_tokens=task.max_tokens if task.max_tokens is not None else params.get("max_tokens"),
        params={k: v for k, v in params.items() if k not in ("temperature", "max_tokens")},
        timeout=timeout,
    )


class TextStream:
    """A streamed answer whose first chunk has arrived: the route is settled (no fallback after
    the first byte), the rest is read by iterating. ``aclose`` stops the provider's call."""

    def __init__(self, first: TextChunk, rest: AsyncIterator[TextChunk]) -> None:
        self.first, self._rest = first, rest
        self.usage: Usage | None = first.usage
        self.on_end: Callable[[Usage | None], None] | None = None
        """Called once when the stream ends (fully read, failed or closed), with the usage reported."""
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        try:
            yield self.first
            async for chunk in self._rest:
                if chunk.usage is not None:
                    self.usage = chunk.usage
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._rest.aclose()  # type: ignore[attr-defined]  # an async generator: stops the provider's call
        finally:
            if self.on_end is not None:
                self.on_end(self.usage)


async def open_text_stream(adapter: Any, request: TextRequest) -> TextStream:
    """Start a streamed answer and wait for its first chunk with text (or its end); an adapter
    without ``stream`` answers in one chunk. Errors before that chunk are the attempt's own."""
    stream = getattr(adapter, "stream", None)
    if stream is None:
        result: TextResult = await adapter.complete(request)
        return TextStream(TextChunk(result.text, result.usage, "stop"), _nothing())
    chunks: AsyncIterator[TextChunk] = stream(request)
    try:
        async for chunk in chunks:
            if chunk.text or chunk.finish_reason is not None or chunk.usage is not None:
                return TextStream(chunk, chunks)
        return TextStream(TextChunk(finish_reason="stop"), _nothing())
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise


async def _nothing() -> AsyncIterator[TextChunk]:
    return
    yield  # an empty async generator


@dataclass
class Run:
    """A task run for a client that holds its connection (:meth:`TaskExecutor.run`): the value, or the error."""

    value: TextResult | HostedImages | Transcript | TextStream | None = None
    error: JobError | None = None
    target: RouteTarget | None = None
    attempts: list[Attempt] = field(default_factory=list)


async def invoke(
    adapter: Any,
    task: Task,
    model: str,
    params: Mapping[str, Any],
    timeout: float,
    *,
    image_sizes: Mapping[str, str] | None = None,
    max_images: int = 1,
    recording: Recording | None = None,
) -> TextResult | ImageResult | Transcript:
    """Build the typed request for the task's prompt and call the adapter."""
    prompt = task.prompt
    if isinstance(prompt, TextPrompt):
        text: TextResult = await adapter.complete(text_request(task, model, params, timeout))
        return text
    if isinstance(prompt, ImagePrompt):
        description = f"{prompt.style}, {prompt.text}" if prompt.style and prompt.style.strip() else prompt.text
        sizes = image_sizes or {}
        images: ImageResult = await adapter.generate_image(
            ImageRequest(
                model=model,
                prompt=description,
                size=sizes[prompt.format or "square"],
                n=max(1, min(prompt.images_number or 1, max_images)),
                params=dict(params),
                timeout=timeout,
            )
        )
        return images
    if isinstance(prompt, AudioPrompt):
        if recording is None:
            raise AdapterError("the recording was not downloaded", retryable=False)
        transcript: Transcript = await adapter.transcribe(
            AudioRequest(
                model=model,
                file=recording.path,
                filename=recording.filename,
                content_type=recording.content_type,
                language=language_code(task.language),
                prompt=prompt.hint,
                timestamps=isinstance(prompt, CallPrompt),
                params=dict(params),
                timeout=timeout,
            )
        )
        return transcript
    raise AdapterError(f"category {task.category.value!r} is not supported by this gateway version", retryable=False)


class TaskExecutor:
    """Runs one task: ``prepare_task`` hooks, then the engine's route through the adapters."""

    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, Any],
        router: Router,
        pm: pluggy.PluginManager,
        metrics: Metrics,
        images: ImageHost,
        recordings: RecordingFetcher,
        redactor: Redactor | None = None,
    ) -> None:
        self.config, self.adapters, self.router, self.pm, self.metrics = config, adapters, router, pm, metrics
        self.images, self.recordings = images, recordings
        self.redactor = redactor or Redactor()
        """Masks the runtime's secrets in error texts and attempt details before they are stored."""
        self.limiter = TenantLimiter(config.app.limits) if config.app is not None else None
        """App mode: each installed portal's limits (``app.limits``), counted in this process."""

    async def execute(self, task: Task) -> tuple[Outcome, list[Attempt]]:
        """The task's outcome (a result or an error) and the attempts that led to it; never raises
        for the task's own failure (but for cancellation and bugs, which the worker records)."""
        if not task.tenant or self.limiter is None:
            return await self._execute(task)
        over = self.limiter.admit(task.tenant, audio=isinstance(task.prompt, AudioPrompt))
        if over is not None:  # an installed portal over a limit: an error callback that says which
            limit, message = over
            self.metrics.tenant_limited.labels(task.tenant, limit).inc()
            log.info("job %s: tenant %s is over its limit %s", task.job_id, task.tenant, limit)
            return Outcome(error=JobError(message, 429, ErrorReason.LIMIT)), []
        try:
            outcome, attempts = await self._execute(task)
        finally:
            self.limiter.release(task.tenant)
        result = outcome.result or {}
        self.metrics.tenant_tasks.labels(task.tenant, "result" if outcome.result is not None else "error").inc()
        self.metrics.count_tenant_usage(task.tenant, Usage.from_json(result.get("usage")))
        if isinstance(task.prompt, AudioPrompt) and isinstance(result.get("duration"), (int, float)):
            self.limiter.record_audio(task.tenant, float(result["duration"]))
            self.metrics.tenant_audio.labels(task.tenant).inc(float(result["duration"]))
        return outcome, attempts

    async def _execute(self, task: Task) -> tuple[Outcome, list[Attempt]]:
        refused = await self.prepare(task)
        if refused is not None:
            return Outcome(error=refused), []
        engine = self.config.engine(task.engine)
        if engine is None:
            return Outcome(error=JobError(f"engine {task.engine!r} is no longer configured on this gateway", 503, ErrorReason.INTERNAL)), []
        deadline = self.router.route_deadline(task.deadline, task.ttl)
        if isinstance(task.prompt, AudioPrompt):
            return await self._with_recording(task, task.prompt, engine, deadline)
        return _outcome(await self._route(task, engine, deadline, None))

    async def prepare(self, task: Task) -> JobError | None:
        """Run the ``prepare_task`` hooks: None, or the error that ends the task (refused, or a plugin's failure)."""
        try:
            await call_hook(self.pm.hook.prepare_task, task=task)
        except TaskRefused as exc:
            return JobError(self.redactor.redact(exc.message), exc.code, ErrorReason.REFUSED)
        except Exception as exc:
            log.exception("job %s: a prepare_task hook failed", task.job_id)
            return JobError(f"a plugin failed while preparing the task: {type(exc).__name__}", 500, ErrorReason.INTERNAL)
        expected = PROMPT_TYPES[task.category]
        if type(task.prompt) is not expected:  # a plugin replaced it: the adapters could not read it
            message = f"a prepare_task hook replaced the {task.category.value} prompt with a {type(task.prompt).__name__}; assign a {expected.__name__} (dataclasses.replace)"
            log.error("job %s: %s", task.job_id, message)
            return JobError(message, 500, ErrorReason.INTERNAL)
        return None

    async def run(
        self,
        task: Task,
        deadline: float,
        *,
        surface: str,
        params: Mapping[str, Any] | None = None,
        recording: Recording | None = None,
        stream: bool = False,
    ) -> Run:
        """Run a task for a client that holds its connection (no queue, no callback): the same hooks,
        route, retries, cooldowns and usage metrics as a portal's job, labelled ``surface``.

        ``params`` are the client's own parameters, over the route target's. ``recording`` is the
        audio of an audio task (uploaded, not downloaded). With ``stream`` a text task answers a
        :class:`TextStream` once its first chunk is there: the route falls back only before it."""
        refused = await self.prepare(task)
        if refused is not None:
            return Run(error=refused)
        engine = self.config.engine(task.engine)
        if engine is None:
            return Run(error=JobError(f"engine {task.engine!r} is not configured on this gateway", 404, ErrorReason.INTERNAL))
        return await self._route(task, engine, deadline, recording, surface=surface, params=params, stream=stream)

    async def _with_recording(self, task: Task, prompt: AudioPrompt, engine: EngineConfig, deadline: float) -> tuple[Outcome, list[Attempt]]:
        """Download the recording once (retrying transient failures), then run the route on it."""
        host = portal_host(prompt.file_url)
        attempts: list[Attempt] = []
        for attempt in range(self.config.routing.retries + 1):
            started = time.time()
            try:
                async with self.recordings.fetch(
                    prompt.file_url,
                    mime=prompt.mime,
                    extension=prompt.extension,
                    timeout=max(0.0, deadline - started),
                    job_id=task.job_id,
                ) as recording:
                    detail = f"{recording.size} bytes, {recording.content_type}"
                    attempts.append(Attempt(AttemptKind.DOWNLOAD, host, started, time.time() - started, AttemptOutcome.OK, detail))
                    outcome, route_attempts = _outcome(await self._route(task, engine, deadline, recording))
                    return outcome, attempts + route_attempts
            except DownloadError as exc:
                message = self.redactor.redact(exc.message)
                ended = AttemptOutcome.RETRYABLE if exc.retryable else AttemptOutcome.FINAL
                attempts.append(Attempt(AttemptKind.DOWNLOAD, host, started, time.time() - started, ended, message[:500]))
                if not exc.retryable or attempt == self.config.routing.retries or not await self.router.backoff.sleep(attempt, deadline):
                    return Outcome(error=JobError(f"the recording could not be used: {message}", exc.code, ErrorReason.DOWNLOAD)), attempts
        raise AssertionError("unreachable")

    async def _route(
        self,
        task: Task,
        engine: EngineConfig,
        deadline: float,
        recording: Recording | None,
        *,
        surface: str = PORTAL,
        params: Mapping[str, Any] | None = None,
        stream: bool = False,
    ) -> Run:
        async def run(target: RouteTarget, budget: float) -> Any:
            merged = {**target.params, **params} if params else target.params
            if stream and isinstance(task.prompt, TextPrompt):
                return await open_text_stream(self.adapters[target.provider], text_request(task, target.model, merged, budget))
            result = await invoke(
                self.adapters[target.provider],
                task,
                target.model,
                merged,
                budget,
                image_sizes=engine.image_sizes,
                max_images=engine.max_images,
                recording=recording,
            )
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
                log.exception("job %s: adapter %s raised unexpectedly", task.job_id, target.provider)
                raise AdapterError(f"adapter {target.provider} failed: {type(exc).__name__}", retryable=False) from exc

        route = await self.router.run(engine.route, call, deadline)
        for attempt in route.attempts:
            self.metrics.provider_attempts.labels(task.engine, attempt.target.split("/", 1)[0], attempt.outcome, surface).inc()
        attempts = [Attempt(a.kind, a.target, a.started_at, a.duration, a.outcome, self.redactor.redact(a.detail)) for a in route.attempts]
        if route.error is not None:
            error = JobError(self.redactor.redact(route.error.message), route.error.code, route.error.reason)
            return Run(error=error, attempts=attempts)
        target = route.target
        assert target is not None
        if isinstance(route.value, TextStream):  # the usage is known when the stream ends
            route.value.on_end = lambda usage: self.metrics.count_usage(task.engine, target.provider, target.model, usage, surface)
        else:
            self.metrics.count_usage(task.engine, target.provider, target.model, getattr(route.value, "usage", None), surface)
        return Run(value=route.value, target=target, attempts=attempts)


def _outcome(run: Run) -> tuple[Outcome, list[Attempt]]:
    """A portal job's stored outcome from a run of its route."""
    if run.error is not None:
        return Outcome(error=run.error), run.attempts
    assert run.value is not None and run.target is not None and not isinstance(run.value, TextStream)
    return Outcome(result=run.value.to_json(), provider=run.target.label), run.attempts
