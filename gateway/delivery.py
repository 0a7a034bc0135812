"""Delivery: one path that returns every outcome, of every category, to the portal.

An attempt POSTs the stored outcome as JSON to ``callbackUrl`` (result) or
``errorCallbackUrl`` (failure), without following redirects, through the outbound URL
policy. The worker turns the answer into the job's next step: done, retry later, or
a final state. :meth:`Deliverer.attempt` never raises: a URL that cannot be sent to is
``refused`` (final), an unexpected error is ``error`` (the worker retries it a bounded
number of times).

Callbacks run in their own pool, one lane per portal host (:class:`PortalLanes`): at most
``delivery.max_in_flight_per_portal`` POSTs in flight to one host, so a slow or hung
portal only slows its own jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from gateway import http
from gateway.adapters import result_from_json
from gateway.backoff import Backoff
from gateway.bitrix import protocol
from gateway.config import DeliverySettings
from gateway.netguard import OutboundPolicy, URLRefused
from gateway.outcomes import Attempt, AttemptKind, DeliveryOutcome, Outcome
from gateway.redaction import Redactor
from gateway.tasks import Task

log = logging.getLogger("gateway.delivery")

MAX_ANSWER_BYTES = 64 * 1024
MAX_CONNECTIONS = 512
WAITING_PER_SLOT = 8
"""Deliveries that may wait in line for a portal, per callback slot it has; beyond, they go back to the queue."""
SENT_THEN_LOST = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)
"""Failures after the request went out: the portal may have taken the callback."""


class Deliverable(Protocol):
    """What delivery needs of a job whose outcome is stored (the queue's ``Job`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def task(self) -> Task: ...
    @property
    def callback_url(self) -> str: ...
    @property
    def error_callback_url(self) -> str: ...
    @property
    def outcome(self) -> Outcome | None: ...
    @property
    def deadline(self) -> float: ...


@dataclass(frozen=True)
class DeliveryResult:
    outcome: DeliveryOutcome
    attempt: Attempt
    maybe_consumed: bool = False
    """The body was sent and the answer lost (a read timeout, a broken connection): the portal may have taken it."""


def portal_host(url: str) -> str:
    """The host name a portal's URL points at (the lane, the metric label, an attempt's target),
    as accept parsed it; "?" if it cannot be parsed."""
    try:
        return protocol.parse_outbound_url(url, "URL").host
    except protocol.ProtocolError:
        return "?"


def delivery_url(job: Deliverable) -> str:
    """The URL this job's outcome goes to: ``callbackUrl`` for a result, else ``errorCallbackUrl``."""
    return job.callback_url if job.outcome is None or job.outcome.result is not None else job.error_callback_url


def callback_body(job: Deliverable) -> dict[str, Any]:
    """The JSON body that carries this job's stored outcome to the portal (to :func:`delivery_url`)."""
    assert job.outcome is not None, "delivery starts only after the outcome is stored"
    if job.outcome.result is not None:
        return protocol.success_body(result_from_json(job.outcome.result), job.task.category)
    error = job.outcome.error
    assert error is not None
    return protocol.error_body(error.message, error.code)


class Deliverer:
    def __init__(
        self, policy: OutboundPolicy, settings: DeliverySettings, *, rng: Callable[[], float] = random.random, redactor: Redactor | None = None
    ) -> None:
        self.policy, self.settings = policy, settings
        self.redactor = redactor or Redactor()
        """Masks the runtime's secrets in the attempt details stored with a job."""
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max, rng)
        """The pause before the next callback attempt (and, in the worker, after an unexpected error)."""
        self.deferral = Backoff(settings.read_timeout, settings.read_timeout, rng)
        """How long a delivery that found its portal's lane full waits before trying again: up to one
        callback's read timeout, jittered so that the jobs put back together do not return together."""
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self._client = httpx.AsyncClient(
            transport=http.transport(self.policy, limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100)),
            follow_redirects=False,
            timeout=httpx.Timeout(self.settings.read_timeout, connect=self.settings.connect_timeout),
            headers={"User-Agent": "bitrix24-ai-gateway"},
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def attempt(self, job: Deliverable) -> DeliveryResult:
        """One callback POST; never raises (but for cancellation)."""
        assert self._client is not None
        url = delivery_url(job)
        started = time.time()
        try:  # parsed and checked by the same code as at accept: a URL accepted then is sent as checked
            origin: httpx.URL | None = protocol.parse_outbound_url(url, "callback URL")
        except protocol.ProtocolError as exc:
            origin, unusable = None, exc.message
        host = origin.host if origin is not None else "?"

        def result(outcome: DeliveryOutcome, detail: str, maybe_consumed: bool = False) -> DeliveryResult:
            attempt = Attempt(AttemptKind.CALLBACK, host, started, time.time() - started, outcome, self.redactor.redact(detail)[:500])
            return DeliveryResult(outcome, attempt, maybe_consumed)

        if origin is None:
            return result(DeliveryOutcome.REFUSED, f"the callback cannot be sent: {unusable}")
        try:
            self.policy.check_url(str(origin))
            body = callback_body(job)
            timeout = max(0.1, min(self.settings.read_timeout, job.deadline - started))
            request = self._client.build_request(
                "POST",
                url,
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            )
        except URLRefused as exc:
            return result(DeliveryOutcome.REFUSED, f"callback URL refused: {exc}")
        except Exception as exc:  # deterministic: the same URL and outcome fail the same way every time
            return result(DeliveryOutcome.REFUSED, f"the callback cannot be sent: {_describe(exc)}")
        try:
            response = await self._client.send(request, stream=True)
            try:
                answer = b""
                async for chunk in response.aiter_bytes():
                    answer += chunk
                    if len(answer) > MAX_ANSWER_BYTES:
                        break
            finally:
                await response.aclose()
        except URLRefused as exc:  # at connect time: the name resolved to an address the policy refuses
            return result(DeliveryOutcome.REFUSED, f"callback URL refused: {exc}")
        except SENT_THEN_LOST as exc:
            return result(DeliveryOutcome.RETRY, f"{_describe(exc)} (after the callback was sent: the portal may have taken it)", maybe_consumed=True)
        except httpx.HTTPError as exc:
            return result(DeliveryOutcome.RETRY, _describe(exc))
        except Exception as exc:
            log.error("job %s: unexpected error during a callback POST to %s", job.id, host, exc_info=exc)
            return result(DeliveryOutcome.ERROR, f"unexpected error during the callback POST: {_describe(exc)}")
        answer_kind = protocol.read_callback_answer(response.status_code, answer)
        return result(answer_kind.outcome, answer_kind.detail)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class PortalLanes:
    """One lane per portal host: at most ``per_portal`` callbacks in flight to it, and up to
    ``WAITING_PER_SLOT`` times as many waiting in line; a delivery beyond that is not admitted
    (the worker puts it back in the queue for a while), so a hung portal holds a bounded part
    of the gateway and the other portals' lanes stay free."""

    def __init__(self, per_portal: int) -> None:
        self.per_portal = per_portal
        self.max_users = per_portal * (1 + WAITING_PER_SLOT)
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    def users(self, host: str) -> int:
        """Deliveries to this host in flight or waiting for a slot."""
        return self._users.get(host, 0)

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[bool]:
        """Yields True while holding one of the host's slots, or False at once when its line is full."""
        if self._users.get(host, 0) >= self.max_users:
            yield False
            return
        semaphore = self._semaphores.setdefault(host, asyncio.Semaphore(self.per_portal))
        self._users[host] = self._users.get(host, 0) + 1
        try:
            async with semaphore:
                yield True
        finally:
            self._users[host] -= 1
            if not self._users[host]:  # idle lanes are dropped: hosts come and go
                del self._users[host], self._semaphores[host]
