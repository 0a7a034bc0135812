"""App mode at work: install and uninstall events, the tenant a completions URL names, calls to a
portal with its token (refreshed once, under a lock, only on ``expired_token``), and the engines
registered on each portal in the background.

The portal sends an install event once and never again, so the event is answered as soon as the
tenant is stored; registering the engines (``event.bind`` for the uninstall event, then
``ai.engine.register`` for each engine) is a durable task on the tenant's record, retried with
backoff by whichever process claims it, and a reinstall starts it again (idempotent: engines
already in place are left alone).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from gateway import http
from gateway.backoff import Backoff
from gateway.bitrix.registration import compare, registration_params
from gateway.bitrix.rest import PortalClient, PortalError, PortalUnreachable
from gateway.config import Config
from gateway.engines import Engine
from gateway.files import FileStore, file_id
from gateway.jobs.queue import JobQueue, QueueStoreError
from gateway.netguard import OutboundPolicy
from gateway.redaction import Redactor
from gateway.supervision import Supervisor
from gateway.tenants.events import EventError, InstallEvent, UninstallEvent, event_name, parse_php_form, read_install, read_uninstall
from gateway.tenants.limits import TenantLimiter
from gateway.tenants.model import Registration, Tenant, TenantStatus, Tokens, tenant_key
from gateway.tenants.oauth import OAuthClient, OAuthError
from gateway.tenants.store import TenantStore, set_status

log = logging.getLogger("gateway.tenants")
EVENTS_PATH = "/app/events"
REGISTRATION_LEASE = 120.0
REGISTRATION_POLL = 5.0
REGISTRATION_BACKOFF = Backoff(5.0, maximum=600.0)
MAX_REGISTRATION_ATTEMPTS = 30
DOMAIN_SYNC_SECONDS = 5.0
"""How often the installed portals' domains are read again (installs and uninstalls on other nodes)."""
CACHE_SECONDS = 2.0
"""How long a tenant looked up for a request is reused: an uninstall on this process clears it at once."""


@dataclass(frozen=True)
class EventAnswer:
    status: int
    body: dict[str, Any]


class _NotTheInstallsToken(Exception):
    """An uninstall event whose ``application_token`` is not the one its install brought."""


class TenantService:
    def __init__(
        self,
        config: Config,
        store: TenantStore,
        queue: JobQueue,
        files: FileStore,
        *,
        supervisor: Supervisor | None = None,
        redactor: Redactor | None = None,
        transport: Any = None,
        policy: OutboundPolicy | None = None,
        limiter: TenantLimiter | None = None,
    ) -> None:
        """``policy``: the runtime's outbound policy, told the installed portals' domains (their
        callbacks and recordings may be fetched without listing them in security.allowed_portals)."""
        assert config.app is not None
        self.config, self.settings, self.store, self.queue, self.files = config, config.app, store, queue, files
        self.supervisor = supervisor or Supervisor()
        self.redactor = redactor or Redactor()
        self.oauth = OAuthClient(self.settings.oauth_servers, allow_private_networks=config.security.allow_private_networks)
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.policy = policy
        self.limiter = limiter
        """The executor's limiter: told each tenant's own limits with the domains (every 5 s)."""
        self._named_portals = OutboundPolicy(config.security.allowed_portals, True)
        """The portals the operator listed (``security.allowed_portals``): who may install a local app."""
        # Portal REST calls go to the tenant's own domain (or where a rename moved it): any public host,
        # never a private address unless the configuration allows private networks.
        self._transport = transport or http.transport(OutboundPolicy(["*"], config.security.allow_private_networks))
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        self._wake = asyncio.Event()
        store.subscribe(self._changed_elsewhere)

    @property
    def events_url(self) -> str:
        """The URL a portal's admin enters as the app's install handler; uninstall events come here too."""
        return self.config.public_url + EVENTS_PATH

    def engines_for(self, tenant: Tenant) -> list[Engine]:
        """The configured app engines with this tenant's completions URLs (the token part is the tenant's secret)."""
        engines = []
        for code in self.settings.engines:
            config = self.config.engine(code)
            assert config is not None
            engines.append(Engine(config, tenant.url_secret, self.config.public_url + tenant.completions_path(code)))
        return engines

    async def start(self) -> None:
        await self.sync_portal_hosts()
        self.supervisor.start("tenant-registration", self._register_forever)
        self.supervisor.start("tenant-domains", self._sync_forever)

    async def stop(self) -> None:
        await self.supervisor.stop("tenant-domains")
        await self.supervisor.stop("tenant-registration")
        await self.oauth.aclose()

    async def sync_portal_hosts(self) -> None:
        """Tell the outbound policy the hosts of every serving tenant (installs on other nodes included),
        and the limiter each tenant's own limits."""
        tenants = await self.store.all()
        if self.policy is not None:
            self.policy.set_portal_hosts(_host(t.domain) for t in tenants if t.serving)
        if self.limiter is not None:
            self.limiter.set_overrides({t.key: t.limits for t in tenants if t.limits})

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(DOMAIN_SYNC_SECONDS)
            try:
                await self.sync_portal_hosts()
            except QueueStoreError as exc:
                log.warning("tenant domains: the tenant store is unavailable (%s); trying again", exc)

    def _allow(self, tenant: Tenant) -> None:
        if self.policy is not None and tenant.serving and _host(tenant.domain) not in self.policy.portal_hosts:
            self.policy.set_portal_hosts({*self.policy.portal_hosts, _host(tenant.domain)})

    # -- events ---------------------------------------------------------------------
    async def handle_event(self, body: bytes) -> EventAnswer:
        """An event POSTed by a portal: install, uninstall, or something this gateway does not handle."""
        try:
            form = parse_php_form(body)
            name = event_name(form)
            if name == "ONAPPINSTALL":
                return await self.install(read_install(form))
            if name == "ONAPPUNINSTALL":
                return await self.uninstall(read_uninstall(form))
        except EventError as exc:
            return EventAnswer(400, {"error": "invalid_event", "error_description": str(exc)})
        return EventAnswer(400, {"error": "unknown_event", "error_description": f"this handler takes ONAPPINSTALL and ONAPPUNINSTALL, not {name[:40]}"})

    async def install(self, event: InstallEvent) -> EventAnswer:
        """Believe an install only when its OAuth server (a trusted one) confirms the token, for this
        portal; then store the tenant and have its engines registered in the background."""
        who = f"portal {event.domain} (tenant {tenant_key(event.member_id)})"
        if not self.oauth.trusted(event.server_endpoint):
            log.warning("install event from %s refused: its OAuth server is not in app.oauth_servers", who)
            return EventAnswer(403, {"error": "untrusted_oauth_server", "error_description": "the event names an OAuth server this gateway does not trust"})
        try:
            info = await self.oauth.app_info(event.server_endpoint, event.access_token)
        except OAuthError as exc:
            if exc.retryable:
                log.warning("install event from %s: the OAuth server cannot confirm it now (%s)", who, exc.code)
                return EventAnswer(503, {"error": "oauth_unavailable", "error_description": "the OAuth server cannot be reached; reinstall the app in a while"})
            log.warning("install event from %s refused: the OAuth server rejected its token (%s)", who, exc.code)
            return EventAnswer(403, {"error": "install_not_verified", "error_description": "the OAuth server does not confirm this installation"})
        if info.member_id != event.member_id or info.domain.lower() != event.domain.lower():
            log.warning("install event from %s refused: the token belongs to another portal", who)
            return EventAnswer(403, {"error": "install_not_verified", "error_description": "the token does not belong to this portal"})
        marketplace = bool(self.settings.client_id) and info.client_id == self.settings.client_id
        listed = self.settings.credentials_for(event.domain) is not None and self.settings.credentials_for(event.domain) != (
            self.settings.client_id,
            self.settings.client_secret,
        )
        if self.settings.client_id and info.client_id and not marketplace and not listed:
            log.warning("install event from %s refused: the token is another app's", who)
            return EventAnswer(403, {"error": "install_not_verified", "error_description": "the token belongs to another application"})
        if not marketplace and not listed and not self._named_portals.host_allowed(_host(event.domain)):
            # A local app can be made on any portal: only portals the operator named may install one.
            log.warning("install event from %s refused: a local app on a portal not in app.local_apps or security.allowed_portals", who)
            return EventAnswer(
                403,
                {"error": "portal_not_allowed", "error_description": "this portal is not in the gateway's app.local_apps or security.allowed_portals"},
            )
        # Verified: masked wherever this process writes (a forged event's values are never logged,
        # and are not added: hostile events must not grow the redactor).
        for secret in (event.access_token, event.refresh_token, event.application_token):
            self.redactor.add(secret)
        now = time.time()
        reinstall = False

        def installed(existing: Tenant | None) -> Tenant:
            """The tenant this install makes of the record as stored (None: a first install): new
            tokens and endpoints, registration checked again; what the operator set (a disabled
            status, the tenant's own limits) and its completions URLs' secret are kept."""
            nonlocal reinstall
            reinstall = existing is not None
            return Tenant(
                member_id=event.member_id,
                domain=event.domain,
                client_endpoint=event.client_endpoint,
                server_endpoint=event.server_endpoint,
                application_token=event.application_token,
                url_secret=existing.url_secret if existing is not None else secrets.token_urlsafe(24),
                tokens=Tokens(event.access_token, event.refresh_token, event.expires),
                status=TenantStatus.DISABLED if existing is not None and existing.status is TenantStatus.DISABLED else TenantStatus.ACTIVE,
                registration=Registration.PENDING,
                registered_engines=existing.registered_engines if existing is not None else (),
                user_id=event.user_id,
                app_status=info.status or event.status,
                installed_at=existing.installed_at if existing is not None and existing.status is not TenantStatus.UNINSTALLED else now,
                updated_at=now,
                last_refresh_at=existing.last_refresh_at if existing is not None else None,
                limits=dict(existing.limits) if existing is not None else {},
                extra=dict(existing.extra) if existing is not None else {},
            )

        # Onto the record as stored, under the same locks as refreshes and status changes: an
        # operator's disable or limits landing meanwhile are never overwritten. A first install
        # only adds one: two at once (a retried event, two nodes) end in one record, one URL secret.
        for _ in range(3):
            tenant = await self.store.update(event.member_id, installed, register_again=True)
            if tenant is not None:
                break
            tenant = installed(None)
            if await self.store.add(tenant):
                break
        else:  # added and forgotten again between each of our reads: an operator's `tenants forget` loop
            raise QueueStoreError("the tenant's record kept changing during the install")
        self._forget_cached(tenant.key)
        self._allow(tenant)
        self._wake.set()
        log.info("%s %s the app; registering %d engine(s) in the background", who, "reinstalled" if reinstall else "installed", len(self.settings.engines))
        return EventAnswer(200, {"result": True})

    async def uninstall(self, event: UninstallEvent) -> EventAnswer:
        """Believe an uninstall only when its ``application_token`` is the install's (constant-time);
        then stop serving the tenant, wipe its tokens and end its queued jobs (``CLEAN``: delete them,
        their hosted files included)."""

        unknown = EventAnswer(404, {"error": "unknown_portal", "error_description": "no installation of this app is known for this portal"})
        refused = EventAnswer(403, {"error": "invalid_application_token", "error_description": "the application token does not match"})

        def the_installs(tenant: Tenant) -> bool:
            return hmac.compare_digest(tenant.application_token.encode(), event.application_token.encode())

        def uninstalled(stored: Tenant) -> Tenant:
            """Checked and written on the record as stored: a reinstall or a refresh landing between
            the first look and this write can neither be undone nor let an earlier token through."""
            if not the_installs(stored):
                raise _NotTheInstallsToken
            return stored.with_(
                status=TenantStatus.UNINSTALLED,
                tokens=None,
                registration=Registration.DONE,
                registered_engines=(),
                updated_at=time.time(),
                detail="the portal uninstalled the app",
            )

        # A first look without locks: forged events for made-up portals (anyone can POST them) must
        # not take the store's write lock, nor leave a lock file per member_id.
        known = await self.store.get(event.member_id)
        try:
            if known is not None and not the_installs(known):
                raise _NotTheInstallsToken
            tenant = await self.store.update(event.member_id, uninstalled) if known is not None else None
        except _NotTheInstallsToken:
            log.warning("uninstall event for tenant %s refused: its application_token is not the install's", tenant_key(event.member_id))
            return refused
        if tenant is None:
            return unknown
        self._forget_cached(tenant.key)
        jobs = await self.queue.end_tenant_jobs(tenant.member_id, "the portal uninstalled the app", delete=event.clean)
        files = 0
        if event.clean:
            files = await self._delete_hosted_files(jobs)
        log.info(
            "portal %s (tenant %s) uninstalled the app: %d job(s) %s%s",
            tenant.domain,
            tenant.key,
            len(jobs),
            "deleted" if event.clean else "ended",
            f", {files} hosted file(s) deleted" if event.clean else "",
        )
        return EventAnswer(200, {"result": True})

    async def _delete_hosted_files(self, jobs: list[Any]) -> int:
        names = []
        prefix = self.config.public_url + "/files/"
        for job in jobs:
            result = job.outcome.result if job.outcome is not None else None
            for url in (result or {}).get("urls") or []:
                if isinstance(url, str) and url.startswith(prefix) and file_id(url[len(prefix) :]):
                    names.append(url[len(prefix) :])
        return await self.files.delete(names) if names else 0

    # -- the tenant a request names -----------------------------------------------------
    async def tenant_for(self, key: str, secret: str) -> Tenant | None:
        """The serving tenant whose completions URL this is (secret compared in constant time), else None."""
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            tenant = cached[1]
        else:
            tenant = await self.store.by_key(key)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[key] = (now + CACHE_SECONDS, tenant)
        expected = tenant.url_secret if tenant is not None else "-" * 32
        if not hmac.compare_digest(expected.encode(), secret.encode("utf-8", "surrogatepass")) or tenant is None:
            return None
        if tenant.status is TenantStatus.UNINSTALLED:
            return None
        self._allow(tenant)  # installed on another node a moment ago: its callbacks are allowed here too
        return tenant

    async def change_status(self, tenant: Tenant, status: TenantStatus) -> Tenant:
        """An operator's disable or enable (the dashboard), effective at once in this process; other processes
        drop their copy on NOTIFY (PostgreSQL) or within the cache's few seconds (SQLite)."""
        changed = await set_status(self.store, tenant.member_id, status)
        self._forget_cached(tenant.key)
        return changed

    def _forget_cached(self, key: str) -> None:
        self._cache.pop(key, None)

    def _changed_elsewhere(self, key: str) -> None:
        """Another process changed a tenant (an uninstall stops its requests at once on every node)."""
        if key:
            self._forget_cached(key)
        else:
            self._cache.clear()
        self._wake.set()  # a reinstall elsewhere may have queued a registration

    # -- calling a portal as the app ---------------------------------------------------
    def portal(self, tenant: Tenant) -> PortalClient:
        """A REST client for this tenant's portal with its token (refreshed on ``expired_token``)."""
        return PortalClient.for_app(
            tenant.client_endpoint,
            _TenantTokens(self, tenant.member_id),
            on_moved=lambda endpoint: self._moved(tenant.member_id, endpoint),
            retries=self.config.portal_retries,  # `portal: {retries, backoff}` applies to both modes
            backoff=self.config.portal_backoff,
            transport=self._transport,
        )

    async def refresh(self, member_id: str, expired: str) -> str:
        """A token newer than ``expired``: refreshed once under the per-portal lock (another process
        may already have done it). ``invalid_grant`` marks the tenant ``needs_reinstall``."""

        refused: list[str] = []  # the refresh token sent to the OAuth server

        async def refresher(tenant: Tenant) -> Tokens:
            credentials = self.settings.credentials_for(tenant.domain)
            if credentials is None:
                raise OAuthError("no_credentials", f"add the local app's client_id and client_secret for {tenant.domain} under app.local_apps")
            assert tenant.tokens is not None
            refused[:] = [tenant.tokens.refresh_token]
            tokens, _ = await self.oauth.refresh(tenant.server_endpoint, credentials[0], credentials[1], tenant.tokens.refresh_token)
            self.redactor.add(tokens.access_token)
            self.redactor.add(tokens.refresh_token)
            log.info("tenant %s: access token refreshed", tenant_key(member_id))
            return tokens

        try:
            tokens = await self.store.refresh(member_id, expired, refresher)
        except OAuthError as exc:
            if exc.code in ("invalid_grant", "invalid_client") and refused:
                marked = await self._needs_reinstall(member_id, refused[0], exc.code)
                if marked is not None:
                    log.warning("tenant %s: %s", marked.key, marked.detail)
            raise
        return tokens.access_token

    async def _needs_reinstall(self, member_id: str, refused: str, code: str) -> Tenant | None:
        """Mark the tenant ``needs_reinstall`` on the record as stored, only from ``active`` and only while it
        still holds the refused refresh token: a disable, an uninstall or a reinstall meanwhile is kept.
        The tenant marked, else None."""
        marked: list[Tenant] = []

        def change(stored: Tenant) -> Tenant | None:
            changed = needs_reinstall(stored, refused, code)
            marked[:] = [changed] if changed is not None else []
            return changed

        await self.store.update(member_id, change)
        if marked:
            self._forget_cached(marked[0].key)
        return marked[0] if marked else None

    async def _moved(self, member_id: str, client_endpoint: str) -> None:
        domain = client_endpoint.split("://", 1)[1].split("/", 1)[0].lower()
        moved_from: list[str] = []

        def moved(stored: Tenant) -> Tenant:
            moved_from[:] = [stored.domain]
            return stored.with_(domain=domain, client_endpoint=client_endpoint, updated_at=time.time())

        tenant = await self.store.update(member_id, moved)  # the domain alone, onto the record as stored
        if tenant is None:
            return
        log.info("tenant %s: the portal moved from %s to %s", tenant.key, moved_from[0], domain)
        self._forget_cached(tenant.key)

    # -- registering the engines ----------------------------------------------------------
    async def _register_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                for tenant in await self.store.claim_registration(self.owner, REGISTRATION_LEASE, 4):
                    try:
                        await self._register(tenant)
                    except QueueStoreError:
                        raise
                    except Exception:  # a bug must not stop the others' registration; the lease brings this one back
                        log.exception("tenant %s: registering engines failed unexpectedly; trying again after the lease", tenant.key)
            except QueueStoreError as exc:
                log.warning("engine registration: the tenant store is unavailable (%s); trying again", exc)
            try:
                await asyncio.wait_for(self._wake.wait(), REGISTRATION_POLL)
            except TimeoutError:
                pass

    async def _register(self, tenant: Tenant) -> None:
        """One attempt to put the app's engines on the tenant's portal; the outcome is stored either way."""
        attempts = tenant.registration_attempts + 1
        try:
            async with self.portal(tenant) as portal:
                await self._bind_uninstall(portal)
                registered = await self._register_engines(tenant, portal)
        except (OAuthError, PortalError, QueueStoreError) as exc:
            # The store writes only the registration fields onto the record as it is then (a refresh, a disable
            # or an uninstall meanwhile is kept)
            retry = isinstance(exc, (PortalUnreachable, QueueStoreError)) or (isinstance(exc, OAuthError) and exc.retryable)
            reason = self.redactor.redact(str(exc))[:300]
            if retry and attempts < MAX_REGISTRATION_ATTEMPTS:
                next_at = time.time() + REGISTRATION_BACKOFF.delay(attempts - 1)
                log.warning(
                    "tenant %s: registering engines failed (%s); attempt %d, trying again in %.0f s", tenant.key, reason, attempts, next_at - time.time()
                )
                await self.store.registration_done(tenant.with_(registration_attempts=attempts, registration_error=reason), self.owner, next_at=next_at)
                return
            log.warning("tenant %s: registering engines failed for good: %s", tenant.key, reason)
            await self.store.registration_done(
                tenant.with_(registration=Registration.FAILED, registration_attempts=attempts, registration_error=reason), self.owner
            )
            return
        done = tenant.with_(registration=Registration.DONE, registration_attempts=attempts, registration_error="", registered_engines=tuple(registered))
        current = await self.store.registration_done(done, self.owner)
        if current is None or current.status is TenantStatus.UNINSTALLED:
            return
        log.info("tenant %s: engines registered on %s: %s", tenant.key, current.domain, ", ".join(registered))
        self._forget_cached(tenant.key)

    async def _bind_uninstall(self, portal: PortalClient) -> None:
        try:
            await portal.call("event.bind", {"event": "ONAPPUNINSTALL", "handler": self.events_url})
        except PortalError as exc:
            if "already binded" not in exc.description.lower() and "already bound" not in exc.description.lower():
                raise

    async def _register_engines(self, tenant: Tenant, portal: PortalClient) -> list[str]:
        engines = self.engines_for(tenant)
        statuses = {status.code.lower(): status for status in compare(engines, await portal.list())}
        for engine in engines:
            status = statuses[engine.code.lower()]
            if status.status == "in_sync":
                continue
            if status.status == "different":
                await portal.unregister(engine.code)
            await portal.register(completions_url=engine.completions_url, **registration_params(engine))
        return [engine.code for engine in engines]


def needs_reinstall(stored: Tenant, refused: str, code: str) -> Tenant | None:
    """``stored`` marked ``needs_reinstall`` after the OAuth server refused the refresh token ``refused``, or
    None to leave it: only an ``active`` tenant still holding that token (a disabled one stays disabled,
    an uninstalled one uninstalled, a reinstalled one keeps its new tokens)."""
    if stored.status is not TenantStatus.ACTIVE or stored.tokens is None or stored.tokens.refresh_token != refused:
        return None
    detail = f"the OAuth server refused the refresh token ({code}): reinstall the app on {stored.domain} (Applications → the app → Reinstall)"
    return stored.with_(status=TenantStatus.NEEDS_REINSTALL, detail=detail, updated_at=time.time())


def _host(domain: str) -> str:
    """The host of a tenant's ``host[:port]`` domain (the outbound policy allows hosts)."""
    return domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain


class _TenantTokens:
    """A tenant's token for :class:`PortalClient`: the stored one, a refreshed one on ``expired_token``."""

    def __init__(self, service: TenantService, member_id: str) -> None:
        self.service, self.member_id = service, member_id

    async def token(self) -> str:
        tenant = await self.service.store.get(self.member_id)
        if tenant is None or tenant.tokens is None:
            raise OAuthError("no_tokens", "the tenant has no tokens (uninstalled)")
        return tenant.tokens.access_token

    async def refreshed(self, expired: str) -> str:
        return await self.service.refresh(self.member_id, expired)
