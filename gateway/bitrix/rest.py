"""A small async client for the portal's REST API: ``ai.engine.register``, ``.list``, ``.unregister``.

Calls go to an inbound webhook (``https://<portal>/rest/<user>/<secret>/``) as
``POST {webhook}{method}`` with a JSON body. The webhook's secret never appears in an
error message or a log line: errors name the portal's host only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway import http
from gateway.backoff import Backoff
from gateway.redaction import Redactor

RATE_LIMIT_ERRORS = {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT"}


class PortalError(Exception):
    """The portal answered a REST call with an error (``code`` as the portal names it)."""

    def __init__(self, method: str, code: str, description: str, status: int | None = None) -> None:
        super().__init__(f"{method}: {code}: {description}" if description else f"{method}: {code}")
        self.method, self.code, self.description, self.status = method, code, description, status


class PortalUnreachable(PortalError):
    """The portal could not be reached, or kept answering "try later", within the retries."""


class PortalClient:
    def __init__(
        self,
        webhook: str,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        """``redactor``: the one masking this process's log lines, told the webhook's secret (the
        ``/rest/<user>/<secret>/`` pattern masks it in any case)."""
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.hostname or "/rest/" not in parts.path:
            raise ValueError("the portal webhook must look like https://<portal>/rest/<user>/<secret>/")
        self.webhook = webhook if webhook.endswith("/") else webhook + "/"
        if redactor is not None:
            for segment in parts.path.split("/rest/", 1)[1].split("/"):
                redactor.add(segment)  # the user id is short and skipped; the secret is masked everywhere
        self.host = parts.hostname
        self.retries, self.backoff = retries, Backoff(backoff)
        self._client = httpx.AsyncClient(transport=transport or http.transport(), timeout=timeout, follow_redirects=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> PortalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """The ``result`` of a REST call; retries rate limits, 5xx and transport errors with backoff."""
        last: PortalError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff.delay(attempt - 1))
            try:
                response = await self._client.post(self.webhook + method, json=dict(params or {}))
            except httpx.HTTPError as exc:
                last = PortalUnreachable(method, "UNREACHABLE", f"cannot reach {self.host}: {type(exc).__name__}")
                continue
            try:
                data = response.json()
            except ValueError:
                data = None
            if isinstance(data, dict) and "error" in data:
                error = PortalError(method, str(data["error"]), str(data.get("error_description") or ""), response.status_code)
                if error.code in RATE_LIMIT_ERRORS or response.status_code >= 500:
                    last = PortalUnreachable(method, error.code, error.description, response.status_code)
                    continue
                raise error
            if response.status_code >= 500 or response.status_code in (408, 429):
                last = PortalUnreachable(method, f"HTTP_{response.status_code}", f"{self.host} answered HTTP {response.status_code}", response.status_code)
                continue
            if response.status_code != 200 or not isinstance(data, dict) or "result" not in data:
                raise PortalError(method, f"HTTP_{response.status_code}", f"{self.host} gave an answer that is not a REST result", response.status_code)
            return data["result"]
        assert last is not None
        raise last

    async def register(self, *, name: str, code: str, category: str, completions_url: str, settings: Mapping[str, Any]) -> int:
        result = await self.call(
            "ai.engine.register",
            {
                "name": name,
                "code": code,
                "category": category,
                "completions_url": completions_url,
                "settings": dict(settings),
            },
        )
        return int(result)

    async def list(self) -> list[dict[str, Any]]:
        result = await self.call("ai.engine.list")
        return list(result or [])

    async def unregister(self, code: str) -> bool:
        return bool(await self.call("ai.engine.unregister", {"code": code}))
