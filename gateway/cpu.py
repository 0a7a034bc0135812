"""CPU-heavy plugin work (local models) beside the event loop that answers the portal.

Local inference would otherwise take the cores the accept path needs. Plugins run it in
these threads and processes, at a lower CPU priority: on a busy machine the scheduler
then serves the event loop first, and the accept latency holds (see the transcription
benchmark in the README). Native libraries that start their own threads from one of
these (llama.cpp, CTranslate2) pass the priority on, as Linux threads inherit it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Generic, TypeVar

Loaded = TypeVar("Loaded")


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux sets nice values per thread)."""
    if nice and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, current + nice))


def background_threads(count: int, nice: int, name: str) -> ThreadPoolExecutor:
    """``count`` threads at ``nice`` below the caller's priority."""
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix=name, initializer=lower_priority, initargs=(nice,))


def background_processes(count: int, nice: int) -> ProcessPoolExecutor:
    """``count`` child processes (spawned, not forked: the parent runs threads) at ``nice``,
    for work that holds the GIL too long to share a process with the event loop.

    The children exit when the gateway process is gone, even after a SIGKILL."""
    return ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_child_started, initargs=(nice, os.getpid()))


def _child_started(nice: int, parent: int) -> None:
    lower_priority(nice)

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


class SharedModels(Generic[Loaded]):
    """Models loaded once per process, by key: providers that name the same model file and
    settings share one copy (weights are the largest thing a gateway process holds)."""

    def __init__(self) -> None:
        self._loaded: dict[Hashable, Loaded] = {}
        self._lock = threading.Lock()

    def values(self) -> list[Loaded]:
        with self._lock:
            return list(self._loaded.values())

    def get(self, key: Hashable, load: Callable[[], Loaded]) -> Loaded:
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load()
            return self._loaded[key]
