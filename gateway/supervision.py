"""Background loops that cannot die quietly.

Each loop (the queue's flusher, the worker's dispatch, heartbeat and retention) handles
an error on one item itself. This is the second line: a loop that still raises is
logged, counted in ``gateway_loop_restarts_total{loop}`` and started again after a short,
growing pause, and while it is down ``GET /-/health`` answers 503 naming it. Without it
a dead flusher leaves every later accept waiting forever, with nothing in the logs but
one traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.backoff import Backoff
from gateway.redaction import Redactor

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.supervision")

RESTART_INITIAL = 0.1
RESTART_MAX = 5.0
STABLE_AFTER = 60.0
"""A loop that ran this long before failing restarts after the initial pause again."""


@dataclass(frozen=True)
class LoopStatus:
    name: str
    state: str
    """``running``, ``down`` (waiting to be restarted) or ``stopped`` (it returned or was cancelled)."""
    reason: str = ""
    """Why it is down (secrets masked)."""
    restarts: int = 0


class Supervisor:
    """Runs named loops as tasks, restarts the ones that raise, and says which are down."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        restart_initial: float = RESTART_INITIAL,
        restart_max: float = RESTART_MAX,
        redactor: Redactor | None = None,
    ) -> None:
        self.metrics = metrics
        self.redactor = redactor or Redactor()
        """Masks the runtime's secrets in the reason a loop is down (``/-/health`` shows it)."""
        self.restart_initial, self.restart_max = restart_initial, restart_max
        self._down: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._restarts: dict[str, int] = {}

    def start(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run ``loop()`` under supervision; the returned task ends when a run of it returns
        normally (the loop decided to stop) or when the task is cancelled."""
        task = asyncio.create_task(self._supervise(name, loop), name=f"gateway-{name}")
        self._tasks[name] = task
        return task

    def down(self) -> dict[str, str]:
        """Loops waiting to be restarted, with the error that stopped each."""
        return dict(self._down)

    def status(self) -> list[LoopStatus]:
        """Every loop started and not stopped, by name: what the admin dashboard shows."""
        statuses = []
        for name, task in sorted(self._tasks.items()):
            state = "down" if name in self._down else ("stopped" if task.done() else "running")
            statuses.append(LoopStatus(name, state, self._down.get(name, ""), self._restarts.get(name, 0)))
        return statuses

    async def stop(self, name: str) -> None:
        """Cancel a loop and wait for it to end."""
        task = self._tasks.pop(name, None)
        self._down.pop(name, None)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _supervise(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        schedule = Backoff(self.restart_initial, self.restart_max)  # its ceiling: doubling, no jitter (one loop, nothing to spread)
        restarts = 0
        try:
            while True:
                started = time.monotonic()
                try:
                    await loop()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if time.monotonic() - started >= STABLE_AFTER:
                        restarts = 0
                    pause = schedule.ceiling(restarts)
                    reason = self.redactor.redact(f"{type(exc).__name__}: {exc}")[:300]
                    self._down[name] = reason
                    self._restarts[name] = self._restarts.get(name, 0) + 1
                    if self.metrics is not None:
                        self.metrics.loop_restarts.labels(name).inc()
                    log.error("background loop %s stopped (%s); restarting in %.1f s", name, reason, pause, exc_info=exc)
                    await asyncio.sleep(pause)
                    restarts += 1
                    self._down.pop(name, None)
                    log.info("background loop %s restarted", name)
        finally:
            self._down.pop(name, None)
