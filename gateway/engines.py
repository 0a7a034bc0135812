"""Engines as the portal sees them: codes, secret tokens and completions URLs.

An engine without a ``token`` in the config gets a random one, generated once and kept in a
:class:`TokenStore`: ``data_dir/engine-tokens.json`` (mode 0600) on the embedded default, the
shared database with PostgreSQL (every node serves the same URLs). So the embedded default runs
without any secret to invent while the URL stays stable across restarts.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


def mask_token(url: str, token: str) -> str:
    """A URL with its secret part cut to four characters: enough to tell two apart, not to use one
    (what `gateway serve` prints and the dashboard shows before the URL is revealed)."""
    return url.replace(token, token[:4] + "…") if token else url


class TokenStore(Protocol):
    """Where engines without a configured ``token`` keep the one generated for them."""

    where: str
    """Told to the user (``gateway engines list``): a file, or the shared database."""

    def load(self, codes: Sequence[str]) -> dict[str, str]:
        """The generated token of each code, generating the missing ones: once, for every process
        that shares this store (the completions URLs must not change between restarts or nodes)."""
        ...


class EngineDirectory:
    def __init__(self, config: Config, store: TokenStore) -> None:
        missing = [engine.code for engine in config.engines if not engine.token]
        generated = store.load(missing) if missing else {}
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
    """Where the embedded default keeps generated engine tokens."""
    return Path(config.data_dir) / TOKENS_FILE


class FileTokenStore:
    """Generated tokens in a JSON file (mode 0600) in ``data_dir``: the embedded default."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def load(self, codes: Sequence[str]) -> dict[str, str]:
        tokens: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}
        if all(code in tokens for code in codes):
            return tokens
        for code in codes:
            tokens.setdefault(code, new_engine_token())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(tokens, handle, indent=2)
        os.replace(tmp, self.path)
        return tokens


def new_engine_token() -> str:
    """192 random bits, URL-safe: the secret part of a completions URL."""
    return secrets.token_urlsafe(24)
