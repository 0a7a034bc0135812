"""A small async client for the portal's REST API: ``ai.engine.register``, ``.list``, ``.unregister``
(and ``event.bind`` for app mode).

Two ways in: an inbound webhook (``https://<portal>/rest/<user>/<secret>/``, webhook mode), where
calls are ``POST {webhook}{method}`` with a JSON body; or an installed app's OAuth token (app mode,
:meth:`PortalClient.for_app`), where the body carries ``auth`` and an ``expired_token`` answer is
met by refreshing the token once (:class:`TokenSource`) and trying again. A portal that was renamed
answers 302: the call is POSTed again to the new address and the client reports the move.
Secrets (the webhook's, tokens) never appear in an error message or a log line: errors name the
portal's host only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
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


class TokenSource(Protocol):
    """An installed app's access token for one portal, and a way to a newer one."""

    async def token(self) -> str: ...

    async def refreshed(self, expired: str) -> str:
        """A token newer than ``expired`` (refreshed once for every caller; see the tenant store)."""
        ...


MAX_MOVES = 3
"""Renames followed within one call (a 302 to the portal's new address)."""


class PortalClient:
    tokens: TokenSource | None = None
    on_moved: Callable[[str], Awaitable[None]] | None = None

    @classmethod
    def for_app(
        cls,
        client_endpoint: str,
        tokens: TokenSource,
        *,
        on_moved: Callable[[str], Awaitable[None]] | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> PortalClient:
        """A client that calls ``{client_endpoint}{method}`` with the app's token in ``auth``;
        ``on_moved(new_client_endpoint)`` is awaited when the portal answers that it was renamed."""
        client = cls.__new__(cls)
        parts = urlsplit(client_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the portal's client_endpoint must look like https://<portal>/rest/")
        client.webhook = client_endpoint if client_endpoint.endswith("/") else client_endpoint + "/"
        client.host = parts.hostname
        client.retries, client.backoff = retries, Backoff(backoff)
        client._client = httpx.AsyncClient(transport=transport or http.transport(), timeout=timeout, follow_redirects=False)
        client.tokens, client.on_moved = tokens, on_moved
        return client

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

    async def _post(self, method: str, params: Mapping[str, Any]) -> httpx.Response:
        """One POST, with the app's token when there is one: refreshed once on ``expired_token``, and
        sent again to the new address when the portal was renamed (302)."""
        body = dict(params)
        token = await self.tokens.token() if self.tokens is not None else None
        refreshed = False
        moves = 0
        while True:
            if token is not None:
                body["auth"] = token
            response = await self._client.post(self.webhook + method, json=body)
            if response.status_code in (301, 302, 307, 308) and self.tokens is not None and moves < MAX_MOVES:
                moves += 1
                await self._moved(method, response.headers.get("location", ""))
                continue
            if response.status_code == 401 and self.tokens is not None and token is not None and not refreshed and _error_code(response) == "expired_token":
                token, refreshed = await self.tokens.refreshed(token), True
                continue
            return response

    async def _moved(self, method: str, location: str) -> None:
        """Follow a rename: the new endpoint is the Location without the method (``.../rest/``)."""
        new = urlsplit(location)
        if new.scheme not in ("http", "https") or not new.hostname or "/rest/" not in new.path:
            raise PortalError(method, "BAD_REDIRECT", f"{self.host} redirected to an address that is not a portal's REST API")
        endpoint = f"{new.scheme}://{new.netloc}{new.path.split('/rest/', 1)[0]}/rest/"
        self.webhook, self.host = endpoint, new.hostname
        if self.on_moved is not None:
            await self.on_moved(endpoint)

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """The ``result`` of a REST call; retries rate limits, 5xx and transport errors with backoff."""
        last: PortalError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff.delay(attempt - 1))
            try:
                response = await self._post(method, params or {})
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


def _error_code(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return ""
    return str(data.get("error") or "") if isinstance(data, dict) else ""
