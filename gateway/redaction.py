"""Keeping secrets out of logs and error messages.

Two layers: the exact values a runtime knows to be secret (engine tokens, provider keys and
headers) are added to its :class:`Redactor`, and patterns catch the rest (the portal's
callback ``hash``, bearer tokens, ``api_key=...`` pairs). The secrets are the redactor's, not
the process's: two runtimes in one process (tests do this) neither share nor leak each
other's. Every log line passes through :class:`RedactingFormatter`, tracebacks included;
error texts stored with a job or sent to a portal pass through :meth:`Redactor.redact`.
"""

from __future__ import annotations

import logging
import re
import sys

MASK = "***"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MIN_SECRET_LENGTH = 6
"""Shorter values are not registered: they would mask too many innocent words."""
_PATTERNS = [
    (re.compile(r"(hash=)[^&\s\"']+"), r"\1" + MASK),
    (re.compile(r"(/engines/[^/\s]+/)[^/\s]+(/completions)"), r"\1" + MASK + r"\2"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    (re.compile(r"(?i)((?:api[_-]?key|access_token|refresh_token|token|secret|password|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',&}]+"), r"\1" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-" + MASK),
    (re.compile(r"(/rest/\d+/)[^/\s]+"), r"\1" + MASK),
]


class Redactor:
    """The secrets of one runtime, masked (with the patterns) in every text it is given.

    A component built without one gets an empty redactor: the patterns still apply."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, value: str | None) -> None:
        """Register a value that must never be printed. Short values are ignored (too many false hits)."""
        if value and len(value) >= MIN_SECRET_LENGTH:
            self._secrets.add(value)

    def __contains__(self, value: object) -> bool:
        return value in self._secrets

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):  # longest first: a secret containing another is masked whole
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


class RedactingFormatter(logging.Formatter):
    """Masks a formatted log line with its redactor. A formatter rather than a :class:`logging.Filter`:
    the traceback text exists only once the record is formatted, and it must be masked too."""

    def __init__(self, redactor: Redactor, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(super().format(record))


def configure_logging(redactor: Redactor, level: str = "INFO") -> None:
    """Route every logger (uvicorn's too) through one handler on stderr that masks ``redactor``'s secrets.

    Logging is process-wide, so this is called once per process (``gateway serve``/``gateway worker``)
    with the redactor of the runtime that process runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
