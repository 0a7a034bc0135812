"""What a provider adapter implements, and the typed requests and results it exchanges.

An adapter is created once per configured provider (``providers.<name>`` in the config)
by the factory a plugin registered under an adapter type. The core calls the one method
that matches the task's category; the adapter answers with a typed result or raises
:class:`AdapterError` saying whether trying again could help.
"""

from __future__ import annotations

import base64
import binascii
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gateway.languages import language_code
from gateway.tasks import AudioPrompt, CallPrompt, Category, ImagePrompt, Message, Task, TextPrompt


@dataclass(frozen=True)
class Usage:
    """What a call consumed, as the provider reported it; any adapter may attach one to its result.

    It is stored with the job (``gateway jobs show``), reaches ``task_succeeded`` with the
    result, and is counted in ``gateway_tokens_total`` and ``gateway_cost_usd_total``."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    """The call's price in US dollars, when the adapter can compute it (litellm can)."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Usage | None:
        return cls(**data) if data else None


@dataclass(frozen=True)
class TextRequest:
    model: str
    messages: list[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    """Extra provider parameters from the route target (``params:`` in the config)."""
    timeout: float = 60.0
    """Seconds this call may take: the smaller of the provider's timeout and the job's budget."""


@dataclass(frozen=True)
class TextResult:
    text: str
    usage: Usage | None = None
    kind: str = "text"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "usage": self.usage.to_json() if self.usage else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TextResult:
        return cls(text=data["text"], usage=Usage.from_json(data.get("usage")))


@dataclass(frozen=True)
class ImageRequest:
    model: str
    prompt: str
    """The portal's prompt with its style joined in front, as the portal's own DALL-E engine does."""
    size: str
    """``WIDTHxHEIGHT`` from the portal's format (square, portrait, landscape) and the engine's sizes."""
    n: int = 1
    params: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 120.0


@dataclass(frozen=True)
class GeneratedImage:
    """One picture as the provider gave it: its bytes, or a URL to fetch them from."""

    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class ImageResult:
    """What an image adapter returns; the core hosts the pictures before anything is stored."""

    images: list[GeneratedImage]
    usage: Usage | None = None


@dataclass(frozen=True)
class HostedImages:
    """The stored result of an image task: URLs of the pictures the gateway serves itself."""

    urls: list[str]
    usage: Usage | None = None
    kind: str = "images"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "urls": list(self.urls), "usage": self.usage.to_json() if self.usage else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HostedImages:
        return cls(urls=list(data["urls"]), usage=Usage.from_json(data.get("usage")))


@dataclass(frozen=True)
class AudioRequest:
    """A recording the core has already downloaded to a local file (once per job)."""

    model: str
    file: Path
    filename: str
    """A name with the extension that matches the content (``audio.mp3``): servers that
    pick a decoder by file name need it even when the portal's URL has none."""
    content_type: str
    language: str | None = None
    """ISO 639-1 code from the portal's language name, or None to let the model detect it."""
    prompt: str | None = None
    """The portal's hint (``fields.prompt``): names, terms, the style of the text."""
    timestamps: bool = False
    """True for ``call`` tasks, whose result is a list of timed segments."""
    params: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 600.0


@dataclass(frozen=True)
class Segment:
    start: float
    """Seconds from the start of the recording."""
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """What an audio adapter returns, and what the core stores for ``audio`` and ``call`` tasks."""

    text: str
    language: str | None = None
    segments: tuple[Segment, ...] = ()
    """Timed segments when the provider gave them; a ``call`` result without them is one segment."""
    duration: float | None = None
    """Seconds of audio, when known."""
    usage: Usage | None = None
    kind: str = "transcript"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text": self.text,
            "language": self.language,
            "duration": self.duration,
            "segments": [[s.start, s.end, s.text] for s in self.segments],
            "usage": self.usage.to_json() if self.usage else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Transcript:
        return cls(
            text=data["text"],
            language=data.get("language"),
            duration=data.get("duration"),
            segments=tuple(Segment(float(a), float(b), str(t)) for a, b, t in data.get("segments") or ()),
            usage=Usage.from_json(data.get("usage")),
        )


def images_from_openai(items: Any, provider: str) -> list[GeneratedImage]:
    """The pictures in the ``data`` list of OpenAI's ``/images/generations`` answer, which
    compatible servers and litellm share: each ``b64_json`` or ``url``."""
    if not isinstance(items, (list, tuple)) or not items:
        raise AdapterError(f"{provider}: the answer has no data[] of images", retryable=True)
    images = []
    for item in items:
        fields = item if isinstance(item, Mapping) else vars(item)  # litellm hands over objects
        if isinstance(fields.get("b64_json"), str):
            try:
                images.append(GeneratedImage(data=base64.b64decode(fields["b64_json"], validate=True)))
            except binascii.Error:
                raise AdapterError(f"{provider}: b64_json is not valid base64", retryable=False) from None
        elif isinstance(fields.get("url"), str):
            images.append(GeneratedImage(url=fields["url"]))
        else:
            raise AdapterError(f"{provider}: an image has neither b64_json nor url", retryable=False)
    return images


def transcript_from_openai(data: Mapping[str, Any], provider: str, usage: Usage | None = None) -> Transcript:
    """A :class:`Transcript` from the answer shape of OpenAI's ``/audio/transcriptions`` (``json``
    or ``verbose_json``), which compatible servers and litellm answer in too.

    No text at all is a retryable failure; text with no words is final (422: there is no
    speech in the recording), and so is a segment without start, end or text."""
    text = data.get("text")
    if not isinstance(text, str):
        raise AdapterError(f"{provider}: the answer has no text", retryable=True)
    if not text.strip():
        raise AdapterError(f"{provider}: no speech was recognised in the recording", retryable=False, status=422)
    segments = []
    for item in data.get("segments") or ():
        fields = item if isinstance(item, Mapping) else vars(item)  # litellm hands over objects
        try:
            segments.append(Segment(float(fields["start"]), float(fields["end"]), str(fields["text"]).strip()))
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{provider}: a segment lacks start, end or text", retryable=False) from None
    language, duration = data.get("language"), data.get("duration")
    return Transcript(
        text=text.strip(),
        segments=tuple(segments),
        language=(language_code(language) or language) if isinstance(language, str) else None,  # verbose_json says "english"
        duration=float(duration) if isinstance(duration, (int, float)) else None,
        usage=usage,
    )


Result = TextResult | HostedImages | Transcript
RESULT_TYPES: dict[str, Any] = {"text": TextResult, "images": HostedImages, "transcript": Transcript}


def result_from_json(data: Mapping[str, Any]) -> Result:
    return RESULT_TYPES[data["kind"]].from_json(data)  # type: ignore[no-any-return]


class AdapterError(Exception):
    """A provider call failed.

    ``retryable`` says whether the same call may succeed later (timeouts, connection
    errors, 429, 5xx); ``status`` is the provider's HTTP status when there was one.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


class AdapterConfigError(Exception):
    """A provider's options are wrong; ``key`` names the option (e.g. ``base_url``), ``fix`` how to put it right (if known)."""

    def __init__(self, key: str, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.fix = fix


@runtime_checkable
class TextAdapter(Protocol):
    async def complete(self, request: TextRequest) -> TextResult: ...


@runtime_checkable
class ImageAdapter(Protocol):
    async def generate_image(self, request: ImageRequest) -> ImageResult: ...


@runtime_checkable
class AudioAdapter(Protocol):
    async def transcribe(self, request: AudioRequest) -> Transcript: ...


def check_known_options(options: Mapping[str, Any], known: Iterable[str], hint: str = "") -> None:
    """Refuse an option the adapter does not know: a typo would otherwise fall back to a default.
    The error suggests the closest known option, as unknown keys elsewhere in the config do."""
    names = sorted(known)
    unknown = sorted(str(key) for key in options if key not in names)  # YAML keys may be numbers
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        fix = f"did you mean `{close[0]}`?" if close else "remove it, or use one of the known options"
        raise AdapterConfigError(unknown[0], f"unknown option; known options: {', '.join(names)}{hint}", fix)


def number_option(options: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number; a string is read as one, since ``${VAR}`` interpolation gives strings."""
    value = options.get(key, default)
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise AdapterConfigError(key, f"must be a positive number, got {value!r}")
    return number


def whole_option(options: Mapping[str, Any], key: str, default: int, *, minimum: int = 1) -> int:
    """A whole number of at least ``minimum`` (strings read as numbers, as for :func:`number_option`)."""
    value = options.get(key, default)
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise AdapterConfigError(key, f"must be a whole number >= {minimum}, got {value!r}")
    return number


def flag_option(options: Mapping[str, Any], key: str, default: bool) -> bool:
    """true or false; the strings "true" and "false" too, as ``${VAR}`` interpolation gives them."""
    value = options.get(key, default)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise AdapterConfigError(key, f"must be true or false, got {value!r}")
    return value


AdapterFactory = Callable[[str, Mapping[str, Any]], Any]
"""``factory(provider_name, options) -> adapter``; may raise :class:`AdapterConfigError`."""


@dataclass(frozen=True)
class AdapterType:
    name: str
    factory: AdapterFactory
    categories: frozenset[Category]
    plugin: str = ""


class AdapterRegistry:
    """Adapter types by name, filled through the ``register_adapters`` hook."""

    def __init__(self) -> None:
        self._types: dict[str, AdapterType] = {}

    def register(self, name: str, factory: AdapterFactory, categories: Iterable[str | Category], *, plugin: str = "") -> None:
        if name in self._types:
            raise ValueError(f"adapter type {name!r} is registered twice (by {self._types[name].plugin or '?'} and {plugin or '?'})")
        self._types[name] = AdapterType(name, factory, frozenset(Category(c) for c in categories), plugin)

    def get(self, name: str) -> AdapterType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)


@dataclass(frozen=True)
class Recording:
    """The downloaded audio of an ``audio`` or ``call`` task, in a temporary file."""

    path: Path
    filename: str
    content_type: str
    size: int


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
        request = TextRequest(
            model=model,
            messages=task.messages(),
            temperature=task.temperature if task.temperature is not None else params.get("temperature"),
            max_tokens=task.max_tokens if task.max_tokens is not None else params.get("max_tokens"),
            params={k: v for k, v in params.items() if k not in ("temperature", "max_tokens")},
            timeout=timeout,
        )
        text: TextResult = await adapter.complete(request)
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
