"""``gateway serve --processes N``: N server processes on one listening socket, so a node uses
every core (one Python process runs on one core at a time).

The parent binds the socket, then forks the children before anything else happens in it (no
event loop, no threads, no model loaded): each child builds its own runtime — its own worker
with ``workers.concurrency`` model slots, its own queue connection, its own models — and serves
the inherited socket; the kernel hands each new connection to one of the processes accepting.
The parent only supervises: SIGTERM or SIGINT is passed on to every child (each stops
gracefully), a child that dies is started again (a child that keeps dying at start, e.g. on a
broken model, stops them all), and every child stops by itself when the parent is gone.

The processes share the queue as separate gateway processes always could: with SQLite each has
its own group-commit flusher and they take turns for the file's write lock (accepts stay
durable; under load their batches interleave); with PostgreSQL each has its own pool and
listener. ``/metrics`` answers for the process that served the request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("gateway.processes")
RESTART_PAUSE = 1.0
EARLY_DEATH = 10.0
"""A child that dies within this many seconds of its start is counted as failing to start."""
MAX_EARLY_DEATHS = 3


def serve_processes(count: int, child: Callable[[int], int]) -> int:
    """Run ``child(index)`` in ``count`` forked processes until SIGTERM/SIGINT; the exit status."""
    children: dict[int, tuple[int, float]] = {}
    """pid → (index, start time)"""
    stopping = False
    failed = False
    early_deaths = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: its own signal handlers come with its server
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _stop_with_parent(os.getppid())
            code = 1
            try:
                code = child(index)
            except BaseException:
                log.exception("gateway process %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            spawn(index)
        log.info("serving with %d processes: %s", count, ", ".join(str(pid) for pid in children))
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index, started = children.pop(pid, (-1, 0.0))
            code = os.waitstatus_to_exitcode(status)
            if stopping or index < 0:
                continue
            early_deaths = early_deaths + 1 if time.monotonic() - started < EARLY_DEATH else 0
            if early_deaths >= MAX_EARLY_DEATHS:
                log.error("gateway process %d exited with %d at start %d times in a row; stopping", index, code, early_deaths)
                failed = True
                stop(signal.SIGTERM, None)
                continue
            log.warning("gateway process %d (pid %d) exited with %d; starting it again", index, pid, code)
            time.sleep(RESTART_PAUSE)
            if not stopping:
                spawn(index)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this process (a graceful stop) when the parent is gone, even after its SIGKILL."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
