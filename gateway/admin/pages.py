"""The dashboard's pages: each reads what it shows through the same queries and report functions
as the CLI (``gateway jobs``, ``gateway usage``, ``gateway tenants``, ``gateway engines remote``)
and the ``/metrics`` registry, and turns it into plain values for its template."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.admin.charts import stacked_bars
from gateway.admin.filters import JOB_ID_RE, SINCE_CHOICES, read_job_filters
from gateway.admin.sessions import Session
from gateway.engines import mask_token
from gateway.jobs.model import Job
from gateway.jobs.queue import JobActionRefused, JobFilter
from gateway.jobs.reports import allowed_actions, describe_result, engine_table, minute_series, quantile
from gateway.metrics import END_TO_END_BUCKETS
from gateway.outcomes import JobState
from gateway.plugins import list_plugins
from gateway.tasks import Category
from gateway.tenants.model import TenantStatus
from gateway.tenants.store import StatusChangeRefused
from gateway.usage.report import api_usage, daily_totals, merged, portal_usage_rows, to_csv

if TYPE_CHECKING:
    from gateway.admin.site import AdminSite

log = logging.getLogger("gateway.admin")
PORTAL_TIMEOUT = 8.0
"""Seconds the engines page waits for the portal's ``ai.engine.list`` before it shows "unknown"."""
OVERVIEW_MINUTES = 60
PROBLEM_STATES = (JobState.FAILED, JobState.DEAD, JobState.GONE)
USAGE_DAYS = (1, 7, 14, 30, 90)
FINISHED_STATES = (JobState.DELIVERED, JobState.DELIVERED_UNCONFIRMED, JobState.FAILED, JobState.GONE, JobState.EXPIRED, JobState.DEAD)


def _counter_sum(metric: Any) -> int:
    """A counter's ``_total`` samples added up over their labels, as ``/metrics`` renders them."""
    return int(sum(sample.value for family in metric.collect() for sample in family.samples if sample.name.endswith("_total")))


def process_counters(metrics: Any) -> dict[str, Any]:
    """This process's counters as ``/metrics`` renders them: accepted, finished by state, refused."""
    by_state = dict.fromkeys((str(s) for s in FINISHED_STATES), 0)
    for family in metrics.finished.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                by_state[sample.labels["state"]] = by_state.get(sample.labels["state"], 0) + int(sample.value)
    return {
        "accepted_total": _counter_sum(metrics.accepted),
        "finished_total": sum(by_state.values()),
        "by_state": by_state,
        "rejected_total": _counter_sum(metrics.rejected),
    }


def overall_latency(activity: Any) -> dict[str, float | None]:
    """p50 and p99 end to end over every engine, from the same latency buckets as the engine table."""
    buckets = [0] * (len(END_TO_END_BUCKETS) + 1)
    for finished in activity.finished:
        buckets[min(finished.bucket, len(END_TO_END_BUCKETS))] += finished.count
    return {"p50": quantile(0.5, buckets), "p99": quantile(0.99, buckets)}


def _utc(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "—"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def register_filters(env: Any) -> None:
    env.filters["utc"] = _utc
    env.filters["iso"] = lambda ts: datetime.fromtimestamp(ts, UTC).isoformat() if ts else ""
    env.filters["seconds"] = _seconds
    env.filters["ms"] = lambda s: f"{s * 1000:.0f} ms" if s is not None else "—"


def job_row(job: Job) -> dict[str, Any]:
    """What the jobs table shows of a job: never its callback URLs or the portal's auth."""
    outcome = job.outcome
    if outcome is not None and outcome.error is not None:
        summary = outcome.error.message
    elif job.detail:
        summary = job.detail
    elif outcome is not None and outcome.result is not None:
        summary = describe_result(outcome.result)
    else:
        summary = ""
    return {
        "id": job.id,
        "state": str(job.state),
        "engine": job.engine,
        "category": str(job.category),
        "portal": job.task.portal,
        "tenant": job.task.tenant,
        "accepted_at": job.accepted_at,
        "deadline": job.deadline,
        "finished_at": job.finished_at,
        "took": (job.finished_at - job.accepted_at) if job.finished_at else None,
        "summary": summary[:300],
        "detail": job.detail,
        "delivery_attempts": job.delivery_attempts,
        "provider": outcome.provider if outcome is not None else "",
        "result": describe_result(outcome.result) if outcome is not None and outcome.result is not None else "",
    }


def timeline(job: Job) -> list[dict[str, Any]]:
    """Accepted, then every attempt as stored (provider calls, downloads, callbacks, internal errors,
    operator actions), then the final state."""
    labels = {
        "provider": "Provider call",
        "download": "Recording download",
        "callback": "Callback to the portal",
        "internal": "Internal error",
        "operator": "Operator",
    }
    steps: list[dict[str, Any]] = [
        {"kind": "accepted", "label": "Accepted", "at": job.accepted_at, "target": "", "outcome": "", "duration": None, "detail": ""}
    ]
    for attempt in job.attempts:
        kind = str(attempt.kind)
        steps.append(
            {
                "kind": kind,
                "label": labels.get(kind, kind),
                "at": attempt.started_at,
                "target": attempt.target,
                "outcome": str(attempt.outcome),
                "duration": attempt.duration,
                "detail": attempt.detail,
            }
        )
    if job.finished_at:
        steps.append(
            {
                "kind": "final",
                "label": f"Ended {job.state}",
                "at": job.finished_at,
                "target": "",
                "outcome": str(job.state),
                "duration": None,
                "detail": "",  # shown at the top of the page already
            }
        )
    return steps


class Pages:
    def __init__(self, site: AdminSite) -> None:
        self.site = site
        self.rt = site.rt
        register_filters(site.templates)

    # -- overview ------------------------------------------------------------------------------
    async def _overview(self) -> dict[str, Any]:
        now = time.time()
        queue = self.rt.queue
        first_minute = int(now // 60) * 60 - (OVERVIEW_MINUTES - 1) * 60  # the chart's first minute: cards, chart and table count the same jobs
        activity = await queue.activity(first_minute)
        series = minute_series(activity, now, minutes=OVERVIEW_MINUTES)
        totals = {key: sum(getattr(point, key) for point in series) for key in ("accepted", "succeeded", "failed", "expired")}
        problems: list[Job] = []
        for state in PROBLEM_STATES:
            problems += await queue.list(JobFilter(state=state, limit=5))
        problems.sort(key=lambda job: job.id, reverse=True)
        columns = [(datetime.fromtimestamp(point.minute, UTC).strftime("%H:%M"), vars(point)) for point in series]
        chart = stacked_bars(
            columns,
            (("succeeded", "ok-bar", "succeeded"), ("failed", "bad-bar", "failed"), ("expired", "warn-bar", "expired")),
            line=("accepted", "accepted"),
        )
        return {
            "totals": totals,
            "depth": sum(activity.pending.values()),
            "pending": {str(state): count for state, count in activity.pending.items()},
            "overall": overall_latency(activity),
            "engines": engine_table(activity),
            "problems": [job_row(job) for job in problems[:8]],
            "loops": self.rt.loops.status(),
            "process": process_counters(self.rt.metrics),
            "chart": chart,
        }

    async def overview(self, request: Request, session: Session) -> Response:
        return self.site.render(request, session, "overview.html", active="overview", **await self._overview())

    async def overview_live(self, request: Request, session: Session) -> Response:
        return self.site.render(request, session, "_live.html", **await self._overview())

    # -- jobs ----------------------------------------------------------------------------------
    async def jobs(self, request: Request, session: Session) -> Response:
        form, problem = read_job_filters(request.query_params, [e.code for e in self.rt.config.engines], now=time.time())
        jobs = await self.rt.queue.list(form.to_filter())
        older = None
        if len(jobs) == form.limit:
            older = f"{self.site.base}/jobs?{urlencode({**form.query(), 'before': jobs[-1].id})}"
        return self.site.render(
            request,
            session,
            "jobs.html",
            active="jobs",
            f=form,
            problem=problem,
            jobs=[job_row(job) for job in jobs],
            older=older,
            states=[str(s) for s in JobState],
            engine_codes=[e.code for e in self.rt.config.engines],
            categories=[str(c) for c in Category],
            since_choices=SINCE_CHOICES,
        )

    async def job(self, request: Request, session: Session) -> Response:
        job_id = request.path_params["job_id"]
        job = await self.rt.queue.get(job_id) if JOB_ID_RE.fullmatch(job_id) else None
        if job is None:
            return self.site.error_page(request, session, 404, "No such job", "No job has this id (it may have been pruned after queue.retention_days).")
        error = job.outcome.error if job.outcome is not None else None
        return self.site.render(
            request,
            session,
            "job.html",
            active="jobs",
            job=job_row(job),
            error=error.to_json() if error is not None else None,
            timeline=timeline(job),
            actions=sorted(allowed_actions(job, time.time())),
        )

    async def job_action(self, request: Request, session: Session) -> Response:
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        if not JOB_ID_RE.fullmatch(job_id) or action not in ("cancel", "redeliver"):
            return self.site.error_page(request, session, 404, "Not found", "No such job or action.")
        by = f"admin {session.user}"
        try:
            if action == "cancel":
                await self.rt.queue.cancel(job_id, by)
                message = "Cancelled: the portal gets an error callback saying so."
            else:
                await self.rt.queue.redeliver(job_id, by)
                message = "Queued for delivery again: a worker sends the stored outcome now."
        except JobActionRefused as exc:
            return self.site.redirect(f"/jobs/{job_id}", flash=f"Not done: {exc}", error=True)
        if self.rt.worker is not None:
            self.rt.worker.wake()  # this process's worker claims it now rather than at its next poll
        log.info("admin: %s asked to %s job %s", session.user, action, job_id)
        return self.site.redirect(f"/jobs/{job_id}", flash=message)

    # -- engines -------------------------------------------------------------------------------
    async def _portal_statuses(self) -> tuple[dict[str, Any], str]:
        """The portal's view of each engine (``gateway engines remote``), or why it is unknown."""
        from gateway.bitrix.registration import compare
        from gateway.bitrix.rest import PortalClient, PortalError

        config = self.rt.config
        if not config.portal_webhook:
            return {}, "No portal webhook is configured (portal.webhook), so whether the portal has each engine is not known here."
        try:
            async with PortalClient(config.portal_webhook, retries=0) as portal:
                remote = await asyncio.wait_for(portal.list(), PORTAL_TIMEOUT)
        except (PortalError, TimeoutError, ValueError) as exc:
            return {}, f"The portal did not answer ai.engine.list: {self.rt.redactor.redact(str(exc))[:200]}"
        return {s.code: s for s in compare(list(self.rt.engines), remote)}, ""

    async def engines(self, request: Request, session: Session) -> Response:
        statuses, note = await self._portal_statuses()
        shown = {"in_sync": ("registered", "registered"), "different": ("registered, different", "different"), "missing": ("not registered", "missing")}
        rows = []
        for engine in self.rt.engines:
            status = statuses.get(engine.code)
            label, css = shown.get(status.status, (status.status, "unknown")) if status else ("unknown", "unknown")
            rows.append(
                {
                    "code": engine.code,
                    "name": engine.config.name,
                    "category": str(engine.config.category),
                    "route": " → ".join(target.label for target in engine.config.route),
                    "masked_url": mask_token(engine.completions_url, engine.token),
                    "registered": label,
                    "registered_class": css,
                    "differences": ", ".join(status.differences) if status else "",
                }
            )
        return self.site.render(
            request, session, "engines.html", active="engines", engines=rows, portal_note=note, can_register=bool(self.rt.config.portal_webhook)
        )

    async def engine_url(self, request: Request, session: Session) -> Response:
        engine = self.rt.engines.get(request.path_params["code"])
        if engine is None:
            return JSONResponse({"error": "no such engine"}, 404)
        log.info("admin: %s revealed the completions URL of engine %s", session.user, engine.code)
        return JSONResponse({"url": engine.completions_url}, headers={"Cache-Control": "no-store"})

    async def engine_action(self, request: Request, session: Session) -> Response:
        from gateway.bitrix.registration import RegistrationError, register_engine
        from gateway.bitrix.rest import PortalClient, PortalError

        engine = self.rt.engines.get(request.path_params["code"])
        action = request.path_params["action"]
        if engine is None or action not in ("register", "unregister"):
            return self.site.error_page(request, session, 404, "Not found", "No such engine or action.")
        if not self.rt.config.portal_webhook:
            return self.site.redirect("/engines", flash="No portal webhook is configured (portal.webhook): the gateway cannot call the portal.", error=True)
        try:
            async with PortalClient(self.rt.config.portal_webhook, retries=self.rt.config.portal_retries, backoff=self.rt.config.portal_backoff) as portal:
                if action == "register":
                    message = await register_engine(portal, engine)
                else:
                    removed = await portal.unregister(engine.code)
                    message = f"{engine.code}: unregistered" if removed else f"{engine.code}: was not registered on the portal"
        except (RegistrationError, PortalError) as exc:
            return self.site.redirect("/engines", flash=f"{engine.code}: {self.rt.redactor.redact(str(exc))[:300]}", error=True)
        log.info("admin: %s: %s", session.user, message)
        return self.site.redirect("/engines", flash=message)

    # -- portals (app mode) --------------------------------------------------------------------
    async def portals(self, request: Request, session: Session) -> Response:
        service = self.rt.tenants
        if service is None or self.rt.config.app is None:
            return self.site.render(request, session, "portals.html", active="portals", app_mode=False, tenants=[])
        from gateway.tenants.limits import with_overrides

        rows = []
        for tenant in await service.store.all():
            effective = with_overrides(self.rt.config.app.limits, dict(tenant.limits))
            limits = ", ".join(
                f"{name.replace('_', ' ')} {getattr(effective, name) if getattr(effective, name) else '-'}"
                for name in ("requests_per_minute", "concurrent_jobs", "audio_minutes_per_day")
            )
            rows.append(
                {
                    "key": tenant.key,
                    "domain": tenant.domain,
                    "status": str(tenant.status),
                    "registration": str(tenant.registration),
                    "registration_error": tenant.registration_error,
                    "installed_at": tenant.installed_at,
                    "refreshed_at": tenant.last_refresh_at,
                    "limits": limits,
                }
            )
        return self.site.render(request, session, "portals.html", active="portals", app_mode=True, tenants=rows)

    async def portal_action(self, request: Request, session: Session) -> Response:
        service = self.rt.tenants
        key, action = request.path_params["tenant"], request.path_params["action"]
        if service is None or action not in ("disable", "enable") or not re.fullmatch(r"[0-9a-f]{16}", key):
            return self.site.error_page(request, session, 404, "Not found", "No such portal or action.")
        tenant = await service.store.by_key(key)
        if tenant is None:
            return self.site.error_page(request, session, 404, "No such portal", "No installed portal has this id.")
        try:
            changed = await service.change_status(tenant, TenantStatus.DISABLED if action == "disable" else TenantStatus.ACTIVE)
        except StatusChangeRefused as exc:
            return self.site.redirect("/portals", flash=str(exc), error=True)
        log.info("admin: %s set tenant %s (%s) %s", session.user, tenant.key, tenant.domain, changed.status)
        return self.site.redirect("/portals", flash=f"{tenant.domain}: {changed.status}")

    # -- usage ---------------------------------------------------------------------------------
    def _usage_days(self, request: Request) -> int:
        raw = request.query_params.get("days", "14")
        return int(raw) if raw in {str(d) for d in USAGE_DAYS} else 14

    async def _usage_rows(self, days: int) -> list[Any]:
        """``gateway usage``'s rows: portal jobs counted by the job store (no job loaded), API requests from the usage ledger."""
        start = datetime.now(UTC).date() - timedelta(days=days - 1)
        since = datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp()
        portal = await self.rt.queue.usage_totals(since)
        api_rows = await self.rt.api_usage.rows(start.isoformat())  # stored, plus this process's counts not yet written
        return merged(portal_usage_rows(portal), api_usage(api_rows))

    async def usage(self, request: Request, session: Session) -> Response:
        days = self._usage_days(request)
        rows = await self._usage_rows(days)
        daily = {d.day: d for d in daily_totals(rows)}
        today = datetime.now(UTC).date()
        day_list = [(today - timedelta(days=offset)).isoformat() for offset in range(days - 1, -1, -1)]
        by_surface: dict[str, dict[str, float]] = {day: {"portal": 0, "api": 0} for day in day_list}
        for row in rows:
            if row.day in by_surface:
                by_surface[row.day][row.surface] = by_surface[row.day].get(row.surface, 0) + row.requests
        every = max(1, days // 7)
        requests_chart = stacked_bars(
            [(day[5:], by_surface[day]) for day in day_list], (("portal", "run-bar", "portal jobs"), ("api", "other-bar", "API requests")), label_every=every
        )
        tokens_chart = stacked_bars(
            [(day[5:], vars(daily[day]) if day in daily else {}) for day in day_list],
            (("prompt_tokens", "run-bar", "prompt tokens"), ("completion_tokens", "ok-bar", "completion tokens")),
            label_every=every,
        )
        totals = {
            "requests": sum(r.requests for r in rows),
            "prompt_tokens": sum(r.prompt_tokens for r in rows),
            "completion_tokens": sum(r.completion_tokens for r in rows),
            "cost_usd": sum(r.cost_usd for r in rows),
        }
        return self.site.render(
            request,
            session,
            "usage.html",
            active="usage",
            days=days,
            day_choices=USAGE_DAYS,
            rows=rows,
            totals=totals,
            requests_chart=requests_chart,
            tokens_chart=tokens_chart,
            api_keys=[
                {
                    "name": key.name,
                    "engines": ", ".join(key.engines),
                    "requests_per_minute": key.requests_per_minute or "-",
                    "tokens_per_day": key.tokens_per_day or "-",
                    "hashed": key.secret.startswith("sha256:"),
                }
                for key in self.rt.config.api_keys
            ],
        )

    async def usage_csv(self, request: Request, session: Session) -> Response:
        days = self._usage_days(request)
        rows = await self._usage_rows(days)
        name = f"gateway-usage-{datetime.now(UTC).date().isoformat()}-{days}d.csv"
        return Response(
            to_csv(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    # -- plugins -------------------------------------------------------------------------------
    async def plugins(self, request: Request, session: Session) -> Response:
        adapters: dict[str, list[str]] = {}
        for name in self.rt.registry.names():
            kind = self.rt.registry.get(name)
            if kind is not None:
                adapters.setdefault(kind.plugin, []).append(name)
        listing = [{**plugin, "adapters": sorted(adapters.get(plugin["name"], []))} for plugin in list_plugins(self.rt.pm)]
        return self.site.render(request, session, "plugins.html", active="plugins", plugins=listing)
