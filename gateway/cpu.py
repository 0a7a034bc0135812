"""CPU-heavy plugin work (local models) beside the event loop that answers the portal.

Local inference would otherwise take the cores the accept path needs. Plugins run it in
these threads and processes, at a lower CPU priority: on a busy machine the scheduler
then serves the event loop first, and the accept latency holds (see the transcription
benchmark in the README). Native libraries that start their own threads from one of
these (llama.cpp, CTranslate2) pass the priority on, as Linux threads inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import resource_tracker
from typing import Generic, Protocol, TypeVar

from gateway.adapters import AdapterConfigError

Loaded = TypeVar("Loaded")
Answer = TypeVar("Answer")
_pools: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()
"""Pools from :func:`background_processes` not stopped yet: the last one stopped stops the resource tracker."""
_pools_lock = threading.Lock()


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

    The children exit when the gateway process is gone, even after a SIGKILL; on a clean stop
    :func:`stop_processes` ends them first."""
    pool = ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"), initializer=_child_started, initargs=(nice, os.getpid()))
    with _pools_lock:
        _pools.add(pool)
    return pool


def stop_processes(pool: ProcessPoolExecutor, timeout: float = 5.0) -> None:
    """Stop a pool from :func:`background_processes` and wait until it is gone: its children
    are reaped (none is left ``<defunct>``) and its queues closed, which unlinks their named
    semaphores. Waiting matters: ``serve`` ends by re-raising SIGTERM, which kills the process
    without running ``atexit``, so whatever is not released here is reported by
    multiprocessing's resource tracker as "leaked semaphore objects". A child still busy after
    ``timeout`` seconds is killed. When the last pool is stopped, the resource tracker is
    stopped too (see :func:`_stop_resource_tracker`). Blocks: call it from a thread, not the event loop."""
    children = list((pool._processes or {}).values())  # the executor offers no public way to reach them
    stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, name="stop-processes", daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():  # a child busy with a long or hung job: the pool sees it die and winds down
        for child in children:
            with contextlib.suppress(OSError, ValueError):
                child.kill()
        stopper.join(timeout)
    with _pools_lock:
        _pools.discard(pool)
        last = not _pools
    if last and not stopper.is_alive():
        _stop_resource_tracker(timeout)


def _stop_resource_tracker(timeout: float) -> None:
    """Stop multiprocessing's resource tracker, a child process started beside the first pool,
    and reap it. Left alone it outlives the gateway and stays ``<defunct>`` under a parent that
    does not reap orphans (Python 3.11 never waits for it; 3.12 only in a ``__del__`` that a
    re-raised SIGTERM skips). With every pool stopped it tracks nothing: once its pipe is
    closed it exits. multiprocessing starts a new one if a pool is created later."""
    tracker = resource_tracker._resource_tracker
    lock = getattr(tracker, "_lock", None)
    if lock is None or not hasattr(tracker, "_fd") or not hasattr(tracker, "_pid"):
        return  # a Python whose tracker is built differently: leave it to exit with us
    gc.collect()  # semaphores of the stopped pools held in reference cycles are unlinked now, not reported as leaked
    with lock:
        fd, pid = tracker._fd, tracker._pid
        if fd is None or pid is None:
            return
        tracker._fd = tracker._pid = None
        os.close(fd)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                return
        except ChildProcessError:
            return
        time.sleep(0.02)


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


class RunsInThreads(Protocol):
    """A model in memory with the threads that run it (e.g. from :func:`background_threads`)."""

    @property
    def threads(self) -> Executor: ...


Model = TypeVar("Model", bound=RunsInThreads)


class InProcessModel(Generic[Model]):
    """One adapter's model, run in this process: loaded once and shared with every provider that
    names the same model and settings (``key`` in ``shared``), when the worker starts
    (:meth:`load`, from the adapter's ``load``) or else at first use; each call runs in the
    model's own threads, off the event loop, and is told to stop when nobody waits any more.

    ``create`` builds the model; an exception of a type in ``load_errors`` while it does is a
    configuration error on the provider option ``option`` ("cannot load ``what``: ...")."""

    def __init__(
        self,
        shared: SharedModels[Model],
        key: Hashable,
        create: Callable[[], Model],
        *,
        option: str,
        what: str,
        load_errors: tuple[type[Exception], ...] = (Exception,),
    ) -> None:
        self.shared, self.key, self.option, self.what = shared, key, option, what
        self._create, self._load_errors = create, load_errors
        self.loaded: Model | None = None
        """The model once loaded (shared: every provider on the same key holds the same object)."""

    def load(self) -> Model:
        """Load the model, or take the copy another provider loaded. Blocks: call it from a thread."""
        if self.loaded is None:
            try:
                self.loaded = self.shared.get(self.key, self._create)
            except self._load_errors as exc:
                raise AdapterConfigError(self.option, f"cannot load {self.what}: {exc}") from None
        return self.loaded

    async def run(self, work: Callable[[Model, threading.Event], Answer]) -> Answer:
        """``work(model, stop)`` in the model's threads. ``stop`` is set when the caller stops
        waiting (a timeout, a shutdown): ``work`` checks it at each step (token, segment) and
        ends early, so an abandoned call does not hold a thread to the end."""
        model = self.loaded if self.loaded is not None else await asyncio.to_thread(self.load)
        stop = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(model.threads, work, model, stop)
        finally:
            stop.set()
