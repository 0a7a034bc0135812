"""API keys of the OpenAI-compatible API: who may call, which engines, how much.

Keys come from ``api_keys:`` in the config, each as the SHA-256 of the key (``sha256:<hex>``,
so the config file holds no usable secret) or as the key itself (best from ``${VAR}``; it is
then registered with the runtime's :class:`~gateway.redaction.Redactor`, so no log line shows
it). A presented key is hashed once and compared with every configured hash in constant time.

Limits are counted in this process (several ``gateway serve`` processes each count their
own): ``requests_per_minute`` over a sliding minute, ``tokens_per_day`` per UTC day from the
usage providers report (a request that starts under the limit may end over it).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.adapters import Usage
from gateway.config import ApiKeyConfig
from gateway.openai_api.errors import AUTHENTICATION, NOT_FOUND, RATE_LIMIT, APIError
from gateway.redaction import Redactor

WINDOW = 60.0
DAY = 86400


def key_digest(secret: str) -> bytes:
    """The SHA-256 of a key, as configured with ``sha256:<hex>``."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@dataclass
class ApiKey:
    """A configured key: its name (never its secret) and what it may do, with its counters."""

    config: ApiKeyConfig
    digest: bytes
    clock: Callable[[], float] = time.time
    _recent: collections.deque[float] = field(default_factory=collections.deque)
    _day: int = -1
    _tokens_today: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    def may_use(self, engine: str) -> bool:
        return "*" in self.config.engines or engine in self.config.engines

    def allowed(self, engines: Iterable[str]) -> list[str]:
        return [code for code in engines if self.may_use(code)]

    def admit(self) -> None:
        """Count a request against the key's limits; :class:`APIError` 429 when one is reached."""
        now = self.clock()
        limit = self.config.requests_per_minute
        if limit is not None:
            while self._recent and self._recent[0] <= now - WINDOW:
                self._recent.popleft()
            if len(self._recent) >= limit:
                wait = max(1, int(self._recent[0] + WINDOW - now) + 1)
                raise APIError(
                    429,
                    f"rate limit reached for key {self.name!r}: {limit} requests per minute; try again in {wait} s",
                    type=RATE_LIMIT,
                    code="rate_limit_exceeded",
                )
        if self.config.tokens_per_day is not None:
            self._roll_day(now)
            if self._tokens_today >= self.config.tokens_per_day:
                raise APIError(
                    429,
                    f"token limit reached for key {self.name!r}: {self.config.tokens_per_day} tokens per day (UTC); used {self._tokens_today}",
                    type=RATE_LIMIT,
                    code="tokens_per_day_exceeded",
                )
        if limit is not None:
            self._recent.append(now)

    def count_usage(self, usage: Usage | None) -> None:
        """Add what a request used to today's tokens."""
        if usage is None or self.config.tokens_per_day is None:
            return
        self._roll_day(self.clock())
        used = usage.total_tokens or (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
        self._tokens_today += max(0, int(used))

    def _roll_day(self, now: float) -> None:
        day = int(now // DAY)
        if day != self._day:
            self._day, self._tokens_today = day, 0


class KeyRing:
    """The configured keys; :meth:`authenticate` turns an ``Authorization`` header into one of them."""

    def __init__(self, keys: Iterable[ApiKeyConfig], redactor: Redactor | None = None, clock: Callable[[], float] = time.time) -> None:
        self.keys: list[ApiKey] = []
        for config in keys:
            if config.secret.startswith("sha256:"):
                digest = bytes.fromhex(config.secret.removeprefix("sha256:"))
            else:
                digest = key_digest(config.secret)
                if redactor is not None:
                    redactor.add(config.secret)
            self.keys.append(ApiKey(config, digest, clock))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an ``Authorization: Bearer <key>`` header presents; :class:`APIError` 401 otherwise.

        Every configured hash is compared, in constant time, whatever matches: the answer's
        timing says nothing about which key, or how much of one, was right."""
        scheme, _, presented = (authorization or "").strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise APIError(
                401,
                "no API key: send it as `Authorization: Bearer <key>` (the OpenAI SDK does, from api_key or OPENAI_API_KEY)",
                type=AUTHENTICATION,
                code="missing_api_key",
            )
        digest = key_digest(presented[:1024])
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise APIError(401, "incorrect API key provided", type=AUTHENTICATION, code="invalid_api_key")
        return found


def model_not_found(model: str) -> APIError:
    """404 for an unknown engine and for one this key may not use alike, as OpenAI answers: no probing for codes."""
    return APIError(404, f"the model {model[:100]!r} does not exist or you do not have access to it", type=NOT_FOUND, param="model", code="model_not_found")
