"""The endpoints of the OpenAI-compatible API: authenticate, bound and parse the request, hold a
model slot, run the task through the runtime's executor (the portal path's router), answer.

No request may produce a traceback or hang: every refusal is an :class:`APIError` in OpenAI's
shape, an unexpected failure is a 500 in the same shape (logged with its traceback), and every
request is bounded by ``openai_api.timeout`` (the wait for a model slot included). A stream
falls back to the route's next target only before its first chunk; after it, a failure ends
the stream with an error event. A client that disconnects mid-stream cancels the provider's call.

Each request that names an engine its key may use counts once in the runtime's usage ledger
(key name, engine): an error if it is answered with one (a refusal after the engine is known,
a provider's failure, a timeout), with the tokens, cost and audio seconds of its result; a
stream counts when it ends, with the usage of its last chunk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from gateway.adapters import AdapterError, HostedImages, TextResult, Transcript, Usage
from gateway.config import EngineConfig
from gateway.execution import Run, TextStream
from gateway.openai_api import responses
from gateway.openai_api.capacity import ModelSlots
from gateway.openai_api.errors import INVALID_REQUEST, NOT_FOUND, SERVER, TIMEOUT, APIError, from_job_error, invalid
from gateway.openai_api.keys import ApiKey, KeyRing, model_not_found
from gateway.openai_api.parse import ChatRequest, parse_chat, parse_images, parse_transcription, read_json
from gateway.outcomes import JobError, JobState
from gateway.plugins import notify
from gateway.recordings import Recording, sniff_audio
from gateway.runtime import Runtime
from gateway.tasks import AudioPrompt, CallPrompt, Category, ImagePrompt, Prompt, Task, TextPrompt

log = logging.getLogger("gateway.openai")
SURFACE = "openai"
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024
UPLOAD_EXTENSIONS = {"flac": "audio/flac", "mp3": "audio/mpeg", "mpga": "audio/mpeg", "mpeg": "audio/mpeg", "m4a": "audio/mp4", "mp4": "audio/mp4"}
UPLOAD_EXTENSIONS |= {"ogg": "audio/ogg", "oga": "audio/ogg", "opus": "audio/ogg", "wav": "audio/wav", "webm": "audio/webm"}
"""Formats OpenAI accepts, by file name, for the few the bytes do not identify."""
Handler = Callable[[Request, ApiKey], Awaitable[Response]]


@dataclass
class _Metered:
    """What one request counts as in the usage ledger, learnt as it runs (``request.state.metered``)."""

    engine: str | None = None
    """Set once the key may use the engine the request names: from then on the request counts."""
    usage: Usage | None = None
    audio_seconds: float | None = None
    streaming: bool = False
    """A stream counts itself when it ends."""


def _metered(request: Request) -> _Metered:
    metered: _Metered = request.state.metered
    return metered


class OpenAIEndpoints:
    """The ``/v1`` routes of one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.config.openai_api
        self.keys = KeyRing(runtime.config.api_keys, runtime.redactor)
        self.slots = ModelSlots(runtime.worker, runtime.config.concurrency)

    def routes(self) -> list[BaseRoute]:
        if not self.keys:
            log.info("OpenAI-compatible API: off (no api_keys in %s); /v1 answers 404", self.rt.config.path)
            return [Route("/v1/{path:path}", self._off, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]
        log.info(
            "OpenAI-compatible API: on at %s/v1 for %d key(s) (%s)", self.rt.config.public_url, len(self.keys.keys), ", ".join(k.name for k in self.keys.keys)
        )
        return [
            Route("/v1/chat/completions", self._endpoint("chat", "POST", self.chat), methods=["GET", "POST"]),
            Route("/v1/images/generations", self._endpoint("images", "POST", self.images), methods=["GET", "POST"]),
            Route("/v1/audio/transcriptions", self._endpoint("transcriptions", "POST", self.transcriptions), methods=["GET", "POST"]),
            Route("/v1/models", self._endpoint("models", "GET", self.models), methods=["GET", "POST"]),
            Route("/v1/models/{model:path}", self._endpoint("models", "GET", self.model), methods=["GET", "POST"]),
            Route("/v1/{path:path}", self._unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]

    # -- the frame of every request ---------------------------------------------------------
    def _endpoint(self, name: str, method: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        requests, latency = self.rt.metrics.openai_requests, self.rt.metrics.openai_latency.labels(name)

        async def serve(request: Request) -> Response:
            started = time.perf_counter()
            key: ApiKey | None = None
            metered = request.state.metered = _Metered()
            try:
                key = self.keys.authenticate(request.headers.get("authorization"))
                if request.method != method:
                    raise APIError(405, f"{request.url.path} accepts {method} only", code="method_not_allowed")
                key.admit()
                response = await handler(request, key)
            except APIError as exc:
                log.info("openai %s key=%s: %d %s", name, key.name if key else "-", exc.status, exc.message)
                response = exc.response({"Retry-After": "1"} if exc.status in (429, 503) else None)
            except ClientDisconnect:  # the client went away while sending its request: nobody to answer
                log.info("openai %s key=%s: the client disconnected while sending its request", name, key.name if key else "-")
                response = Response(status_code=400)
            except Exception:
                log.exception("openai %s key=%s: internal error", name, key.name if key else "-")
                response = APIError(500, "the gateway failed to handle the request", type=SERVER, code="internal_error").response()
            requests.labels(name, str(response.status_code)).inc()
            latency.observe(time.perf_counter() - started)
            if key is not None and metered.engine is not None and not metered.streaming:
                self.rt.api_usage.record(key.name, metered.engine, error=response.status_code >= 400, usage=metered.usage, audio_seconds=metered.audio_seconds)
            return response

        return serve

    async def _off(self, request: Request) -> Response:
        return APIError(404, "the OpenAI-compatible API is off on this gateway: no api_keys are configured", type=NOT_FOUND, code="api_disabled").response()

    async def _unknown(self, request: Request) -> Response:
        return APIError(404, f"unknown endpoint {request.method} {request.url.path[:200]}", type=NOT_FOUND, code="unknown_url").response()

    # -- /v1/models --------------------------------------------------------------------------
    async def models(self, request: Request, key: ApiKey) -> Response:
        return responses.Answer(responses.models(key.allowed(e.code for e in self.rt.config.engines)))

    async def model(self, request: Request, key: ApiKey) -> Response:
        code = str(request.path_params["model"])
        if self.rt.config.engine(code) is None or not key.may_use(code):
            raise model_not_found(code)
        return responses.Answer(responses.models([code])["data"][0])

    # -- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, request: Request, key: ApiKey) -> Response:
        chat = parse_chat(read_json(await self._json_body(request)), self.settings)
        engine = self._engine(request, key, chat.model, (Category.TEXT,))
        deadline = time.time() + self.settings.timeout
        task = self._task(engine, key, TextPrompt(chat.messages[-1].content), deadline)
        task.context, task.temperature, task.max_tokens = list(chat.messages[:-1]), chat.temperature, chat.max_tokens
        if chat.stream:
            return await self._stream(request, task, chat, key, deadline)
        async with self._slot(deadline):
            run = await self._run(task, deadline, params=chat.params)
        result = await self._finish(request, task, key, run)
        assert isinstance(result, TextResult)
        return responses.Answer(responses.chat_completion(responses.completion_id(), chat.model, result.text, result.usage))

    async def _stream(self, request: Request, task: Task, chat: ChatRequest, key: ApiKey, deadline: float) -> Response:
        """Hold the slot and open the stream (the route may fall back until the first chunk), then answer SSE."""
        held = contextlib.AsyncExitStack()
        await held.enter_async_context(self._slot(deadline))
        try:
            run = await self._run(task, deadline, params=chat.params, stream=True)
            if run.error is not None:
                await self._finish(request, task, key, run)
            stream = run.value
            assert isinstance(stream, TextStream)
        except BaseException:
            await held.aclose()
            raise
        log.info("openai chat key=%s model=%s: streaming from %s", key.name, chat.model, run.target.label if run.target else "?")
        _metered(request).streaming = True
        return StreamingResponse(
            self._events(task, chat, key, stream, held, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self, task: Task, chat: ChatRequest, key: ApiKey, stream: TextStream, held: contextlib.AsyncExitStack, deadline: float
    ) -> AsyncIterator[bytes]:
        id, created = responses.completion_id(), int(time.time())
        text: list[str] = []
        finish: str | None = None
        error: APIError | None = None
        chunks = aiter(stream)
        try:
            yield responses.chunk_event(id, chat.model, created, {"role": "assistant", "content": ""})
            while True:
                try:  # the whole stream is bounded by the request's timeout too
                    chunk = await asyncio.wait_for(anext(chunks), max(0.0, deadline - time.time()))
                except StopAsyncIteration:
                    break
                if chunk.text:
                    text.append(chunk.text)
                    yield responses.chunk_event(id, chat.model, created, {"content": chunk.text})
                finish = chunk.finish_reason or finish
            yield responses.chunk_event(id, chat.model, created, {}, finish or "stop")
            if chat.include_usage:
                yield responses.usage_event(id, chat.model, created, stream.usage)
            yield responses.SSE_DONE
        except AdapterError as exc:  # after the first chunk: no fallback, the stream ends with the error
            error = APIError(502, self.rt.redactor.redact(exc.message), type=SERVER, code="upstream_failed")
            yield responses.sse(error.body())
        except TimeoutError:
            error = APIError(504, f"the answer took longer than openai_api.timeout ({self.settings.timeout:g} s)", type=TIMEOUT, code="timeout")
            yield responses.sse(error.body())
        finally:
            with anyio.CancelScope(shield=True):  # the client may be gone (cancelled): the clean-up runs anyway
                await stream.aclose()  # stops the provider's call if it still runs
                await held.aclose()
                key.count_usage(stream.usage)
                self.rt.api_usage.record(key.name, task.engine, error=error is not None, usage=stream.usage)
                if error is None and finish is None and not text:
                    log.info("openai chat key=%s: the client disconnected; the provider's call was stopped", key.name)
                outcome = TextResult("".join(text), stream.usage)
                if error is None:
                    await notify(self.rt.pm, "task_succeeded", task=task, result=outcome, state=JobState.DELIVERED)
                else:
                    await notify(self.rt.pm, "task_failed", task=task, error=JobError(error.message, error.status), state=JobState.FAILED)

    # -- /v1/images/generations ---------------------------------------------------------------
    async def images(self, request: Request, key: ApiKey) -> Response:
        req = parse_images(read_json(await self._json_body(request)))
        engine = self._engine(request, key, req.model, (Category.IMAGE,))
        sizes = {size: fmt for fmt, size in reversed(list(engine.image_sizes.items()))}  # the first format of a size wins
        fmt = "square" if req.size is None else sizes.get(req.size)
        if fmt is None:
            raise invalid("size", f"size {req.size} is not offered by {engine.code}; use one of {', '.join(dict.fromkeys(engine.image_sizes.values()))}")
        if req.n > engine.max_images:
            raise invalid("n", f"n is {req.n}; {engine.code} makes at most {engine.max_images} image(s) per request (image.max_images)")
        deadline = time.time() + self.settings.timeout
        task = self._task(engine, key, ImagePrompt(req.prompt, None, fmt, req.n), deadline)
        async with self._slot(deadline):
            run = await self._run(task, deadline, params=req.params)
        result = await self._finish(request, task, key, run)
        assert isinstance(result, HostedImages)
        if req.response_format == "b64_json":
            items = [{"b64_json": base64.b64encode(await self._hosted_bytes(url)).decode()} for url in result.urls]
        else:
            items = [{"url": url} for url in result.urls]
        return responses.Answer(responses.images(items, result.usage))

    async def _hosted_bytes(self, url: str) -> bytes:
        stored = await self.rt.files.read(url.rsplit("/", 1)[-1])
        if stored is None:
            raise APIError(500, "a generated image was not found in the gateway's files", type=SERVER, code="internal_error")
        if stored.data is not None:
            return stored.data
        assert stored.path is not None
        return await asyncio.to_thread(stored.path.read_bytes)

    # -- /v1/audio/transcriptions ---------------------------------------------------------------
    async def transcriptions(self, request: Request, key: ApiKey) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise invalid(None, f"expected Content-Type multipart/form-data, got {content_type[:80] or 'none'}", "invalid_content_type")
        limit = self.settings.max_upload_bytes + MAX_FORM_FIELDS * MAX_FIELD_BYTES
        try:
            async with contextlib.aclosing(_limited(request, limit, "openai_api.max_upload_bytes")) as stream:
                form = await MultiPartParser(request.headers, stream, max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES).parse()
        except MultiPartException as exc:
            raise invalid(None, f"the multipart body cannot be read: {exc.message}", "invalid_multipart") from None
        try:
            upload = form.get("file")
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            if upload is None or isinstance(upload, str):
                raise invalid("file", "file is required: the audio to transcribe, as a multipart file")
            req = parse_transcription(fields)
            engine = self._engine(request, key, req.model, (Category.AUDIO, Category.CALL))
            deadline = time.time() + self.settings.timeout
            prompt_type = CallPrompt if engine.category is Category.CALL else AudioPrompt
            task = self._task(engine, key, prompt_type("", hint=req.prompt, fields={"source": "upload"}), deadline)
            task.language = req.language
            params = {"temperature": req.temperature} if req.temperature is not None else {}
            async with self._recording(upload.file, upload.filename or "", upload.size) as recording:
                async with self._slot(deadline):
                    run = await self._run(task, deadline, params=params, recording=recording)
        finally:
            await form.close()
        result = await self._finish(request, task, key, run)
        assert isinstance(result, Transcript)
        body, media_type = responses.transcription(result, req.response_format)
        if isinstance(body, str):
            return PlainTextResponse(body, media_type=media_type)
        return responses.Answer(body, media_type=media_type)

    @contextlib.asynccontextmanager
    async def _recording(self, file: Any, filename: str, size: int | None) -> AsyncIterator[Recording]:
        """The upload in the recordings folder (swept at start-up like downloads), as a :class:`Recording`."""
        if size is not None and size > self.settings.max_upload_bytes:
            raise APIError(413, f"the file is larger than {self.settings.max_upload_bytes} bytes", param="file", code="file_too_large")
        head = await asyncio.to_thread(_read_head, file)
        sniffed = sniff_audio(head)
        extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        if sniffed is None and extension not in UPLOAD_EXTENSIONS:
            raise invalid("file", f"the file is not audio in a known format ({', '.join(sorted(UPLOAD_EXTENSIONS))})", "invalid_file_format")
        extension, mime = sniffed or (extension, UPLOAD_EXTENSIONS[extension])
        directory = self.rt.recordings.directory
        path = directory / f"upload-{secrets.token_hex(8)}.{extension}"
        try:
            written = await asyncio.to_thread(_copy, file, directory, path)
            if written == 0:
                raise invalid("file", "the file is empty")
            yield Recording(path, f"audio.{extension}", mime, written)
        finally:
            path.unlink(missing_ok=True)

    # -- shared steps ---------------------------------------------------------------------------
    async def _json_body(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise invalid(None, f"expected Content-Type application/json, got {content_type[:80] or 'none'}", "invalid_content_type")
        body = bytearray()
        async for chunk in _limited(request, self.settings.max_body_bytes, "openai_api.max_body_bytes"):
            body += chunk
        return bytes(body)

    def _engine(self, request: Request, key: ApiKey, model: str, categories: tuple[Category, ...]) -> EngineConfig:
        """The engine the request names, if its key may use it; from here on the request counts as the engine's."""
        engine = self.rt.config.engine(model)
        if engine is None or not key.may_use(model):
            raise model_not_found(model)
        _metered(request).engine = engine.code
        if engine.category not in categories:
            wanted = " or ".join(c.value for c in categories)
            raise invalid("model", f"model {model!r} is a {engine.category.value} engine; this endpoint needs a {wanted} engine", "model_not_supported")
        return engine

    def _task(self, engine: EngineConfig, key: ApiKey, prompt: Prompt, deadline: float) -> Task:
        now = time.time()
        return Task(
            job_id=f"openai-{secrets.token_hex(8)}",
            engine=engine.code,
            category=engine.category,
            prompt=prompt,
            ttl=max(1, int(self.settings.timeout)),
            accepted_at=now,
            deadline=deadline,
            extra={"surface": SURFACE, "api_key": key.name},
        )

    @contextlib.asynccontextmanager
    async def _slot(self, deadline: float) -> AsyncIterator[None]:
        async with self.slots.slot(max(0.0, deadline - time.time())) as held:
            if not held:
                raise APIError(
                    503, f"the gateway is busy: all {self.slots.concurrency} model slots (workers.concurrency) are taken", type=SERVER, code="overloaded"
                )
            yield

    async def _run(self, task: Task, deadline: float, **options: Any) -> Run:
        """The executor's run, bounded by the deadline (plugins' hooks included)."""
        try:
            return await asyncio.wait_for(self.rt.executor.run(task, deadline, surface=SURFACE, **options), max(0.0, deadline - time.time()) + 1.0)
        except TimeoutError:
            return Run(error=JobError(f"no answer within openai_api.timeout ({self.settings.timeout:g} s)", 504))

    async def _finish(self, request: Request, task: Task, key: ApiKey, run: Run) -> TextResult | HostedImages | Transcript:
        """Count the usage, tell the outcome hooks, and give the result; the run's error as an :class:`APIError`."""
        provider = run.target.label if run.target else "-"
        if run.error is not None:
            await notify(self.rt.pm, "task_failed", task=task, error=run.error, state=JobState.FAILED)
            log.info("openai %s key=%s model=%s: failed (%s): %s", task.category.value, key.name, task.engine, run.error.code, run.error.message)
            raise from_job_error(run.error)
        result = run.value
        assert isinstance(result, (TextResult, HostedImages, Transcript))
        key.count_usage(result.usage)
        metered = _metered(request)
        metered.usage = result.usage
        if isinstance(result, Transcript):
            metered.audio_seconds = result.duration
        await notify(self.rt.pm, "task_succeeded", task=task, result=result, state=JobState.DELIVERED)
        log.info(
            "openai %s key=%s model=%s: answered by %s in %.0f ms",
            task.category.value,
            key.name,
            task.engine,
            provider,
            (time.time() - task.accepted_at) * 1000,
        )
        return result


async def _limited(request: Request, limit: int, setting: str) -> AsyncGenerator[bytes, None]:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"the request body exceeds {limit} bytes ({setting})", type=INVALID_REQUEST, code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large
        yield chunk


def _read_head(file: Any) -> bytes:
    file.seek(0)
    head: bytes = file.read(64)
    file.seek(0)
    return head


def _copy(file: Any, directory: Path, path: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    file.seek(0)
    written = 0
    with path.open("wb") as out:
        while block := file.read(1024 * 1024):
            out.write(block)
            written += len(block)
    return written
