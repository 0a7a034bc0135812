"""Keeping secrets out of logs and error messages.

Two layers: the exact values the gateway knows to be secret (engine tokens, provider
keys and headers) are registered at start-up, and patterns catch the rest (the portal's
callback ``hash``, bearer tokens, ``api_key=...`` pairs). Every log line passes through
:class:`RedactingFormatter`, tracebacks included; error texts stored with a job or sent
to a portal pass through :func:`redact`.
"""

from __future__ import annotations

import logging
import re
import sys

MASK = "***"
_secrets: set[str] = set()
_PATTERNS = [
    (re.compile(r"(hash=)[^&\s\"']+"), r"\1" + MASK),
    (re.compile(r"(/engines/[^/\s]+/)[^/\s]+(/completions)"), r"\1" + MASK + r"\2"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    (re.compile(r"(?i)((?:api[_-]?key|access_token|refresh_token|token|secret|password|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',&}]+"), r"\1" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-" + MASK),
    (re.compile(r"(/rest/\d+/)[^/\s]+"), r"\1" + MASK),
]


def add_secret(value: str | None) -> None:
    """Register a value that must never be printed. Short values are ignored (too many false hits)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(level: str = "INFO") -> None:
    """Route every logger (uvicorn's too) through one redacting handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
