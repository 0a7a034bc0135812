"""Engines as the portal sees them: codes, secret tokens and completions URLs.

An engine without a ``token`` in the config gets a random one, generated once and kept
in ``data_dir/engine-tokens.json`` (mode 0600), so the embedded default runs without
any secret to invent while the URL stays stable across restarts.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, EngineConfig

TOKENS_FILE = "engine-tokens.json"
_UNKNOWN_ENGINE_TOKEN = secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Engine:
    config: EngineConfig
    token: str
    completions_url: str

    @property
    def code(self) -> str:
        return self.config.code


def completions_path(code: str, token: str) -> str:
    return f"/engines/{code}/{token}/completions"


class EngineDirectory:
    def __init__(self, config: Config) -> None:
        generated = _load_or_generate_tokens(config)
        self._engines: dict[str, Engine] = {}
        for engine in config.engines:
            token = engine.token or generated[engine.code]
            url = config.public_url + completions_path(engine.code, token)
            self._engines[engine.code] = Engine(engine, token, url)

    def __iter__(self) -> Iterator[Engine]:
        return iter(self._engines.values())

    def get(self, code: str) -> Engine | None:
        return self._engines.get(code)

    def authenticate(self, code: str, token: str) -> Engine | None:
        """The engine if ``token`` is its token (constant-time comparison), else None."""
        engine = self._engines.get(code)
        # An unknown code costs the same comparison as a known one: timing tells no codes apart.
        expected = engine.token if engine is not None else _UNKNOWN_ENGINE_TOKEN
        matches = hmac.compare_digest(expected.encode(), token.encode("utf-8", "surrogatepass"))
        return engine if matches and engine is not None else None


def tokens_path(config: Config) -> Path:
    """Where generated engine tokens are kept (``gateway engines list`` shows it)."""
    return Path(config.data_dir) / TOKENS_FILE


def _load_or_generate_tokens(config: Config) -> dict[str, str]:
    missing = [e.code for e in config.engines if not e.token]
    if not missing:
        return {}
    path = tokens_path(config)
    tokens: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if all(code in tokens for code in missing):
        return tokens
    for code in missing:
        tokens.setdefault(code, secrets.token_urlsafe(24))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(tokens, handle, indent=2)
    os.replace(tmp, path)
    return tokens
