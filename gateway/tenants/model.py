"""An installed portal (a tenant): who it is, its tokens, and how far its set-up got."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace


class TenantStatus(enum.StrEnum):
    ACTIVE = "active"
    """Installed: its engines accept requests."""
    NEEDS_REINSTALL = "needs_reinstall"
    """Its refresh token was refused (``invalid_grant``): requests are still served (callbacks need no
    token), but the gateway cannot call the portal until the admin reinstalls the app."""
    DISABLED = "disabled"
    """Turned off by an operator (``gateway tenants disable``): its requests are refused."""
    UNINSTALLED = "uninstalled"
    """The portal removed the app: its engines are gone and its tokens wiped."""


class Registration(enum.StrEnum):
    """Where registering the configured engines on the portal stands (done in the background)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    """Gave up (a refusal that retrying will not change); ``registration_error`` says why."""


SERVING = frozenset({TenantStatus.ACTIVE, TenantStatus.NEEDS_REINSTALL})
"""Statuses whose engines accept requests."""


def tenant_key(member_id: str) -> str:
    """The tenant's id in URLs, logs and metrics labels: a hash of ``member_id`` (stable, not the id itself)."""
    return hashlib.sha256(member_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires: float
    """Unix time the access token expires (as the OAuth server said; refreshed only on ``expired_token``)."""


@dataclass(frozen=True)
class Tenant:
    member_id: str
    domain: str
    """The portal's host (``acme.bitrix24.com``, or ``host:port``): callbacks go only there."""
    client_endpoint: str
    """``https://<domain>/rest/``: where the gateway calls the portal's REST API."""
    server_endpoint: str
    """The OAuth server's REST base (``https://oauth.bitrix.info/rest/``): ``app.info`` and refreshes."""
    application_token: str
    """Sent by the portal with every event; compares an uninstall event to the install's."""
    url_secret: str
    """The secret part of this tenant's completions URLs."""
    tokens: Tokens | None
    status: TenantStatus = TenantStatus.ACTIVE
    registration: Registration = Registration.PENDING
    registration_attempts: int = 0
    registration_error: str = ""
    registered_engines: tuple[str, ...] = ()
    user_id: int = 0
    app_status: str = ""
    """``F`` free, ``D`` demo, ``T`` trial, ``P`` paid, ``L`` local (from ``app.info``)."""
    installed_at: float = 0.0
    updated_at: float = 0.0
    last_refresh_at: float | None = None
    detail: str = ""
    """The last thing worth telling an operator (why it needs a reinstall, what failed)."""
    limits: dict[str, float] = field(default_factory=dict)
    """This tenant's own limits (``gateway tenants limits``), over ``app.limits``: keys
    ``requests_per_minute``, ``concurrent_jobs``, ``audio_minutes_per_day``; 0 means no limit."""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return tenant_key(self.member_id)

    @property
    def serving(self) -> bool:
        return self.status in SERVING

    def completions_path(self, code: str) -> str:
        return f"/app/{self.key}/{self.url_secret}/engines/{code}/completions"

    def with_(self, **changes: object) -> Tenant:
        return replace(self, **changes)  # type: ignore[arg-type]
