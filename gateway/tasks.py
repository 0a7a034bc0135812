"""The task: one portal request, normalised, as workers, adapters and plugins see it.

A task carries no secrets: the engine token, the callback URLs (whose ``hash`` is the
portal's only secret) and the portal's ``auth`` block stay out of it, so a plugin may log
or export a task freely.

The portal's prompt arrives in a different shape per category; the protocol module
(:mod:`gateway.bitrix.protocol`) checks it and turns it into one of the typed prompts
below, so nothing past it reads a raw portal key.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


class Category(enum.StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    CALL = "call"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class TextPrompt:
    """A ``text`` request: the user's message (the portal's string ``prompt``)."""

    text: str
    kind: ClassVar[str] = "text"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text}


IMAGE_FORMATS = ("square", "portrait", "landscape")
"""The picture shapes the portal asks for (``prompt.format``); the config maps each to a size."""


@dataclass(frozen=True)
class ImagePrompt:
    """An ``image`` request: what to draw, in which style and shape, how many pictures."""

    text: str
    style: str | None = None
    format: str | None = None
    """square, portrait or landscape (``IMAGE_FORMATS``); None means square."""
    images_number: int | None = None
    """Pictures asked for; None means one. The engine's ``max_images`` caps it."""
    kind: ClassVar[str] = "image"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "style": self.style, "format": self.format, "images_number": self.images_number}


@dataclass(frozen=True)
class AudioPrompt:
    """An ``audio`` request: a recording to transcribe, which the worker downloads."""

    file_url: str
    """The recording's URL (on the portal), checked by the outbound policy at accept."""
    mime: str | None = None
    """The content type the portal declares (``fields.type``), if any."""
    hint: str | None = None
    """Names, terms or style for the model (``fields.prompt``); None when empty."""
    extension: str | None = None
    """The file extension the portal declares (``fileExtension``), if any."""
    fields: Mapping[str, Any] = field(default_factory=dict)
    """Every field the portal sent with the recording (``type``, ``prompt`` and others, such as
    ``detectEmotions``), for plugins."""
    kind: ClassVar[str] = "audio"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "file_url": self.file_url, "mime": self.mime, "hint": self.hint, "extension": self.extension, "fields": dict(self.fields)}


@dataclass(frozen=True)
class CallPrompt(AudioPrompt):
    """A ``call`` request: a call recording, transcribed into timed phrases."""

    kind: ClassVar[str] = "call"


Prompt = TextPrompt | ImagePrompt | AudioPrompt | CallPrompt
PROMPT_TYPES: dict[Category, type[TextPrompt] | type[ImagePrompt] | type[AudioPrompt]] = {
    Category.TEXT: TextPrompt,
    Category.IMAGE: ImagePrompt,
    Category.AUDIO: AudioPrompt,
    Category.CALL: CallPrompt,
}


def audio_hint(value: Any) -> str | None:
    """The model hint from the portal's ``fields.prompt``: a non-blank string, else None."""
    return value if isinstance(value, str) and value.strip() else None


def prompt_from_json(category: Category, data: Any) -> Prompt:
    """A stored prompt back into its type. Queues written before prompts were typed stored the
    portal's own shape (a string for text, the checked prompt object for the others): read too."""
    if isinstance(data, Mapping) and "kind" in data:
        fields = {k: v for k, v in data.items() if k != "kind"}
        return PROMPT_TYPES[category](**fields)
    if category is Category.TEXT:
        return TextPrompt(str(data))
    if category is Category.IMAGE:
        return ImagePrompt(data["prompt"], data.get("style"), data.get("format"), data.get("images_number"))
    portal_fields = data.get("fields") or {}
    audio_type = CallPrompt if category is Category.CALL else AudioPrompt
    return audio_type(data["file"], portal_fields.get("type"), audio_hint(portal_fields.get("prompt")), data.get("fileExtension"), portal_fields)


@dataclass
class Task:
    job_id: str
    engine: str
    category: Category
    prompt: Prompt
    """The request's typed prompt: :class:`TextPrompt`, :class:`ImagePrompt`, :class:`AudioPrompt` or :class:`CallPrompt`."""
    system: str | None = None
    context: list[Message] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    language: str | None = None
    """Full language name as the portal sends it ("English"), if any."""
    ttl: int = 14400
    accepted_at: float = 0.0
    deadline: float = 0.0
    """Unix time after which the portal no longer accepts a callback."""
    portal: str = ""
    """Host of the portal that sent the request."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other key of the portal's request (``payload_*``, ``bx_*``, ...), ``auth`` excluded."""
    tenant: str = ""
    """App mode: the installed portal's id (a hash of its ``member_id``, as in metrics labels); empty in webhook mode."""

    def messages(self) -> list[Message]:
        """Chat messages as the protocol recommends: system role, context, then the prompt."""
        messages: list[Message] = []
        if self.system:
            messages.append(Message("system", self.system))
        messages.extend(self.context)
        messages.append(Message("user", self.prompt.text if isinstance(self.prompt, (TextPrompt, ImagePrompt)) else str(self.prompt)))
        return messages

    def to_json(self) -> dict[str, Any]:
        # Explicit rather than dataclasses.asdict, whose deep copy costs ~40 us on the accept path.
        return {
            "job_id": self.job_id,
            "engine": self.engine,
            "category": self.category.value,
            "prompt": self.prompt.to_json(),
            "system": self.system,
            "context": [{"role": m.role, "content": m.content} for m in self.context],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "language": self.language,
            "ttl": self.ttl,
            "accepted_at": self.accepted_at,
            "deadline": self.deadline,
            "portal": self.portal,
            "extra": self.extra,
            "tenant": self.tenant,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        data = dict(data)
        data["category"] = category = Category(data["category"])
        data["prompt"] = prompt_from_json(category, data["prompt"])
        data["context"] = [Message(**m) for m in data.get("context", [])]
        return cls(**data)


class TaskRefused(Exception):
    """Raised by a ``prepare_task`` hook to refuse a task; the portal gets an error callback.

    ``code`` is sent to the portal: 100 or >= 500 shows the user "AI provider error",
    anything else "Request has failed".
    """

    def __init__(self, message: str, code: int | str = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
