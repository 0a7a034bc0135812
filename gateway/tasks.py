"""The task: one portal request, normalised, as workers, adapters and plugins see it.

A task carries no secrets: the engine token, the callback URLs (whose ``hash`` is the
portal's only secret) and the portal's ``auth`` block stay out of it, so a plugin may log
or export a task freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Category(str, enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    CALL = "call"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class Task:
    job_id: str
    engine: str
    category: Category
    prompt: Any
    """A string for ``text``; the portal's prompt object for the other categories."""
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

    def messages(self) -> list[Message]:
        """Chat messages as the protocol recommends: system role, context, then the prompt."""
        messages: list[Message] = []
        if self.system:
            messages.append(Message("system", self.system))
        messages.extend(self.context)
        messages.append(Message("user", self.prompt if isinstance(self.prompt, str) else str(self.prompt)))
        return messages

    def to_json(self) -> dict[str, Any]:
        # Explicit rather than dataclasses.asdict, whose deep copy costs ~40 us on the accept path.
        return {
            "job_id": self.job_id, "engine": self.engine, "category": self.category.value, "prompt": self.prompt,
            "system": self.system, "context": [{"role": m.role, "content": m.content} for m in self.context],
            "temperature": self.temperature, "max_tokens": self.max_tokens, "language": self.language,
            "ttl": self.ttl, "accepted_at": self.accepted_at, "deadline": self.deadline, "portal": self.portal,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        data = dict(data)
        data["category"] = Category(data["category"])
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
