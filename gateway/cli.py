"""The ``gateway`` command. Every subcommand takes ``--config PATH`` (or ``GATEWAY_CONFIG``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import Config, ConfigError, find_config_path, load_config
from gateway.engines import mask_token
from gateway.jobs.model import JobState
from gateway.jobs.queue import QueueStoreError
from gateway.plugins import PluginError
from gateway.tasks import Category

EXIT_CONFIG = 2


def _config(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- serve / worker ---------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.redaction import Redactor, configure_logging
    from gateway.runtime import Runtime
    from gateway.server import ListenError, bind_socket, listen_url, outbound_pools, raise_file_limit, serve

    config = _config(args)
    if args.processes < 1:
        print("gateway serve: --processes must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    redactor = Redactor()  # the runtime's, masking every log line of this process
    configure_logging(redactor, args.log_level)
    host = args.host or config.host
    port = args.port if args.port is not None else config.port
    file_limit = raise_file_limit()
    try:  # bind first: a port in use is one clear line, before any model loads
        sock = bind_socket(host, port, config.path)
    except ListenError as exc:
        print(f"gateway serve: {exc}", file=sys.stderr)
        return 1

    def serve_one(index: int = 0) -> int:
        runtime = Runtime(config, with_worker=not args.no_worker, redactor=redactor)
        runtime.prepare()  # engine tokens and models, before the port is announced: a broken model is a config error
        app = create_app(config, runtime)

        def announce() -> None:
            """Printed once the app has started and the socket accepts: the URL answers from now on."""
            if index:  # with --processes, the first process speaks for all
                return
            processes = f", {args.processes} processes" if args.processes > 1 else ""
            print(
                f"gateway {__version__}: serving on {listen_url(sock)} (public URL {config.public_url}), queue {config.queue.location}{processes}", flush=True
            )
            for engine in runtime.engines:
                print(f"  engine {engine.code} [{engine.config.category.value}] {mask_token(engine.completions_url, engine.token)}", flush=True)
            print("  full completions URLs, token included: gateway engines list", flush=True)
            if config.admin is None:
                print('  admin dashboard: off (add `admin: {password: "${GATEWAY_ADMIN_PASSWORD}"}` to turn it on)', flush=True)
            else:
                print(f"  admin dashboard: {config.public_url}/admin/ ({', '.join(u.name for u in config.admin.users)})", flush=True)

        started = serve(app, sock, config.connections, file_limit, outbound_pools(config), registry=runtime.metrics.registry, on_ready=announce)
        return 0 if started else 1

    if args.processes > 1:
        from gateway.processes import serve_processes

        return serve_processes(args.processes, serve_one)
    return serve_one()


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway.redaction import Redactor, configure_logging
    from gateway.runtime import Runtime

    config = _config(args)
    redactor = Redactor()  # the runtime's, masking every log line of this process
    configure_logging(redactor, args.log_level)
    runtime = Runtime(config, redactor=redactor)
    runtime.prepare()  # models load before the worker takes jobs: a broken model is a config error

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await runtime.start()
        print(f"gateway worker {__version__}: processing jobs from {config.queue.location}", flush=True)
        await stop.wait()
        await runtime.stop()

    asyncio.run(run())
    return 0


# -- engines / plugins --------------------------------------------------------------------
def cmd_engines_list(args: argparse.Namespace) -> int:
    from gateway.stores import engine_directory, token_store

    config = _config(args)
    engines = [
        {
            "code": e.code,
            "name": e.config.name,
            "category": e.config.category.value,
            "completions_url": e.completions_url,
            "route": [t.label for t in e.config.route],
            "settings": dict(e.config.settings),
        }
        for e in engine_directory(config)
    ]
    if args.json:
        print(json.dumps(engines, indent=2, ensure_ascii=False))
        return 0
    # Every command on this config reads and writes here (relative paths are taken from the config's folder).
    print(f"data: {config.data_dir} (tokens in {token_store(config).where}, queue {config.queue.location})")
    if not engines:
        print(f"no engines in {config.path}")
    for e in engines:
        print(f"{e['code']}  [{e['category']}]  {e['name']}\n  completions_url: {e['completions_url']}\n  route: {' -> '.join(e['route'])}")
    return 0


def _selected_engines(config: Config, codes: list[str] | None) -> list[Any]:
    from gateway.stores import engine_directory

    engines = list(engine_directory(config))
    if not codes:
        return engines
    unknown = [code for code in codes if code not in {e.code for e in engines}]
    if unknown:
        raise ConfigError(config.path, "engines", f"no engine {unknown[0]!r}", f"use one of: {', '.join(e.code for e in engines) or 'none'}")
    return [e for e in engines if e.code in codes]


def _portal_client(args: argparse.Namespace, config: Config) -> Any:
    from gateway.bitrix.rest import PortalClient

    webhook = args.portal or config.portal_webhook
    if not webhook and config.portal_webhook_variable:
        name = config.portal_webhook_variable
        raise ConfigError(
            config.path,
            "portal.webhook",
            f"environment variable {name} is not set",
            f"export {name}=https://<portal>/rest/<user>/<secret>/ or pass --portal https://<portal>/rest/<user>/<secret>/",
        )
    if not webhook:
        raise ConfigError(
            config.path,
            "portal.webhook",
            "no portal webhook is configured",
            'pass --portal https://<portal>/rest/<user>/<secret>/ or set portal.webhook (e.g. "${BITRIX24_WEBHOOK}")',
        )
    try:
        return PortalClient(webhook, retries=config.portal_retries, backoff=config.portal_backoff)
    except ValueError as exc:
        raise ConfigError(config.path, "portal.webhook", str(exc), "copy the inbound webhook URL from the portal (scope ai_admin)") from None


def _portal_command(action: Any) -> int:
    """Run a portal command; portal and registration errors become one clear line and exit 1."""
    from gateway.bitrix.registration import RegistrationError
    from gateway.bitrix.rest import PortalError

    try:
        return int(asyncio.run(action()) or 0)
    except RegistrationError as exc:
        print(f"not registered: {exc}", file=sys.stderr)
    except PortalError as exc:
        print(f"portal error: {exc}", file=sys.stderr)
    return 1


def cmd_engines_register(args: argparse.Namespace) -> int:
    from gateway.bitrix.registration import apply_registration, builtin_collision, check_reachable, compare, registration_params

    config = _config(args)
    engines = _selected_engines(config, args.engine)
    for engine in engines:
        builtin = builtin_collision(engine.code)
        if builtin:
            print(
                f"engine {engine.code}: the code collides with the portal's built-in engine {builtin}; "
                "choose another code (the portal compares codes case-insensitively)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    portal = _portal_client(args, config)

    async def run() -> int:
        async with portal:
            for engine in engines:  # before any portal call: the portal's own error is vague
                await check_reachable(engine)
            statuses = {(s.code, s.category): s for s in compare(engines, await portal.list())}
            for engine in engines:
                status = statuses[(engine.code, engine.config.category.value)]
                masked = mask_token(engine.completions_url, engine.token)
                if status.status == "in_sync":
                    print(f"{engine.code}: unchanged (id {status.remote_id})")
                    continue
                if status.status == "different" and args.dry_run:
                    print(f"{engine.code}: would call ai.engine.unregister code={engine.code} ({', '.join(status.differences)} changed)")
                if args.dry_run:
                    params = registration_params(engine)
                    print(f"{engine.code}: would call ai.engine.register {json.dumps({**params, 'completions_url': masked}, ensure_ascii=False)}")
                    continue
                print(await apply_registration(portal, engine, status))
        return 0

    return _portal_command(run)


def cmd_engines_remote(args: argparse.Namespace) -> int:
    from gateway.bitrix.registration import compare

    config = _config(args)
    engines = _selected_engines(config, None)
    portal = _portal_client(args, config)

    async def run() -> int:
        async with portal:
            statuses = compare(engines, await portal.list())
        if args.json:
            print(
                json.dumps(
                    [{"code": s.code, "category": s.category, "status": s.status, "differences": s.differences, "id": s.remote_id} for s in statuses], indent=2
                )
            )
            return 0
        for s in statuses:
            detail = f" ({', '.join(s.differences)} differ)" if s.differences else ""
            print(f"{s.code:<24} {s.category:<6} {s.status}{detail}")
        return 0

    return _portal_command(run)


def cmd_engines_unregister(args: argparse.Namespace) -> int:
    config = _config(args)
    if not args.all and not args.engine:
        print("name the engines to remove with --engine CODE (repeatable), or --all for every engine in the config", file=sys.stderr)
        return EXIT_CONFIG
    engines = _selected_engines(config, None if args.all else args.engine)
    portal = _portal_client(args, config)

    async def run() -> int:
        async with portal:
            for engine in engines:
                if args.dry_run:
                    print(f"{engine.code}: would call ai.engine.unregister code={engine.code}")
                elif await portal.unregister(engine.code):
                    print(f"{engine.code}: unregistered")
                else:
                    print(f"{engine.code}: was not registered on the portal (ai.engine.unregister answered false)")
        return 0

    return _portal_command(run)


def cmd_plugins(args: argparse.Namespace) -> int:
    from gateway.metrics import Metrics
    from gateway.plugins import default_plugins, get_plugin_manager, list_plugins

    listing = list_plugins(get_plugin_manager(default_plugins(Metrics())))
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        for plugin in listing:
            print(f"{plugin['name']} {plugin['version'] or '(built in)'}: {', '.join(plugin['hooks'])}")
    return 0


# -- jobs -------------------------------------------------------------------------------
def _with_queue(config: Config, action: Any) -> Any:
    """``await action(queue)`` on the configured queue; None when no job was ever stored."""
    from gateway.stores import job_queue

    if config.queue.backend == "sqlite" and not Path(config.queue.path).exists():
        return None

    async def run() -> Any:
        queue = job_queue(config.queue)
        await queue.open()
        try:
            return await action(queue)
        finally:
            await queue.close()

    return asyncio.run(run())


def _operator() -> str:
    """Who asks for an operator action from this terminal, as the job's attempt records it."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        user = "unknown user"
    return f"{user} (gateway jobs)"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from gateway.jobs.queue import JobFilter
    from gateway.jobs.reports import job_summary, parse_since

    config = _config(args)
    try:
        since = parse_since(args.since or "")
    except ValueError as exc:
        print(f"--since: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        job_filter = JobFilter(
            state=JobState(args.state) if args.state else None,
            engine=args.engine,
            category=args.category,
            portal=args.portal,
            accepted_since=time.time() - since if since is not None else None,
            before_id=args.before,
            limit=args.limit,
        )
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    jobs = _with_queue(config, lambda q: q.list(job_filter)) or []
    rows = [job_summary(job) for job in jobs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(
            f"{row['id']}  {row['state']:<10} {row['engine']:<16} {row['category']:<6} {row['portal'] or '-':<24}"
            f" accepted {row['accepted_at']}  attempts {row['delivery_attempts']}"
        )
    if not rows:
        print("no jobs")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from gateway.jobs.reports import describe_result, job_summary

    config = _config(args)
    job = _with_queue(config, lambda q: q.get(args.id))
    if job is None:
        print(f"no job {args.id!r} in {config.queue.location}", file=sys.stderr)
        return 1
    summary = job_summary(job)
    summary["attempts"] = [
        {"kind": a.kind, "target": a.target, "at": _when(a.started_at), "ms": round(a.duration * 1000, 1), "outcome": a.outcome, "detail": a.detail}
        for a in job.attempts
    ]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if key == "result" and job.outcome is not None and job.outcome.result is not None:
            value = describe_result(job.outcome.result)
        elif key == "error":
            value = f"{value['message']} (code {value['code']}, {value['reason']})"
        if key != "attempts":
            print(f"{key:>18}: {'-' if value in (None, '') else value}")
    print(f"{'attempts':>18}:")
    for a in summary["attempts"]:
        print(f"    {a['at']}  {a['kind']:<8} {a['target']:<28} {a['outcome']:<10} {a['ms']:>8} ms  {a['detail']}")
    return 0


def cmd_jobs_action(args: argparse.Namespace) -> int:
    """``jobs cancel ID`` / ``jobs redeliver ID``: the queue checks and acts in one transaction."""
    from gateway.jobs.queue import JobActionRefused

    config = _config(args)
    action = args.jobs_command

    async def act(queue: Any) -> Any:
        return await (queue.cancel if action == "cancel" else queue.redeliver)(args.id, _operator())

    try:
        job = _with_queue(config, act)
    except JobActionRefused as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if job is None:  # no queue database yet
        print(f"cannot {action} job {args.id}: no such job: nothing was ever stored in {config.queue.location}", file=sys.stderr)
        return 1
    if job.state is JobState.DEAD:
        print(f"job {job.id}: dead: its delivery is cancelled")
    elif action == "cancel":
        print(f"job {job.id}: cancelled: a worker delivers the error (code cancelled) to the portal")
    else:
        print(f"job {job.id}: delivering: a worker delivers its outcome again")
    return 0


def cmd_jobs_stats(args: argparse.Namespace) -> int:
    from gateway.jobs.reports import engine_table

    config = _config(args)
    if args.minutes < 1:
        print("--minutes: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    since = time.time() - args.minutes * 60
    activity = _with_queue(config, lambda q: q.activity(since))
    rows = engine_table(activity) if activity is not None else []
    pending = {str(state): count for state, count in activity.pending.items()} if activity is not None else {}
    if args.json:
        shown = {"minutes": args.minutes, "since": _when(since), "pending": pending, "engines": [dataclasses.asdict(row) for row in rows]}
        print(json.dumps(shown, indent=2))
        return 0

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g} s"

    print(f"last {args.minutes} minute(s); pending now: " + (", ".join(f"{state} {count}" for state, count in pending.items()) or "none"))
    print(f"{'engine':<16} {'category':<8} {'accepted':>8} {'succeeded':>9} {'failed':>6} {'expired':>7} {'p50':>9} {'p99':>9}")
    for row in rows:
        print(
            f"{row.engine:<16} {row.category:<8} {row.accepted:>8} {row.succeeded:>9} {row.failed:>6} {row.expired:>7} {seconds(row.p50):>9} {seconds(row.p99):>9}"
        )
    if not rows:
        print("no jobs in that time")
    return 0


# -- admin dashboard ---------------------------------------------------------------------------
def cmd_admin_hash_password(args: argparse.Namespace) -> int:
    """The hash to put in ``admin.password`` (or a user's ``password``): the config then holds no password."""
    import getpass

    from gateway.admin.passwords import hash_password
    from gateway.config import MIN_ADMIN_PASSWORD

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("the two passwords differ; nothing printed", file=sys.stderr)
            return 1
    else:  # piped: the first line (never an argument, which the shell's history and `ps` would show)
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_ADMIN_PASSWORD:
        print(f"the password is shorter than {MIN_ADMIN_PASSWORD} characters; nothing printed", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return 0


# -- app mode ------------------------------------------------------------------------------
def _app_settings(config: Config) -> Any:
    if config.app is None:
        raise ConfigError(
            config.path, "app", "app mode is not configured", "add `app: {client_id: ..., client_secret: ..., engines: [codes]}` (see README: app mode)"
        )
    return config.app


def cmd_app_info(args: argparse.Namespace) -> int:
    from gateway.tenants.service import EVENTS_PATH

    config = _config(args)
    app = _app_settings(config)
    engines = [{"code": code, "name": e.name, "category": e.category.value} for code in app.engines if (e := config.engine(code)) is not None]
    info = {
        "install_url": config.public_url + EVENTS_PATH,
        "kind": "marketplace" if app.client_id else "local",
        "client_id": app.client_id or None,
        "scope": "ai_admin",
        "engines": engines,
        "oauth_servers": list(app.oauth_servers),
        "local_apps": [local.domain for local in app.local_apps],
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"install handler URL: {info['install_url']}")
    print("  Marketplace app: enter it as 'Installation event handler URL' (no UI; untick the menu item)")
    print("  Local app: 'Uses API only', enter it as 'Initial installation path'; then copy its client_id and")
    print("  client_secret into app.local_apps (domain, client_id, client_secret) so its tokens can be refreshed")
    print("scope (permissions): ai_admin")
    print("engines every installing portal gets:")
    for item in engines:
        print(f"  {item['code']}  [{item['category']}]  {item['name']}")
    return 0


def _with_tenants(config: Config, action: Any) -> Any:
    """``await action(store, queue)`` on the configured tenant store (and queue)."""
    from gateway.stores import Stores

    _app_settings(config)

    async def run() -> Any:
        stores = Stores.for_config(config)
        await stores.queue.open()
        try:
            await stores.tenants.open()
            try:
                return await action(stores.tenants, stores.queue)
            finally:
                await stores.tenants.close()
        finally:
            await stores.queue.close()

    return asyncio.run(run())


def _tenant_summary(tenant: Any, config: Config) -> dict[str, Any]:
    return {
        "tenant": tenant.key,
        "member_id": tenant.member_id,
        "domain": tenant.domain,
        "status": str(tenant.status),
        "registration": str(tenant.registration),
        "registration_error": tenant.registration_error or None,
        "engines": list(tenant.registered_engines),
        "app_status": tenant.app_status,
        "installed_at": _when(tenant.installed_at),
        "last_refresh_at": _when(tenant.last_refresh_at),
        "detail": tenant.detail or None,
        "limits": dict(tenant.limits) or None,
        "completions_urls": {code: config.public_url + tenant.completions_path(code) for code in (config.app.engines if config.app else ())}
        if tenant.serving
        else {},
    }


def _find_tenant(tenants: list[Any], which: str) -> Any:
    """A tenant by member_id, tenant id (hash) or domain."""
    for tenant in tenants:
        if which in (tenant.member_id, tenant.key) or which.lower() == tenant.domain:
            return tenant
    return None


def cmd_tenants(args: argparse.Namespace) -> int:
    from gateway.config import TenantLimits
    from gateway.tenants.limits import with_overrides
    from gateway.tenants.model import TenantStatus
    from gateway.tenants.store import StatusChangeRefused, set_status

    config = _config(args)
    action = args.tenants_command

    async def run(store: Any, queue: Any) -> int:
        tenants = await store.all()
        if action == "list":
            rows = [_tenant_summary(t, config) for t in tenants]
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no portal has installed the app yet")
            for row in rows if not args.json else []:
                print(f"{row['tenant']}  {row['status']:<15} {row['registration']:<8} {row['domain']}  engines: {', '.join(row['engines']) or '-'}")
            return 0
        tenant = _find_tenant(tenants, args.tenant)
        if tenant is None:
            print(f"no tenant {args.tenant!r} (give its domain, member_id or tenant id from `gateway tenants list`)", file=sys.stderr)
            return 1
        if action == "show":
            summary = _tenant_summary(tenant, config)
            if not args.json:  # the URLs carry the tenant's secret: JSON only, for scripts
                summary.pop("completions_urls")
            print(json.dumps(summary, indent=2))
            return 0
        if action == "limits":
            own = dict(tenant.limits)
            if args.reset:
                own = {}
            for key in ("requests_per_minute", "concurrent_jobs", "audio_minutes_per_day"):
                value = getattr(args, key)
                if value is not None:
                    if value < 0:
                        print(f"--{key.replace('_', '-')} must be 0 (no limit) or more", file=sys.stderr)
                        return EXIT_CONFIG
                    own[key] = value
            if own != tenant.limits:
                await store.update(
                    tenant.member_id, lambda fresh: fresh.with_(limits=own, updated_at=time.time())
                )  # onto the record as stored: never over a refresh
            effective = with_overrides(config.app.limits if config.app else TenantLimits(), own)
            shown = {key: getattr(effective, key) for key in ("requests_per_minute", "concurrent_jobs", "audio_minutes_per_day")}
            print(json.dumps({"tenant": tenant.key, "own": own, "effective": shown}, indent=2))
            return 0
        if action in ("disable", "enable"):
            try:
                changed = await set_status(store, tenant.member_id, TenantStatus.DISABLED if action == "disable" else TenantStatus.ACTIVE)
            except StatusChangeRefused as exc:
                print(str(exc), file=sys.stderr)
                return 1
            if action == "enable" and changed.status is not TenantStatus.ACTIVE:
                print(f"tenant {tenant.key} ({tenant.domain}) is not disabled: {changed.status}")
                return 0
            print(f"tenant {tenant.key} ({tenant.domain}): {changed.status}")
            return 0
        # forget: the record and every job of the tenant
        deleted = await queue.end_tenant_jobs(tenant.member_id, "forgotten by the operator", delete=True)
        await store.forget(tenant.member_id)
        print(f"tenant {tenant.key} ({tenant.domain}) forgotten; {len(deleted)} job(s) deleted")
        return 0

    return int(_with_tenants(config, run))


def _with_api_usage(config: Config, action: Any) -> Any:
    """``await action(store)`` on the API usage store, without a running gateway; None when nothing was ever counted."""
    from gateway.stores import api_usage_reader

    async def run() -> Any:
        async with api_usage_reader(config) as store:
            return None if store is None else await action(store)

    return asyncio.run(run())


def _usage_line(row: Any) -> str:
    if row.surface == "portal":  # the line portal rows always had, and whose portal
        counts = f"jobs {row.requests:>6}  results {row.requests - row.errors:>6}"
        who = f"portal {row.who or '-'}"
    else:
        counts, who = f"requests {row.requests:>6}  errors {row.errors:>6}", f"key {row.who}"
    return (
        f"{row.day}  {row.engine:<16} {counts}  tokens {row.prompt_tokens:>9} + {row.completion_tokens:>9}"
        f"  ${row.cost_usd:.4f}  audio {row.audio_seconds / 60:.1f} min  {who}"
    )


def cmd_usage(args: argparse.Namespace) -> int:
    from gateway.usage.ledger import utc_day
    from gateway.usage.report import UsageRow, api_usage, merged, portal_usage_rows, to_csv

    config = _config(args)
    if args.tenant and args.surface == "api":
        print("--tenant selects one portal's jobs and API requests belong to no portal: leave out --surface api", file=sys.stderr)
        return EXIT_CONFIG
    member_id: str | None = None
    if args.tenant:
        found = _with_tenants(config, lambda store, queue: store.all())
        tenant = _find_tenant(found, args.tenant)
        if tenant is None:
            print(f"no tenant {args.tenant!r} (give its domain, member_id or tenant id from `gateway tenants list`)", file=sys.stderr)
            return 1
        member_id = tenant.member_id
    since = time.time() - args.days * 86400
    portal: list[UsageRow] = []
    api: list[UsageRow] = []
    if args.surface in (None, "portal"):
        portal = portal_usage_rows(_with_queue(config, lambda q: q.usage_totals(since, tenant=member_id)) or [])  # counted by the database
    if args.surface in (None, "api") and member_id is None:  # API rows are whole UTC days: the first day counts whole
        api = api_usage(_with_api_usage(config, lambda store: store.rows(utc_day(since))) or [])
    rows = merged(portal, api)
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=2))
        return 0
    if args.csv:
        sys.stdout.write(to_csv(rows))
        return 0
    if not rows:
        what = {"portal": "finished jobs", "api": "API requests"}.get(args.surface or "", "finished jobs or API requests")
        print(f"no {what} in the last {args.days:g} day(s)")
    for row in rows:
        print(_usage_line(row))
    return 0


# -- db -----------------------------------------------------------------------------------
def _postgres_only(config: Config, command: str) -> None:
    if config.queue.backend != "postgres":
        raise ConfigError(
            config.path,
            "queue.backend",
            f"`gateway db {command}` manages the shared PostgreSQL schema; this config uses {config.queue.backend!r}",
            "the embedded SQLite queue creates and upgrades its schema by itself when it opens; set `queue: {backend: postgres, dsn: ...}` to use PostgreSQL",
        )


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from gateway.postgres import schema
    from gateway.postgres.database import run_on_database

    config = _config(args)
    _postgres_only(config, "migrate")
    applied = run_on_database(config.queue, schema.migrate, "migrating the schema", migrate=False)
    for m in applied:
        print(f"applied {m.version:04d} {m.name}")
    print(f"{config.queue.location}: schema at version {schema.LATEST}" + ("" if applied else " (nothing to apply)"))
    return 0


def cmd_db_status(args: argparse.Namespace) -> int:
    from gateway.postgres import schema
    from gateway.postgres.database import run_on_database

    config = _config(args)
    _postgres_only(config, "status")
    statuses = run_on_database(config.queue, schema.status, "reading the schema version", migrate=False)
    rows: list[dict[str, Any]] = [{"version": m.version, "name": m.name, "applied_at": m.applied_at.isoformat() if m.applied_at else None} for m in statuses]
    pending = [row for row in rows if row["applied_at"] is None]
    if args.json:
        print(json.dumps({"database": config.queue.location, "latest": schema.LATEST, "pending": len(pending), "migrations": rows}, indent=2))
        return 0
    print(f"{config.queue.location}: {len(rows) - len(pending)} of {len(rows)} migration(s) applied")
    for row in rows:
        print(f"  {row['version']:04d}  {'applied ' + row['applied_at'] if row['applied_at'] else 'pending'}  {row['name']}")
    if pending:
        print("run `gateway db migrate` (or start any node: it migrates at start)")
    return 0


# -- simulate ---------------------------------------------------------------------------
def _needs_recording(code: str, category: str, audio: bytes | None) -> bool:
    """True (and the reason printed) when an audio or call engine is simulated without ``--audio``."""
    if category not in ("audio", "call") or audio is not None:
        return False
    article = "an" if category[0] in "aeiou" else "a"
    print(f"engine {code} is {article} {category} engine: pass --audio FILE (a recording the emulator serves to the gateway)", file=sys.stderr)
    return True


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.bitrix.simulator import PortalEmulator
    from gateway.demo import CALLBACK_REFUSED_HINT, exchange, portal_prompt
    from gateway.engines import completions_path
    from gateway.loopback import LoopbackServer
    from gateway.stores import engine_directory

    config = _config(args)
    audio: bytes | None = None
    if args.audio:
        try:
            audio = Path(args.audio).read_bytes()
        except OSError as exc:
            print(f"--audio {args.audio}: cannot read the recording ({exc.strerror or exc}); pass the path of an audio file", file=sys.stderr)
            return EXIT_CONFIG
    if args.app:
        return _simulate_app(args, config, audio)
    if args.engine is None:
        print(f"pass --engine CODE; engines: {', '.join(e.code for e in config.engines) or 'none'}", file=sys.stderr)
        return EXIT_CONFIG
    engine = next((e for e in engine_directory(config) if e.code == args.engine), None)
    if engine is None:
        print(f"no engine {args.engine!r} in {config.path}; engines: {', '.join(e.code for e in config.engines) or 'none'}", file=sys.stderr)
        return EXIT_CONFIG
    category = engine.config.category.value
    if _needs_recording(engine.code, category, audio):
        return EXIT_CONFIG
    base = (args.gateway or config.public_url).rstrip("/")
    url = base + completions_path(engine.code, engine.token)
    emulator = PortalEmulator()
    with LoopbackServer(emulator.app) as server:
        emulator.url = server.url
        print(f"portal emulator listening on {server.url}")
        try:
            status = emulator.check_completions_url(url)
        except Exception as exc:
            print(f"registration check: cannot reach the gateway at {base}: {type(exc).__name__}. Is `gateway serve` running?", file=sys.stderr)
            return 1
        print(f"registration check (GET completions_url): HTTP {status} {'ok' if status == 200 else '-- the portal requires exactly 200'}")
        if status != 200:
            return 1
        if args.register:
            from gateway.bitrix.registration import registration_params
            from gateway.bitrix.rest import PortalClient, PortalError

            async def register() -> int:
                async with PortalClient(emulator.webhook) as portal:
                    return await portal.register(completions_url=url, **registration_params(engine))

            try:
                print(f"ai.engine.register on the emulator: engine id {asyncio.run(register())}")
            except PortalError as exc:
                print(f"ai.engine.register on the emulator failed: {exc}", file=sys.stderr)
                return 1
        prompt = portal_prompt(category, emulator, text=args.prompt, audio=audio)
        sent = exchange(emulator, url, category, prompt, timeout=args.timeout, ttl=args.ttl)
        print(f"completions POST: HTTP {sent.response.status_code} {sent.response.text} in {sent.accepted * 1000:.1f} ms")
        if sent.response.status_code != 202:
            if sent.callback_refused:
                print(f"the gateway refused the emulator's callback host; {CALLBACK_REFUSED_HINT}", file=sys.stderr)
            return 1
        callback = sent.callback
        if callback is None:
            print(f"no callback within {args.timeout:.0f} s", file=sys.stderr)
            return 1
        print(f"{callback.kind} callback after {sent.elapsed:.2f} s:")
        print(json.dumps(callback.body, indent=2, ensure_ascii=False))
        return 0 if callback.kind == "success" else 1


def _simulate_app(args: argparse.Namespace, config: Config, audio: bytes | None) -> int:
    """``simulate --app``: an emulated portal (with Bitrix's OAuth server) installs the app on the running
    gateway, waits for its engine, sends one request with the portal's ``auth``, uninstalls, and is refused."""
    import secrets

    import httpx

    from gateway.bitrix.oauth_emulator import OAuthEmulator
    from gateway.bitrix.simulator import PortalEmulator
    from gateway.demo import CALLBACK_REFUSED_HINT, portal_prompt
    from gateway.loopback import LoopbackServer
    from gateway.tenants.service import EVENTS_PATH

    app = _app_settings(config)
    code = args.engine or app.engines[0]
    engine = config.engine(code)
    if engine is None or code not in app.engines:
        print(f"engine {code!r} is not an app engine of {config.path}; app.engines: {', '.join(app.engines)}", file=sys.stderr)
        return EXIT_CONFIG
    category = engine.category.value
    if _needs_recording(code, category, audio):
        return EXIT_CONFIG
    base = (args.gateway or config.public_url).rstrip("/")
    install_url = base + EVENTS_PATH
    # A Marketplace app's OAuth pair is the config's; with local apps only, the emulated portal issues its own.
    oauth = OAuthEmulator(app.client_id or "app.simulate", app.client_secret or secrets.token_urlsafe(24))
    portal = PortalEmulator()
    with LoopbackServer(oauth.app) as oauth_server, LoopbackServer(portal.app) as portal_server:
        oauth.url, portal.url = oauth_server.url, portal_server.url
        kind = f"Marketplace app {app.client_id}" if app.client_id else "a local app"
        print(f"OAuth server emulator on {oauth.url}; portal emulator on {portal.url}, installing {kind}")
        fields, _ = portal.install(oauth, install_url, status=None if app.client_id else "L", send=False)
        try:
            answer = portal.send_event(install_url, fields)
        except httpx.HTTPError as exc:
            print(f"install: cannot reach the gateway at {base}: {type(exc).__name__}. Is `gateway serve` running?", file=sys.stderr)
            return 1
        print(f"install (ONAPPINSTALL to {install_url}): HTTP {answer.status_code} {answer.text}")
        if answer.status_code != 200:
            print(_install_refused_hint(answer, config, base), file=sys.stderr)
            return 1

        started = time.monotonic()
        registered = _poll(lambda: next((e for e in list(portal.engines.values()) if e.get("app_code") and e["code"] == code), None), args.timeout)
        if registered is None:
            print(
                f"engine {code} was not registered on the portal within {args.timeout:.0f} s; `gateway tenants show {portal.domain}` says why",
                file=sys.stderr,
            )
            return 1
        url = str(registered["completions_url"])
        secret = url.split("/app/", 1)[1].split("/")[1] if "/app/" in url else ""
        bound = any(b.event == "ONAPPUNINSTALL" for b in list(portal.event_bindings.values()))
        print(f"engine {code} registered by the gateway after {time.monotonic() - started:.2f} s: {mask_token(url, secret)}")
        print(f"ONAPPUNINSTALL handler bound: {'yes' if bound else 'no'}")
        if args.gateway and url.startswith(config.public_url):
            url = base + url[len(config.public_url) :]

        auth = portal.app_auth()
        prompt = portal_prompt(category, portal, text=args.prompt, audio=audio)
        job_hash, body = portal.new_request(category, prompt, ttl=args.ttl, auth=auth)
        sent = time.monotonic()
        response = portal.send(url, body)
        print(f"completions POST (with the portal user's auth): HTTP {response.status_code} {response.text} in {(time.monotonic() - sent) * 1000:.1f} ms")
        if response.status_code != 202:
            if "callback_not_allowed" in response.text:
                print(f"the gateway refused the emulator's callback host; {CALLBACK_REFUSED_HINT}", file=sys.stderr)
            return 1
        job = portal.wait(job_hash, timeout=args.timeout)
        callback = job.delivered[0] if job.delivered else None
        if callback is None:
            print(f"no callback within {args.timeout:.0f} s", file=sys.stderr)
            return 1
        print(f"{callback.kind} callback after {time.monotonic() - sent:.2f} s:")
        print(json.dumps(callback.body, indent=2, ensure_ascii=False))

        statuses = portal.uninstall(clean=args.clean)
        print(f"uninstall (ONAPPUNINSTALL{', CLEAN=1' if args.clean else ''} to the handler the gateway bound): HTTP {', '.join(map(str, statuses)) or '-'}")
        if statuses != [200]:
            print(f"the gateway did not take the uninstall event; it was bound at {config.public_url}{EVENTS_PATH} (public_url)", file=sys.stderr)
            return 1
        job_hash, body = portal.new_request(category, prompt, ttl=args.ttl, auth=auth)
        after = portal.send(url, body)
        refused = after.status_code == 404
        print(f"completions POST after uninstall: HTTP {after.status_code} {after.text} -- {'refused, as it must be' if refused else 'still served!'}")
        if not refused:
            return 1
        print(f"the portal stays listed as uninstalled (`gateway tenants show {portal.domain}`); `gateway tenants forget {portal.domain}` removes it")
        return 0 if callback.kind == "success" else 1


def _poll(check: Any, timeout: float) -> Any:
    """``check()``'s first true value within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except RuntimeError:  # the emulator's dict changed while it was read: read again
            value = None
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(0.1)


def _install_refused_hint(answer: Any, config: Config, base: str) -> str:
    """What to change when the gateway refuses the emulated portal's install event."""
    try:
        error = answer.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if error == "untrusted_oauth_server":
        app = _app_settings(config)
        servers = ", ".join(dict.fromkeys([*app.oauth_servers, "127.0.0.1"]))
        return (
            f"the gateway does not trust the emulated OAuth server on 127.0.0.1. For this simulation set in {config.path}:"
            f" `app.oauth_servers: [{servers}]` and `security.allow_private_networks: true` (local testing only), then restart the gateway"
        )
    if answer.status_code == 404:
        return f"the gateway at {base} runs without app mode: add `app:` to the config it runs on and restart it"
    if error == "install_not_verified":
        return f"the gateway did not confirm the install: does it run on {config.path} (the same app.client_id and client_secret)? Its log says why"
    return "the gateway refused the install; its log says why"


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import Demo

    return Demo(_config(args), args.gateway, timeout=args.timeout).run()


# -- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="configuration file (default: $GATEWAY_CONFIG or ./gateway.yaml)")
    parser = argparse.ArgumentParser(prog="gateway", description="A pluggable model gateway for Bitrix24 AI engines.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="serve the completions endpoint and run workers")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-worker", action="store_true", help="accept only; run `gateway worker` processes for the work")
    p.add_argument("--processes", type=int, default=1, metavar="N", help="N server processes on one port, to use N cores (each with its own worker)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", parents=[common], help="run workers only (scale-out beside `serve`)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    engines = sub.add_parser("engines", help="the engines this gateway serves").add_subparsers(dest="engines_command", required=True)
    p = engines.add_parser("list", parents=[common], help="list engines with their completions URLs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_engines_list)
    portal = argparse.ArgumentParser(add_help=False)
    portal.add_argument("--portal", metavar="WEBHOOK", help="inbound webhook https://<portal>/rest/<user>/<secret>/ (default: portal.webhook)")
    p = engines.add_parser("register", parents=[common, portal], help="register the config's engines on the portal (idempotent)")
    p.add_argument("--engine", action="append", metavar="CODE", help="only this engine (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the calls that would change the portal, make none")
    p.set_defaults(func=cmd_engines_register)
    p = engines.add_parser("remote", parents=[common, portal], help="the portal's engines beside the config's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_engines_remote)
    p = engines.add_parser("unregister", parents=[common, portal], help="remove engines from the portal")
    p.add_argument("--engine", action="append", metavar="CODE", help="this engine (repeatable)")
    p.add_argument("--all", action="store_true", help="every engine in the config")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_engines_unregister)

    p = sub.add_parser("plugins", parents=[common], help="list loaded plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    jobs = sub.add_parser("jobs", help="inspect jobs, cancel or re-deliver one").add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("list", parents=[common], help="recent jobs, newest first")
    p.add_argument("--state", choices=[state.value for state in JobState])
    p.add_argument("--engine", metavar="CODE")
    p.add_argument("--category", choices=[category.value for category in Category])
    p.add_argument("--portal", metavar="HOST", help="the portal's host name")
    p.add_argument("--since", metavar="SPAN", help="accepted within this span: 15m, 2h, 1d (default: all)")
    p.add_argument("--before", metavar="ID", help="older than this job (the next page)")
    p.add_argument("--limit", type=int, default=50, help="at most 500")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_list)
    p = jobs.add_parser("show", parents=[common], help="one job: state, attempts, timings")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_show)
    p = jobs.add_parser("cancel", parents=[common], help="stop a job no worker holds: the portal gets an error (code cancelled)")
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_action)
    p = jobs.add_parser("redeliver", parents=[common], help="deliver a dead job's stored outcome again, while its deadline is ahead")
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_action)
    p = jobs.add_parser("stats", parents=[common], help="per engine: accepted, succeeded, failed, expired, p50/p99; pending jobs")
    p.add_argument("--minutes", type=int, default=60)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_stats)

    admin = sub.add_parser("admin", help="the admin dashboard").add_subparsers(dest="admin_command", required=True)
    p = admin.add_parser("hash-password", help="print the scrypt hash of a password read from the terminal or stdin, for admin.password")
    p.set_defaults(func=cmd_admin_hash_password)
    app = sub.add_parser("app", help="Bitrix24 app mode: what to enter on the portal").add_subparsers(dest="app_command", required=True)
    p = app.add_parser("info", parents=[common], help="the install handler URL and the engines every installing portal gets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_app_info)
    tenants = sub.add_parser("tenants", help="portals that installed the app").add_subparsers(dest="tenants_command", required=True)
    p = tenants.add_parser("list", parents=[common], help="every installed portal, its status and registration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tenants)
    for name, what in (
        ("show", "one tenant in detail"),
        ("disable", "refuse its requests"),
        ("enable", "serve it again"),
        ("forget", "delete its record and jobs"),
        ("limits", "its own limits over app.limits (0: no limit); every node applies them within 5 s"),
    ):
        p = tenants.add_parser(name, parents=[common], help=what)
        p.add_argument("tenant", help="domain, member_id or tenant id")
        if name == "show":
            p.add_argument("--json", action="store_true", help="include its completions URLs (they hold its secret)")
        if name == "limits":
            p.add_argument("--requests-per-minute", type=int, dest="requests_per_minute")
            p.add_argument("--concurrent-jobs", type=int, dest="concurrent_jobs")
            p.add_argument("--audio-minutes-per-day", type=float, dest="audio_minutes_per_day")
            p.add_argument("--reset", action="store_true", help="back to app.limits")
        p.set_defaults(func=cmd_tenants)

    p = sub.add_parser("usage", parents=[common], help="requests, tokens, cost and audio by day, engine and portal or API key")
    p.add_argument("--tenant", metavar="PORTAL", help="one installed portal: domain, member_id or tenant id (app mode; portal jobs only)")
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--surface", choices=["portal", "api"], help="portal jobs only, or requests to the OpenAI-compatible API only (default: both)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true")
    shape.add_argument("--csv", action="store_true", help="CSV with a header row, for a spreadsheet")
    p.set_defaults(func=cmd_usage)

    db = sub.add_parser("db", help="the shared PostgreSQL database's schema").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("migrate", parents=[common], help="apply pending schema migrations (nodes also do this at start)")
    p.set_defaults(func=cmd_db_migrate)
    p = db.add_parser("status", parents=[common], help="applied and pending schema migrations")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_status)

    p = sub.add_parser("simulate", parents=[common], help="send one request through a running gateway from a portal emulator")
    p.add_argument("--engine", help="the engine to send to (required without --app; with --app default: the first of app.engines)")
    p.add_argument("--app", action="store_true", help="app mode: install the app on an emulated portal, send one request, uninstall")
    p.add_argument("--clean", action="store_true", help="with --app: uninstall with CLEAN=1 (the gateway deletes the portal's jobs)")
    p.add_argument("--prompt", default="Write a short greeting for our clients", help="text and image engines")
    p.add_argument("--audio", metavar="FILE", help="audio and call engines: the recording to send")
    p.add_argument("--gateway", metavar="URL", help="where the gateway listens (default: public_url)")
    p.add_argument("--ttl", type=int, default=14400)
    p.add_argument("--register", action="store_true", help="register the engine on the emulator first (ai.engine.register)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", parents=[common], help="one request per category through the gateway (started if not running), then the register parameters")
    p.add_argument("--gateway", metavar="URL", help="where the gateway listens (default: public_url)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each callback")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PluginError as exc:
        print(f"plugin error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except QueueStoreError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
