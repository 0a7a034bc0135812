"""Adapter type ``litellm``: every provider litellm knows (Anthropic, Gemini, Mistral, Bedrock,
Azure OpenAI, Groq, DeepSeek, OpenRouter, ...) for text (``acompletion``), image
(``aimage_generation``), audio and call (``atranscription``) engines.

Provider options (``providers.<name>`` in the gateway config)::

    type: litellm
    api_key: ${ANTHROPIC_API_KEY}     # optional: litellm reads the vendor's usual variable otherwise
    api_base: https://...             # optional: a proxy, Azure endpoint, local server
    api_version: 2024-06-01           # optional (Azure)
    timeout: 120                      # seconds per call, capped by the job's remaining time
    params: {top_p: 0.9}              # optional: extra arguments for every call

Route targets name the model as litellm does: ``{provider: anthropic, model:
anthropic/claude-3-5-haiku-latest}``; a target's ``params`` are passed on as well.

litellm is imported the first time a litellm target runs, in the worker and off the event
loop: never at start-up and never on the accept path (it takes seconds and about 200 MB).
``LITELLM_LOCAL_MODEL_COST_MAP=True`` keeps it from fetching its price list at import.
Its own retries are off (the gateway's routing owns retries and fallbacks) and none of
its logging callbacks are used. Token usage and litellm's cost figure are attached to
every result. Text streams too (``stream``, for the gateway's OpenAI-compatible API:
``acompletion(stream=True)`` with the usage in its last chunk); closing the stream closes
litellm's, and with it the provider's connection.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from gateway.spi import (
    AdapterConfigError,
    AdapterError,
    AudioRequest,
    ImageRequest,
    ImageResult,
    TextChunk,
    TextRequest,
    TextResult,
    Transcript,
    Usage,
    check_known_options,
    hookimpl,
    images_from_openai,
    number_option,
    transcript_from_openai,
)

OPTIONS = {"api_key", "api_base", "api_version", "timeout", "params"}
_import_lock: asyncio.Lock | None = None


def plugin_status() -> dict[str, Any]:
    """Listed in ``GET /-/plugins.json``: whether litellm is loaded in this process yet."""
    return {"litellm_imported": "litellm" in sys.modules}


async def load_litellm() -> Any:
    """Import litellm once, in a thread so that the event loop keeps serving meanwhile."""
    global _import_lock
    if "litellm" in sys.modules and getattr(sys.modules["litellm"], "_gateway_configured", False):
        return sys.modules["litellm"]
    if _import_lock is None:
        _import_lock = asyncio.Lock()
    async with _import_lock:
        return await asyncio.to_thread(_import)


def _import() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    if not getattr(litellm, "_gateway_configured", False):
        litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
        litellm.telemetry = False
        litellm.num_retries = 0
        litellm._gateway_configured = True
    return litellm


def map_error(name: str, exc: Exception, litellm: Any) -> AdapterError:
    """litellm's exception types -> retryable (provider-side, transient) or final (the request or the setup)."""
    status = getattr(exc, "status_code", None)
    message = f"{name}: {type(exc).__name__}: {getattr(exc, 'message', None) or exc}"[:500]
    if isinstance(exc, litellm.ContextWindowExceededError):
        return AdapterError(message, retryable=False, status=413)
    final = (
        litellm.BadRequestError,
        litellm.AuthenticationError,
        litellm.PermissionDeniedError,
        litellm.NotFoundError,
        litellm.UnprocessableEntityError,
        litellm.BudgetExceededError,
    )
    if isinstance(exc, final):  # content policy, unsupported params and the like are BadRequestError
        return AdapterError(message, retryable=False, status=status if isinstance(status, int) else 400)
    transient = (
        litellm.RateLimitError,
        litellm.Timeout,
        litellm.APIConnectionError,
        litellm.ServiceUnavailableError,
        litellm.InternalServerError,
        litellm.BadGatewayError,
        litellm.APIError,
    )
    if isinstance(exc, transient):
        return AdapterError(message, retryable=True, status=status if isinstance(status, int) else 503)
    return AdapterError(message, retryable=False, status=status if isinstance(status, int) else None)


class LiteLLMAdapter:
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        check_known_options(options, OPTIONS, " (extra call arguments go under params)")
        params = options.get("params") or {}
        if not isinstance(params, Mapping):
            raise AdapterConfigError("params", "must be a mapping of extra arguments, e.g. {top_p: 0.9}")
        self.name = name
        self.timeout = number_option(options, "timeout", 120.0)
        self.common: dict[str, Any] = {k: str(options[k]) for k in ("api_key", "api_base", "api_version") if options.get(k)}
        self.common.update(params)

    def _arguments(self, model: str, params: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        # num_retries / max_retries 0: one call per route attempt; the gateway retries and falls back.
        return {"model": model, **self.common, **params, "timeout": min(self.timeout, timeout), "num_retries": 0, "max_retries": 0}

    async def _call(self, function: str, **arguments: Any) -> tuple[Any, Any]:
        litellm = await load_litellm()
        try:
            return litellm, await getattr(litellm, function)(**arguments)
        except Exception as exc:
            raise map_error(self.name, exc, litellm) from None

    def _chat_arguments(self, request: TextRequest) -> dict[str, Any]:
        arguments = self._arguments(request.model, request.params, request.timeout)
        arguments["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.temperature is not None:
            arguments["temperature"] = request.temperature
        if request.max_tokens is not None:
            arguments["max_tokens"] = request.max_tokens
        return arguments

    async def stream(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        """``acompletion(stream=True)`` chunk by chunk; closing it closes litellm's stream."""
        arguments = {**self._chat_arguments(request), "stream": True, "stream_options": {"include_usage": True}}
        litellm, response = await self._call("acompletion", **arguments)
        try:
            async for chunk in response:
                choices = getattr(chunk, "choices", None) or []
                delta = getattr(choices[0], "delta", None) if choices else None
                text = getattr(delta, "content", None)
                finish = getattr(choices[0], "finish_reason", None) if choices else None
                usage = _usage(chunk, None)
                if text or finish or usage:
                    yield TextChunk(text if isinstance(text, str) else "", usage, finish if isinstance(finish, str) else None)
        except AdapterError:
            raise
        except Exception as exc:
            raise map_error(self.name, exc, litellm) from None
        finally:
            close = getattr(response, "aclose", None)
            if close is not None:
                await close()

    async def complete(self, request: TextRequest) -> TextResult:
        litellm, response = await self._call("acompletion", **self._chat_arguments(request))
        try:
            text = response.choices[0].message.content
        except (AttributeError, IndexError):
            raise AdapterError(f"{self.name}: the answer has no message content", retryable=True) from None
        if not isinstance(text, str) or not text:
            raise AdapterError(f"{self.name}: the model returned no text", retryable=True)
        return TextResult(text=text, usage=_usage(response, _cost(litellm, response)))

    async def generate_image(self, request: ImageRequest) -> ImageResult:
        arguments = self._arguments(request.model, request.params, request.timeout)
        arguments.update(prompt=request.prompt, n=request.n, size=request.size)
        litellm, response = await self._call("aimage_generation", **arguments)
        images = images_from_openai(getattr(response, "data", None), self.name)
        return ImageResult(images, usage=_usage(response, _cost(litellm, response, call_type="image_generation")))

    async def transcribe(self, request: AudioRequest) -> Transcript:
        arguments = self._arguments(request.model, request.params, request.timeout)
        arguments.setdefault("response_format", "verbose_json")
        if request.language:
            arguments["language"] = request.language
        if request.prompt:
            arguments["prompt"] = request.prompt
        if request.timestamps and arguments["response_format"] == "verbose_json":
            arguments.setdefault("timestamp_granularities", ["segment"])
        with request.file.open("rb") as audio:
            litellm, response = await self._call("atranscription", file=(request.filename, audio, request.content_type), **arguments)
        answer = {key: getattr(response, key, None) for key in ("text", "segments", "language", "duration")}
        return transcript_from_openai(answer, self.name, _usage(response, _cost(litellm, response, call_type="atranscription")))


def _cost(litellm: Any, response: Any, **kwargs: Any) -> float | None:
    """litellm's price for the call; None for models its price list does not know."""
    hidden = getattr(response, "_hidden_params", None) or {}
    if isinstance(hidden.get("response_cost"), (int, float)):
        return float(hidden["response_cost"])
    try:
        return float(litellm.completion_cost(completion_response=response, **kwargs))
    except Exception:  # unknown model or provider: no price, not an error
        return None


def _usage(response: Any, cost: float | None) -> Usage | None:
    usage = getattr(response, "usage", None)
    prompt = getattr(usage, "prompt_tokens", None) or getattr(usage, "input_tokens", None)
    completion = getattr(usage, "completion_tokens", None) or getattr(usage, "output_tokens", None)
    total = getattr(usage, "total_tokens", None)
    if not any(isinstance(v, (int, float)) and v for v in (prompt, completion, total, cost)):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, cost_usd=cost)


@hookimpl
def register_adapters(register: Any) -> None:
    register("litellm", LiteLLMAdapter, categories=["text", "image", "audio", "call"])
