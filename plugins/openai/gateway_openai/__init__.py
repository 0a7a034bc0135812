"""Adapter type ``openai``: the OpenAI HTTP protocol over httpx, for OpenAI and any compatible
server (vLLM, Ollama, llama.cpp server, LocalAI, Groq, speaches, ...): ``/chat/completions``
for text, ``/images/generations`` for images (``b64_json`` and ``url`` answers alike),
``/audio/transcriptions`` for audio and call (multipart upload; ``verbose_json`` for timed
segments, and plain ``json`` from then on for a server that refuses it). Text streams too
(``stream``, for the gateway's OpenAI-compatible API): server-sent events read as they come,
with ``stream_options.include_usage`` (dropped from then on for a server that refuses it);
closing the stream closes the upstream connection, which stops the generation.

Provider options (``providers.<name>`` in the gateway config)::

    type: openai
    base_url: https://api.openai.com/v1   # default
    api_key: ${OPENAI_API_KEY}            # optional for local servers
    headers: {X-Extra: value}             # optional, sent with every request
    timeout: 120                          # read timeout, seconds
    connect_timeout: 5
    max_connections: 100
    verbose_json: true                    # ask transcriptions for timed segments (false: plain json)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

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
    flag_option,
    hookimpl,
    http_transport,
    images_from_openai,
    number_option,
    transcript_from_openai,
    whole_option,
)

OPTIONS = {"base_url", "api_key", "headers", "timeout", "connect_timeout", "max_connections", "verbose_json"}
RETRYABLE_STATUS = {408, 409, 425, 429}


def _upstream_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text or response.reason_phrase)[:300]


def _usage(data: Any) -> Usage | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    return Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens"))


class OpenAIAdapter:
    """One provider: a pooled client shared by every job routed to it."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        check_known_options(options, OPTIONS)
        base_url = str(options.get("base_url") or "https://api.openai.com/v1").rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise AdapterConfigError("base_url", f"{base_url!r} is not an http(s) URL")
        headers = options.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise AdapterConfigError("headers", "must be a mapping of header names to values")
        headers = {str(k): str(v) for k, v in headers.items()}
        if options.get("api_key"):
            headers["Authorization"] = f"Bearer {options['api_key']}"
        self.name = name
        self.verbose_json = flag_option(options, "verbose_json", True)
        self.stream_usage = True
        """Ask streams for their usage (``stream_options``); False once the server refused it."""
        pool_size = whole_option(options, "max_connections", 100)
        # Keep every connection alive between bursts: reopening them costs more than holding them.
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        self.client = httpx.AsyncClient(
            transport=http_transport(limits=limits),
            base_url=base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(number_option(options, "timeout", 120.0), connect=number_option(options, "connect_timeout", 5.0)),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _post(self, path: str, timeout: float, **content: Any) -> dict[str, Any]:
        """POST ``content`` (httpx's ``json=`` or ``data=``/``files=``); the answer's JSON object."""
        try:
            response = await self.client.post(path, timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), **content)
        except httpx.TimeoutException as exc:
            raise AdapterError(f"{self.name}: timed out ({type(exc).__name__})", retryable=True) from None
        except httpx.TransportError as exc:
            raise AdapterError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from None
        if response.status_code >= 400:
            raise self._status_error(response)
        try:
            data = response.json()
        except ValueError:
            raise AdapterError(f"{self.name}: the answer is not JSON", retryable=True, status=response.status_code) from None
        if not isinstance(data, dict):
            raise AdapterError(f"{self.name}: the answer is not a JSON object", retryable=True, status=response.status_code)
        return data

    def _status_error(self, response: httpx.Response) -> AdapterError:
        retryable = response.status_code >= 500 or response.status_code in RETRYABLE_STATUS
        return AdapterError(f"{self.name}: HTTP {response.status_code}: {_upstream_message(response)}", retryable=retryable, status=response.status_code)

    def _chat_body(self, request: TextRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            **request.params,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        return body

    async def complete(self, request: TextRequest) -> TextResult:
        data = await self._post("chat/completions", request.timeout, json=self._chat_body(request))
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AdapterError(f"{self.name}: the answer has no choices[0].message.content", retryable=True) from None
        if not isinstance(text, str) or not text:
            raise AdapterError(f"{self.name}: the model returned no text", retryable=True)
        return TextResult(text=text, usage=_usage(data))

    async def stream(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        """The answer as the server streams it; leaving the loop early closes the connection."""
        body = {**self._chat_body(request), "stream": True}
        if self.stream_usage:
            body["stream_options"] = {"include_usage": True}
        timeout = httpx.Timeout(request.timeout, connect=min(request.timeout, 5.0))
        try:
            async with self.client.stream("POST", "chat/completions", json=body, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    error = self._status_error(response)
                    if response.status_code == 400 and "stream_options" in error.message and self.stream_usage:
                        self.stream_usage = False  # this server streams without usage: stop asking
                        error = AdapterError(error.message, retryable=True, status=400)
                    raise error
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise AdapterError(f"{self.name}: a stream event is not JSON", retryable=True) from None
                    if not isinstance(event, dict):
                        raise AdapterError(f"{self.name}: a stream event is not a JSON object", retryable=True)
                    if event.get("error"):
                        error_body = event["error"]
                        message = error_body.get("message") if isinstance(error_body, dict) else error_body
                        raise AdapterError(f"{self.name}: stream error: {str(message)[:300]}", retryable=True)
                    choices = event.get("choices")
                    choice: dict[str, Any] = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
                    delta = choice.get("delta")
                    content = delta.get("content") if isinstance(delta, dict) else None
                    text = content if isinstance(content, str) else ""
                    finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
                    usage = _usage(event)
                    if text or finish or usage:
                        yield TextChunk(text, usage, finish)
        except httpx.TimeoutException as exc:
            raise AdapterError(f"{self.name}: timed out ({type(exc).__name__})", retryable=True) from None
        except httpx.TransportError as exc:
            raise AdapterError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from None

    async def generate_image(self, request: ImageRequest) -> ImageResult:
        body: dict[str, Any] = {"model": request.model, "prompt": request.prompt, "n": request.n, "size": request.size, **request.params}
        data = await self._post("images/generations", request.timeout, json=body)
        return ImageResult(images_from_openai(data.get("data"), self.name))

    async def transcribe(self, request: AudioRequest) -> Transcript:
        if self.verbose_json:
            try:
                return transcript_from_openai(await self._upload(request, "verbose_json"), self.name)
            except AdapterError as exc:
                if exc.status != 400 or ("verbose_json" not in exc.message and "response_format" not in exc.message):
                    raise
                self.verbose_json = False  # this server speaks plain json only: stop asking
        return transcript_from_openai(await self._upload(request, "json"), self.name)

    async def _upload(self, request: AudioRequest, response_format: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": request.model, "response_format": response_format}
        if request.language:
            fields["language"] = request.language
        if request.prompt:
            fields["prompt"] = request.prompt
        if request.timestamps and response_format == "verbose_json":
            fields["timestamp_granularities[]"] = "segment"
        fields.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in request.params.items()})
        with request.file.open("rb") as audio:  # streamed from disk by httpx, not read into memory
            return await self._post("audio/transcriptions", request.timeout, data=fields, files={"file": (request.filename, audio, request.content_type)})


@hookimpl
def register_adapters(register: Any) -> None:
    register("openai", OpenAIAdapter, categories=["text", "image", "audio", "call"])
