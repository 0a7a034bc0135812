"""The queue a configuration names: the one place that turns ``queue.backend`` into a queue.

``gateway serve``/``worker`` (the runtime) and the ``gateway jobs`` commands both get their
queue here, so a new backend is added once.
"""

from __future__ import annotations

from gateway.config import QueueSettings
from gateway.jobs.queue import JobQueue
from gateway.jobs.sqlite import SQLiteJobQueue
from gateway.supervision import Supervisor


def job_queue(settings: QueueSettings, *, supervisor: Supervisor | None = None) -> JobQueue:
    """The configured queue, not opened yet (``await queue.open()``; ``close()`` when done).
    ``supervisor`` restarts its background loops and reports them to ``/-/health``."""
    if settings.backend == "sqlite":
        return SQLiteJobQueue(settings.path, supervisor=supervisor)
    raise ValueError(f"unknown queue backend {settings.backend!r}")  # the config refuses it first
