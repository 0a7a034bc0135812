"""Prometheus metrics. Labels are engine codes, categories, states, provider names, loop
names and portal host names only: never tokens, hashes or URLs (a callback URL carries
the portal's secret hash, so delivery metrics are labelled with its host name alone).

Final outcomes are counted by :class:`MetricsRecorder`, a default plugin that listens to
``task_succeeded`` / ``task_failed`` like any third-party plugin would.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.hookspecs import hookimpl
from gateway.outcomes import JobState

ACCEPT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
END_TO_END_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)


MAX_PORTAL_LABELS = 200
OTHER_PORTALS = "other"


class PortalLabels:
    """Portal host names as metric labels, at most :data:`MAX_PORTAL_LABELS` of them.

    The hosts come from the request body: within ``*.bitrix24.com`` anyone holding an engine
    URL could otherwise create a new time series per request. Hosts beyond the cap share
    the label ``other``."""

    def __init__(self, limit: int = MAX_PORTAL_LABELS) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def label(self, host: str) -> str:
        if host in self._known:
            return host
        if len(self._known) >= self.limit:
            return OTHER_PORTALS
        self._known.add(host)
        return host

    def wrap(self, metric: Any) -> _PortalLabelled:
        return _PortalLabelled(metric, self)


class _PortalLabelled:
    """A metric whose first label is a portal host, passed through :class:`PortalLabels`."""

    def __init__(self, metric: Any, portals: PortalLabels) -> None:
        self.metric, self.portals = metric, portals

    def labels(self, portal: str, *rest: str) -> Any:
        return self.metric.labels(self.portals.label(portal), *rest)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter("gateway_jobs_accepted", "Requests accepted (202) as new jobs", ["engine", "category"], registry=r)
        self.duplicates = Counter("gateway_jobs_duplicate", "Repeated requests for a job already accepted", ["engine"], registry=r)
        self.rejected = Counter("gateway_requests_rejected", "Completions requests refused with an error status", ["reason"], registry=r)
        self.finished = Counter("gateway_jobs_finished", "Jobs that reached a final state", ["engine", "category", "state"], registry=r)
        self.provider_attempts = Counter(
            "gateway_provider_attempts", "Calls to route targets, by surface (portal, openai)", ["engine", "provider", "outcome", "surface"], registry=r
        )
        self.delivery_attempts = Counter("gateway_delivery_attempts", "Callback POSTs to portals", ["engine", "category", "outcome"], registry=r)
        self.tokens = Counter(
            "gateway_tokens", "Tokens providers reported, by type (prompt, completion)", ["engine", "provider", "model", "type", "surface"], registry=r
        )
        self.cost = Counter(
            "gateway_cost_usd", "What provider calls cost, in US dollars, where the adapter knows", ["engine", "provider", "model", "surface"], registry=r
        )
        self.openai_requests = Counter(
            "gateway_openai_requests", "Requests to the OpenAI-compatible API, by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.openai_latency = Histogram(
            "gateway_openai_latency_seconds",
            "Time to the answer's first byte on the OpenAI-compatible API (streams: the first chunk)",
            ["endpoint"],
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("gateway_queue_depth", "Jobs not yet in a final state", registry=r)
        # App mode: per installed portal, labelled with the tenant id (a hash of member_id), never a token.
        self.tenant_tasks = Counter("gateway_tenant_tasks", "Tasks run for an installed portal, by outcome (result, error)", ["tenant", "outcome"], registry=r)
        self.tenant_tokens = Counter("gateway_tenant_tokens", "Tokens providers reported for an installed portal's tasks", ["tenant", "type"], registry=r)
        self.tenant_cost = Counter("gateway_tenant_cost_usd", "What an installed portal's tasks cost, where the adapter knows", ["tenant"], registry=r)
        self.tenant_audio = Counter("gateway_tenant_audio_seconds", "Seconds of audio transcribed for an installed portal", ["tenant"], registry=r)
        self.tenant_limited = Counter("gateway_tenant_limited", "Tasks refused because an installed portal was over a limit", ["tenant", "limit"], registry=r)
        self.accept_latency = Histogram(
            "gateway_accept_latency_seconds", "Time to answer a completions POST", ["engine", "category"], buckets=ACCEPT_BUCKETS, registry=r
        )
        self.end_to_end = Histogram(
            "gateway_end_to_end_latency_seconds", "Acceptance to final state", ["engine", "category"], buckets=END_TO_END_BUCKETS, registry=r
        )
        portals = PortalLabels()  # shared, so the three metrics agree on which hosts are "other"
        self.delivery_latency = portals.wrap(
            Histogram("gateway_delivery_latency_seconds", "Duration of callback POSTs, by portal host name", ["portal"], buckets=DELIVERY_BUCKETS, registry=r)
        )
        self.delivery_failures = portals.wrap(
            Counter(
                "gateway_delivery_failures",
                "Callback POSTs that did not deliver, by portal host name and outcome (retry, gone, rejected, refused, error)",
                ["portal", "outcome"],
                registry=r,
            )
        )
        self.delivery_deferred = portals.wrap(
            Counter(
                "gateway_delivery_deferred",
                "Deliveries put back in the queue because their portal already had the maximum of callbacks in flight and waiting",
                ["portal"],
                registry=r,
            )
        )
        self.loop_restarts = Counter("gateway_loop_restarts", "Background loops restarted after an unexpected error", ["loop"], registry=r)
        self.job_errors = Counter(
            "gateway_job_internal_errors", "Unexpected errors while running or delivering a job (each recorded on the job and retried)", ["stage"], registry=r
        )

    def count_usage(self, engine: str, provider: str, model: str, usage: Any, surface: str = "portal") -> None:
        """Add a result's :class:`~gateway.adapters.Usage` (counted when produced: the call was paid for)."""
        if usage is None:
            return
        if usage.prompt_tokens:
            self.tokens.labels(engine, provider, model, "prompt", surface).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.tokens.labels(engine, provider, model, "completion", surface).inc(usage.completion_tokens)
        if usage.cost_usd:
            self.cost.labels(engine, provider, model, surface).inc(usage.cost_usd)

    def count_tenant_usage(self, tenant: str, usage: Any) -> None:
        if usage is None:
            return
        if usage.prompt_tokens:
            self.tenant_tokens.labels(tenant, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.tenant_tokens.labels(tenant, "completion").inc(usage.completion_tokens)
        if usage.cost_usd:
            self.tenant_cost.labels(tenant).inc(usage.cost_usd)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsRecorder:
    """Counts final outcomes through the same hooks a third-party plugin would use."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def _finish(self, task: Any, state: JobState) -> None:
        self.metrics.finished.labels(task.engine, task.category.value, JobState(state).value).inc()
        self.metrics.end_to_end.labels(task.engine, task.category.value).observe(max(0.0, time.time() - task.accepted_at))

    @hookimpl
    def task_succeeded(self, task: Any, state: JobState) -> None:
        self._finish(task, state)

    @hookimpl
    def task_failed(self, task: Any, state: JobState) -> None:
        self._finish(task, state)
