"""Delivery: one path that returns every outcome, of every category, to the portal.

An attempt POSTs the stored outcome as JSON to ``callbackUrl`` (result) or
``errorCallbackUrl`` (failure), without following redirects, through the outbound URL
policy. The worker turns the answer into the job's next step: done, retry later, or
a final state.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway import http
from gateway.adapters import result_from_json
from gateway.bitrix import protocol
from gateway.config import DeliverySettings
from gateway.jobs.model import Attempt, Job
from gateway.netguard import OutboundPolicy, URLRefused
from gateway.redaction import redact

MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class DeliveryResult:
    outcome: str
    """delivered, gone, retry, rejected (portal refuses it for good) or refused (URL policy)."""
    attempt: Attempt


def callback_for(job: Job) -> tuple[str, dict[str, Any]]:
    """The URL and JSON body that carry this job's stored outcome to the portal."""
    assert job.outcome is not None, "delivery starts only after the outcome is stored"
    if job.outcome.result is not None:
        return job.callback_url, protocol.success_body(result_from_json(job.outcome.result), job.task.category)
    error = job.outcome.error
    assert error is not None
    return job.error_callback_url, protocol.error_body(error.message, error.code)


class Deliverer:
    def __init__(self, policy: OutboundPolicy, settings: DeliverySettings, *, rng: Callable[[], float] = random.random) -> None:
        self.policy, self.settings, self._rng = policy, settings, rng
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self._client = httpx.AsyncClient(
            transport=http.transport(self.policy, limits=httpx.Limits(max_connections=100, max_keepalive_connections=100)),
            follow_redirects=False,
            timeout=httpx.Timeout(self.settings.read_timeout, connect=self.settings.connect_timeout),
            headers={"User-Agent": "bitrix24-ai-gateway"},
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def backoff(self, attempts_so_far: int) -> float:
        cap = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(attempts_so_far, 30))
        return cap * (0.5 + self._rng() / 2)

    async def attempt(self, job: Job) -> DeliveryResult:
        assert self._client is not None
        url, body = callback_for(job)
        host = urlsplit(url).hostname or "?"
        started = time.time()

        def result(outcome: str, detail: str) -> DeliveryResult:
            return DeliveryResult(outcome, Attempt("callback", host, started, time.time() - started, outcome, redact(detail)[:500]))

        try:
            self.policy.check_url(url)
            timeout = max(0.1, min(self.settings.read_timeout, job.deadline - started))
            async with self._client.stream(
                "POST", url, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, timeout=timeout
            ) as response:
                answer = b""
                async for chunk in response.aiter_bytes():
                    answer += chunk
                    if len(answer) > MAX_ANSWER_BYTES:
                        break
        except URLRefused as exc:
            return result("refused", f"callback URL refused: {exc}")
        except httpx.HTTPError as exc:
            return result("retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        answer_kind = protocol.read_callback_answer(response.status_code, answer)
        return result(answer_kind.outcome, answer_kind.detail)
