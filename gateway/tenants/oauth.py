"""Bitrix's OAuth server: ``app.info`` (is this install real?) and token refresh.

Only the hosts in ``app.oauth_servers`` are called: an install event names its own
``server_endpoint``, and a forged one must not turn the gateway into a proxy to anywhere.
``client_secret`` goes to the OAuth server only, in the query string it expects, and never
into an error message or a log line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from gateway import http
from gateway.netguard import OutboundPolicy, URLRefused
from gateway.tenants.model import Tokens


class OAuthError(Exception):
    """The OAuth server refused (``code`` as it names it: ``invalid_grant``, ``invalid_client``,
    ``expired_token``...) or could not be reached (``code`` ``unreachable``)."""

    def __init__(self, code: str, description: str = "", status: int | None = None) -> None:
        super().__init__(f"{code}: {description}" if description else code)
        self.code, self.description, self.status = code, description, status

    @property
    def retryable(self) -> bool:
        return self.code == "unreachable" or (self.status or 0) >= 500


@dataclass(frozen=True)
class Installation:
    """What ``app.info`` on the OAuth server says about the token's installation."""

    member_id: str
    domain: str
    client_id: str
    status: str
    installed: bool


def token_url(server_endpoint: str) -> str:
    """``https://oauth.bitrix.info/rest/`` → ``https://oauth.bitrix.info/oauth/token/``."""
    base = server_endpoint.rstrip("/")
    base = base.removesuffix("/rest")
    return f"{base}/oauth/token/"


class OAuthClient:
    def __init__(self, servers: tuple[str, ...], *, allow_private_networks: bool, timeout: float = 15.0) -> None:
        self.policy = OutboundPolicy(servers, allow_private_networks)
        self._client = httpx.AsyncClient(transport=http.transport(self.policy), timeout=timeout, follow_redirects=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    def trusted(self, server_endpoint: str) -> bool:
        try:
            self.policy.check_url(server_endpoint)
        except URLRefused:
            return False
        return True

    async def _get(self, url: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            self.policy.check_url(url)
        except URLRefused as exc:
            raise OAuthError("untrusted_server", f"the OAuth server is not in app.oauth_servers ({exc})") from None
        try:
            response = await self._client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise OAuthError("unreachable", f"cannot reach the OAuth server: {type(exc).__name__}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise OAuthError("unreachable" if response.status_code >= 500 else "bad_answer", f"HTTP {response.status_code}", response.status_code)
        if "error" in data or response.status_code != 200:
            description = str(data.get("error_description") or "")[:200]
            raise OAuthError(str(data.get("error") or f"HTTP_{response.status_code}")[:60], description, response.status_code)
        return data

    async def app_info(self, server_endpoint: str, access_token: str) -> Installation:
        data = await self._get(f"{server_endpoint}app.info", {"auth": access_token})
        result = data.get("result")
        install = result.get("install") if isinstance(result, dict) else None
        if not isinstance(result, dict) or not isinstance(install, dict):
            raise OAuthError("bad_answer", "app.info answered without an install")
        return Installation(
            member_id=str(install.get("member_id") or ""),
            domain=str(install.get("domain") or "").lower(),
            client_id=str(result.get("client_id") or ""),
            status=str(install.get("status") or ""),
            installed=bool(install.get("installed")),
        )

    async def refresh(self, server_endpoint: str, client_id: str, client_secret: str, refresh_token: str) -> tuple[Tokens, dict[str, Any]]:
        """New tokens (the refresh token is single-use: store the new one) and the rest of the answer
        (``client_endpoint``, ``member_id``...)."""
        params = {"grant_type": "refresh_token", "client_id": client_id, "client_secret": client_secret, "refresh_token": refresh_token}
        data = await self._get(token_url(server_endpoint), params)
        access, refresh = data.get("access_token"), data.get("refresh_token")
        if not isinstance(access, str) or not isinstance(refresh, str) or not access or not refresh:
            raise OAuthError("bad_answer", "the token answer has no tokens")
        try:
            expires = float(data.get("expires") or time.time() + float(data.get("expires_in") or 3600))
        except (TypeError, ValueError):
            expires = time.time() + 3600
        return Tokens(access, refresh, expires), data
