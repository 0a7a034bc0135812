"""The composition root: config -> plugins, adapters, queue, router, delivery and worker.

Used by the HTTP app (``gateway serve``) and by a worker-only process (``gateway worker``).
Building a :class:`Runtime` only wires objects; :meth:`Runtime.prepare` does what touches the
disk or takes long (generated engine tokens, loading models), before the server starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pluggy

from gateway.adapters import AdapterConfigError
from gateway.config import Config, ConfigError
from gateway.delivery import Deliverer
from gateway.engines import EngineDirectory
from gateway.execution import TaskExecutor
from gateway.files import ImageHost
from gateway.jobs.model import Job
from gateway.jobs.queue import JobQueue
from gateway.metrics import Metrics
from gateway.netguard import OutboundPolicy
from gateway.plugins import call_hook, call_registration_hook, default_plugins, get_plugin_manager
from gateway.recordings import RecordingFetcher
from gateway.redaction import Redactor
from gateway.registry import AdapterRegistry
from gateway.routing import Router
from gateway.stores import Stores, engine_directory
from gateway.supervision import Supervisor
from gateway.tenants.service import TenantService
from gateway.usage.ledger import FLUSH_LOOP, ApiUsageLedger
from gateway.worker import Worker

log = logging.getLogger("gateway")
FILE_RETENTION_INTERVAL = 300.0
"""Seconds between passes over the hosted files (their retention is ``files.retention_days``)."""
SECRET_OPTION_WORDS = ("key", "token", "secret", "password", "auth")


def register_provider_secrets(config: Config, redactor: Redactor) -> None:
    """Provider options that look secret (keys, tokens, headers) are masked wherever the runtime writes."""
    for provider in config.providers.values():
        for key, value in provider.options.items():
            if isinstance(value, str) and any(word in key.lower() for word in SECRET_OPTION_WORDS):
                redactor.add(value)
            if key == "headers" and isinstance(value, dict):
                for header_value in value.values():
                    redactor.add(str(header_value))


def load_adapter_registry(pm: pluggy.PluginManager) -> AdapterRegistry:
    """Adapter types from every ``register_adapters`` implementation, sync or async (see ``call_registration_hook``)."""
    registry = AdapterRegistry()

    def arguments(plugin: str) -> dict[str, Any]:
        def register(name: str, factory: Any, categories: Any = ("text",)) -> None:
            registry.register(name, factory, categories, plugin=plugin)

        return {"register": register}

    call_registration_hook(
        pm.hook.register_adapters,
        arguments,
        lambda: len(registry.names()),
        'call register("name", factory, categories=["text"]) inside the hook for each adapter type (an async hook is awaited)',
    )
    return registry


def build_adapters(config: Config, registry: AdapterRegistry) -> dict[str, Any]:
    """One adapter per configured provider; checks each engine's route against what adapters serve."""
    adapters: dict[str, Any] = {}
    for name, provider in config.providers.items():
        kind = registry.get(provider.type)
        if kind is None:
            raise ConfigError(
                config.path,
                f"providers.{name}.type",
                f"no installed plugin provides adapter type {provider.type!r}",
                f"use one of: {', '.join(registry.names()) or 'none (no adapter plugin is loaded)'}; install the plugin that provides it, or check GATEWAY_LOAD_PLUGINS",
            )
        try:
            adapters[name] = kind.factory(name, dict(provider.options))
        except AdapterConfigError as exc:
            raise ConfigError(config.path, f"providers.{name}.{exc.key}", exc.message, exc.fix or "see the plugin's documentation for this option") from None
    for i, engine in enumerate(config.engines):
        for j, target in enumerate(engine.route):
            kind = registry.get(config.providers[target.provider].type)
            assert kind is not None
            if engine.category not in kind.categories:
                raise ConfigError(
                    config.path,
                    f"engines[{i}].route[{j}]",
                    f"adapter type {kind.name!r} (provider {target.provider!r}) does not serve category {engine.category.value!r}",
                    f"route {engine.category.value} engines to a provider whose type serves it",
                )
    return adapters


def load_adapters(config: Config, adapters: dict[str, Any]) -> None:
    """Let adapters load what they need before the first job (a local model), in worker processes only.

    It runs before the server starts, so a missing or corrupt model stops the gateway at
    start-up with the key to fix, rather than failing every job."""
    for name, adapter in adapters.items():
        load = getattr(adapter, "load", None)
        if load is None:
            continue
        started = time.monotonic()
        log.info("provider %s: loading", name)
        try:
            load()
        except AdapterConfigError as exc:
            raise ConfigError(config.path, f"providers.{name}.{exc.key}", exc.message, "check the file, or point the option at a working one") from None
        except Exception as exc:  # a plugin's bug or a library's error: still one clear line, not a traceback
            log.debug("provider %s: load() failed", name, exc_info=exc)
            raise ConfigError(
                config.path,
                f"providers.{name}",
                f"the adapter failed to load: {type(exc).__name__}: {str(exc)[:300]}",
                "check this provider's options; run with --log-level DEBUG for the plugin's traceback",
            ) from None
        log.info("provider %s: ready in %.1f s", name, time.monotonic() - started)


class RuntimeNotPrepared(RuntimeError):
    """Something needed what :meth:`Runtime.prepare` provides before it ran."""


class Runtime:
    """Every object one gateway process needs, wired from its config.

    Construction reads nothing but the config and writes nothing; adapters are built (so a bad
    option is a :class:`ConfigError` here) but their models are loaded by :meth:`prepare`."""

    def __init__(self, config: Config, *, with_worker: bool = True, redactor: Redactor | None = None) -> None:
        self.config = config
        self.with_worker = with_worker
        self.redactor = redactor or Redactor()
        """This runtime's secrets: ``gateway serve``/``gateway worker`` hand the same one to the process's logging."""
        register_provider_secrets(config, self.redactor)
        if config.queue.dsn:
            self.redactor.add(config.queue.dsn)  # and its password alone, should a driver quote only that
            if password := urlsplit(config.queue.dsn).password:
                self.redactor.add(password)
        self.metrics = Metrics()
        self.pm = get_plugin_manager(default_plugins(self.metrics))
        self.registry = load_adapter_registry(self.pm)
        self.adapters = build_adapters(config, self.registry)
        self._engines: EngineDirectory | None = None
        self.policy = OutboundPolicy(config.security.allowed_portals, config.security.allow_private_networks)
        self.loops = Supervisor(self.metrics, redactor=self.redactor)
        """The background loops of this process (queue flusher, worker): ``/-/health`` reports the ones down."""
        stores = Stores.for_config(config, supervisor=self.loops)
        self.queue: JobQueue = stores.queue
        self.files = stores.files
        self.api_usage = ApiUsageLedger(stores.api_usage)
        """Requests to the OpenAI-compatible API counted per day, key and engine; ``api_usage.store`` holds the totals."""
        self.router = Router(config.routing)
        self.deliverer = Deliverer(self.policy, config.delivery, redactor=self.redactor)
        self.images = ImageHost(
            self.files,
            config.public_url,
            allow_private_networks=config.security.allow_private_networks,
            max_bytes=config.files.max_bytes,
            retention_days=config.files.retention_days,
        )
        self.recordings = RecordingFetcher(self.policy, config.audio, Path(config.data_dir) / "recordings")
        self.executor = TaskExecutor(config, self.adapters, self.router, self.pm, self.metrics, self.images, self.recordings, self.redactor)
        """Runs tasks: the worker's queued jobs, and the OpenAI-compatible API's requests (with or without a worker)."""
        self.tenants: TenantService | None = None
        """App mode (``app:``): installed portals, their events and URLs; None in webhook mode only."""
        if config.app is not None:
            self.tenants = TenantService(
                config, stores.tenants, self.queue, self.files, supervisor=self.loops, redactor=self.redactor, policy=self.policy, limiter=self.executor.limiter
            )
            self.redactor.add(config.app.client_secret)
            for local in config.app.local_apps:
                self.redactor.add(local.client_secret)
        self.worker: Worker | None = None
        if with_worker:
            self.worker = Worker(
                queue=self.queue,
                executor=self.executor,
                deliverer=self.deliverer,
                pm=self.pm,
                metrics=self.metrics,
                concurrency=config.concurrency,
                lease_seconds=config.queue.lease_seconds,
                poll_interval=config.queue.poll_interval,
                retention_seconds=config.queue.retention_days * 86400,
                supervisor=self.loops,
                redactor=self.redactor,
            )

    @property
    def prepared(self) -> bool:
        return self._engines is not None

    @property
    def engines(self) -> EngineDirectory:
        """The engines with their tokens, known once :meth:`prepare` has run."""
        if self._engines is None:
            raise RuntimeNotPrepared("the runtime's engines are known after Runtime.prepare(): call it before serving")
        return self._engines

    def prepare(self) -> None:
        """The side effects of starting, before the port is announced: engine tokens are read or
        generated (``data_dir/engine-tokens.json``, or the shared database, migrated first) and, with a worker, adapters load their models,
        so a missing or corrupt model stops the gateway with a :class:`ConfigError`. Runs once;
        later calls do nothing."""
        if self._engines is not None:
            return
        engines = engine_directory(self.config)
        for engine in engines:
            self.redactor.add(engine.token)
        if self.with_worker:
            load_adapters(self.config, self.adapters)
        self._engines = engines

    async def submit(self, job: Job, idempotency_key: str) -> tuple[Job, bool]:
        """Store an accepted job durably: ``(job, True)``, or ``(existing job, False)`` for a repeated request.

        With a worker in this process the job is stored already leased to it when it has a free
        slot (no claim round trip); without one (``serve --no-worker``) it waits in the queue
        for ``gateway worker`` processes. Raises the queue's errors."""
        if self.worker is not None:
            return await self.worker.admit(job, idempotency_key)
        return await self.queue.enqueue(job, idempotency_key, lease_owner=None, lease_seconds=self.config.queue.lease_seconds)

    async def start(self, app: Any = None) -> None:
        self.prepare()  # done already by ``gateway serve``/``gateway worker``; here for embedders that only start
        await self.queue.open()
        await self.api_usage.open()
        self.loops.start(FLUSH_LOOP, self.api_usage.run)
        if self.tenants is not None:
            await self.tenants.store.open()
            await self.tenants.start()
        await call_hook(self.pm.hook.startup, app=app, config=self.config)
        await self.deliverer.open()
        if self.worker is not None:
            if removed := self.recordings.sweep():
                log.info("removed %d recording(s) left by a process that stopped uncleanly", removed)
            await self.worker.start()
            self.loops.start("file-retention", self._delete_expired_files)

    async def stop(self, app: Any = None) -> None:
        if self.worker is not None:
            await self.loops.stop("file-retention")
            await self.worker.stop(self.config.shutdown_grace)
        await self.deliverer.close()
        await self.images.aclose()
        await self.recordings.aclose()
        for adapter in self.adapters.values():
            close = getattr(adapter, "aclose", None)
            if close is not None:
                await close()
        if self.tenants is not None:
            await self.tenants.stop()
            await self.tenants.store.close()
        try:
            await call_hook(self.pm.hook.shutdown, app=app)
        finally:
            await self.loops.stop(FLUSH_LOOP)
            try:
                await self.api_usage.close()  # the last counts, before the pool they may be written through closes
            finally:
                await self.queue.close()

    async def _delete_expired_files(self) -> None:
        """Delete hosted images past their retention: housekeeping of files, beside the worker's of jobs."""
        await asyncio.sleep(self.config.queue.lease_seconds / 3)
        while True:
            try:
                if files := await self.images.delete_expired():
                    log.info("deleted %d hosted file(s) past their retention", files)
            except Exception:
                log.exception("hosted file retention failed; trying again later")
            await asyncio.sleep(min(FILE_RETENTION_INTERVAL, self.config.queue.retention_days * 86400))
