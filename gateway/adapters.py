"""What a provider adapter implements, and the typed requests and results it exchanges.

An adapter is created once per configured provider (``providers.<name>`` in the config)
by the factory a plugin registered under an adapter type. The core calls the one method
that matches the task's category; the adapter answers with a typed result or raises
:class:`AdapterError` saying whether trying again could help.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gateway.tasks import Message


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


@dataclass(frozen=True)
class TextChunk:
    """A piece of a streamed answer: text as the model produced it, and at the end the usage and why it stopped."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    """``stop``, ``length`` or another reason, on the last chunk (when the provider says)."""


@runtime_checkable
class StreamingTextAdapter(Protocol):
    """A text adapter that can also stream (optional: the OpenAI-compatible API answers in one chunk otherwise).

    ``stream`` is an async generator of :class:`TextChunk`. An :class:`AdapterError` raised before
    the first chunk lets the route fall back to its next target; after it, the error ends the stream.
    Closing the generator (``aclose``, as when the client disconnects) must stop the provider's
    call: close the HTTP response, or tell the local generation to stop."""

    def stream(self, request: TextRequest) -> AsyncIterator[TextChunk]: ...


@runtime_checkable
class ImageAdapter(Protocol):
    async def generate_image(self, request: ImageRequest) -> ImageResult: ...


@runtime_checkable
class AudioAdapter(Protocol):
    async def transcribe(self, request: AudioRequest) -> Transcript: ...
