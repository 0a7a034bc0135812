"""Bitrix24's OAuth server (``oauth.bitrix.info``) for emulated portals with an installed app.

It issues token pairs when a :class:`~gateway.bitrix.simulator.PortalEmulator` installs the app,
rotates them on ``GET /oauth/token/?grant_type=refresh_token`` (refresh tokens are single-use:
the used one and the access token issued with it stop working), answers ``app.info`` at
``{server_endpoint}app.info``, and refuses an uninstalled portal with ``invalid_client``, as
``bitrix24-app-mode.md`` §3 describes. Portals call it in-process to validate access tokens.
Tokens are random (``secrets``); refreshes are counted per portal so a test can assert that
exactly one refresh reached the server.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TokenState = Literal["valid", "expired", "invalid"]


class HasMemberId(Protocol):
    """A portal emulator, or anything naming a portal by its member_id."""

    @property
    def member_id(self) -> str: ...


def _member_id(portal: str | HasMemberId) -> str:
    return portal if isinstance(portal, str) else portal.member_id


DEFAULT_SCOPE = "ai_admin"


@dataclass
class OAuthClient:
    """An app's credentials: the Marketplace app's (any portal) or a local app's (``portal`` = its member_id only)."""

    client_id: str
    client_secret: str
    portal: str | None = None


@dataclass
class Installation:
    """The app on one portal, as the OAuth server knows it (keyed by member_id)."""

    member_id: str
    client_id: str
    portal_url: str
    status: str
    scope: str = DEFAULT_SCOPE
    version: int = 1
    installed: bool = True

    @property
    def domain(self) -> str:
        return urlsplit(self.portal_url).netloc

    @property
    def client_endpoint(self) -> str:
        return f"{self.portal_url}/rest/"


@dataclass
class TokenPair:
    member_id: str
    client_id: str
    user_id: int
    access_token: str
    refresh_token: str
    expires: float
    """Unix time the access token stops working."""
    access_valid: bool = True
    refresh_valid: bool = True


class OAuthEmulator:
    def __init__(self, client_id: str, client_secret: str, *, access_ttl: float = 3600) -> None:
        """``client_id``/``client_secret``: the Marketplace app, valid on every portal."""
        self.url = ""
        self.client_id, self.client_secret, self.access_ttl = client_id, client_secret, access_ttl
        self.clients: dict[str, OAuthClient] = {client_id: OAuthClient(client_id, client_secret)}
        self.installations: dict[str, Installation] = {}
        self.token_requests: list[dict[str, str]] = []
        """Every ``/oauth/token/`` query as received (a test double: nothing is masked)."""
        self._by_access: dict[str, TokenPair] = {}
        self._by_refresh: dict[str, TokenPair] = {}
        self._refreshes: dict[str, int] = {}
        self._accepted: dict[str, int] = {}
        self._down = False
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/oauth/token/", self._token, methods=["GET", "POST"]),
                Route("/rest/{method}", self._rest, methods=["GET", "POST"]),
            ]
        )

    # -- identity --------------------------------------------------------------------------
    @property
    def server_endpoint(self) -> str:
        return f"{self.url}/rest/"

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token/"

    @property
    def domain(self) -> str:
        """What the token answer calls ``domain``: the OAuth server's host, not the portal's."""
        return urlsplit(self.url).netloc

    # -- controls --------------------------------------------------------------------------
    def register_app(self, client_id: str, client_secret: str, portal: str | HasMemberId | None = None) -> OAuthClient:
        """Another app's credentials; ``portal`` (a portal or its member_id) makes it a local app valid only there."""
        client = OAuthClient(client_id, client_secret, None if portal is None else _member_id(portal))
        with self._lock:
            self.clients[client_id] = client
        return client

    def local_app(self, portal: str | HasMemberId) -> OAuthClient:
        """A portal's local app: ``local.<hex>`` and a secret, issued for that portal only."""
        return self.register_app(f"local.{secrets.token_hex(7)}.{secrets.token_hex(4)}", secrets.token_urlsafe(30), portal=portal)

    def down(self, flag: bool = True) -> None:
        """While down, every request answers 503."""
        self._down = flag

    def expire_tokens(self, member_id: str) -> None:
        """The portal's access tokens expire now (refresh tokens keep working)."""
        with self._lock:
            for pair in self._by_access.values():
                if pair.member_id == member_id:
                    pair.expires = min(pair.expires, time.time() - 1)

    def expire_refresh_tokens(self, member_id: str) -> None:
        """The portal's refresh tokens are past their lifetime: the next refresh is ``invalid_grant``."""
        with self._lock:
            for pair in self._by_refresh.values():
                if pair.member_id == member_id:
                    pair.refresh_valid = False

    def refreshes(self, member_id: str, *, accepted_only: bool = False) -> int:
        """Refresh requests that presented one of this portal's refresh tokens, refused ones included
        (two nodes racing show as 2 even though one got ``invalid_grant``)."""
        with self._lock:
            return (self._accepted if accepted_only else self._refreshes).get(member_id, 0)

    # -- what portals call in-process -------------------------------------------------------
    def issue(self, member_id: str, *, client_id: str, portal_url: str, status: str, user_id: int) -> TokenPair:
        """Install (or reinstall) the app on a portal and issue a fresh token pair for ``user_id``."""
        with self._lock:
            client = self.clients.get(client_id)
            if client is None:
                raise KeyError(f"no app with client_id {client_id!r} is registered at the OAuth emulator")
            if client.portal is not None and client.portal != member_id:
                raise ValueError(f"local app {client_id} belongs to another portal")
            self.installations[member_id] = Installation(member_id, client_id, portal_url, status)
            return self._new_pair(member_id, client_id, user_id)

    def user_tokens(self, member_id: str, user_id: int) -> TokenPair:
        """A fresh pair for another user of an installed portal (what the portal puts in ``auth``)."""
        with self._lock:
            installation = self.installations[member_id]
            if not installation.installed:
                raise ValueError("the app is not installed on this portal")
            return self._new_pair(member_id, installation.client_id, user_id)

    def revoke(self, member_id: str) -> None:
        """Uninstall: every token of the portal stops working; refreshes answer ``invalid_client``."""
        with self._lock:
            installation = self.installations.get(member_id)
            if installation is not None:
                installation.installed = False
            for pair in self._by_access.values():
                if pair.member_id == member_id:
                    pair.access_valid = pair.refresh_valid = False

    def moved(self, member_id: str, portal_url: str) -> None:
        """The portal was renamed: answers name its new domain and client_endpoint."""
        with self._lock:
            installation = self.installations.get(member_id)
            if installation is not None:
                installation.portal_url = portal_url

    def check(self, access_token: str) -> tuple[TokenState, TokenPair | None]:
        """What a portal's REST API makes of an access token."""
        with self._lock:
            pair = self._by_access.get(access_token)
            installation = self.installations.get(pair.member_id) if pair is not None else None
            if pair is None or installation is None or not installation.installed or not pair.access_valid:
                return "invalid", None
            if time.time() >= pair.expires:
                return "expired", pair
            return "valid", pair

    def _new_pair(self, member_id: str, client_id: str, user_id: int) -> TokenPair:
        pair = TokenPair(member_id, client_id, user_id, secrets.token_hex(32), secrets.token_hex(32), time.time() + self.access_ttl)
        self._by_access[pair.access_token] = pair
        self._by_refresh[pair.refresh_token] = pair
        return pair

    # -- HTTP ------------------------------------------------------------------------------
    async def _params(self, request: Request) -> dict[str, str]:
        params = dict(request.query_params)
        if request.method == "POST":
            if request.headers.get("content-type", "").startswith("application/json"):
                try:
                    body = await request.json()
                except ValueError:
                    body = {}
                if isinstance(body, dict):
                    params.update({str(k): str(v) for k, v in body.items()})
            else:
                form = await request.form()
                params.update({k: v for k, v in form.items() if isinstance(v, str)})
        return params

    async def _token(self, request: Request) -> Response:
        if self._down:
            return _error(503, "temporarily_unavailable", "The OAuth server is down (scripted)")
        params = await self._params(request)
        with self._lock:
            self.token_requests.append(params)
            if params.get("grant_type") != "refresh_token":
                return _error(400, "invalid_request", "Only grant_type=refresh_token is emulated")
            client = self.clients.get(params.get("client_id", ""))
            if client is None or not secrets.compare_digest(client.client_secret, params.get("client_secret", "")):
                return _error(401, "invalid_client", "Invalid client credentials")
            old = self._by_refresh.get(params.get("refresh_token", ""))
            if old is None:
                return _error(400, "invalid_grant", "Invalid refresh token")
            self._refreshes[old.member_id] = self._refreshes.get(old.member_id, 0) + 1
            installation = self.installations.get(old.member_id)
            if old.client_id != client.client_id:
                return _error(400, "invalid_grant", "The refresh token was issued to another client")
            if installation is None or not installation.installed or installation.client_id != client.client_id:
                return _error(401, "invalid_client", "Application not installed")
            if not old.refresh_valid:
                return _error(400, "invalid_grant", "The refresh token is used or expired")
            old.refresh_valid = old.access_valid = False
            self._accepted[old.member_id] = self._accepted.get(old.member_id, 0) + 1
            pair = self._new_pair(old.member_id, old.client_id, old.user_id)
            return JSONResponse(
                {
                    "access_token": pair.access_token,
                    "refresh_token": pair.refresh_token,
                    "expires": int(pair.expires),
                    "expires_in": math.ceil(self.access_ttl),
                    "client_endpoint": installation.client_endpoint,
                    "server_endpoint": self.server_endpoint,
                    "domain": self.domain,
                    "member_id": pair.member_id,
                    "scope": installation.scope,
                    "status": installation.status,
                    "user_id": pair.user_id,
                }
            )

    async def _rest(self, request: Request) -> Response:
        if self._down:
            return _error(503, "temporarily_unavailable", "The OAuth server is down (scripted)")
        method = request.path_params["method"].removesuffix(".json")
        if method != "app.info":
            return _error(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        state, pair = self.check((await self._params(request)).get("auth", ""))
        if state == "expired":
            return _error(401, "expired_token", "The access token provided has expired.")
        if state == "invalid" or pair is None:
            return _error(401, "invalid_token", "The access token provided is invalid.")
        installation = self.installations[pair.member_id]
        return JSONResponse(
            {
                "result": {
                    "client_id": pair.client_id,
                    "scope": installation.scope,
                    "expires": int(pair.expires),
                    "user_id": pair.user_id,
                    "install": {
                        "installed": installation.installed,
                        "version": installation.version,
                        "status": installation.status,
                        "scope": installation.scope,
                        "domain": installation.domain,
                        "uri": installation.portal_url,
                        "client_endpoint": installation.client_endpoint,
                        "member_id": installation.member_id,
                        "member_type": "PORTAL",
                    },
                }
            }
        )


def _error(status: int, code: str, description: str) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status)
