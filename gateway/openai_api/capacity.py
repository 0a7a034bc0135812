"""The model slots a request of the OpenAI-compatible API holds while it runs.

With a worker in this process, a request takes one of the worker's ``workers.concurrency``
slots (:meth:`gateway.worker.Worker.model_slot`): queued jobs and synchronous requests share
one limit, and the dispatch loop claims queued jobs into the slots left. Without one
(``gateway serve --no-worker``, where queued jobs run in ``gateway worker`` processes), this
process's synchronous requests get a limit of their own, also ``workers.concurrency``.
Either way a request that finds no slot within its wait answers 503 (clients retry it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.worker import Worker


class ModelSlots:
    def __init__(self, worker: Worker | None, concurrency: int) -> None:
        self.worker = worker
        self.concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency) if worker is None else None

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float) -> AsyncIterator[bool]:
        """Hold a slot for the ``async with`` block; yields False when none freed up within ``timeout`` seconds."""
        if self.worker is not None:
            async with self.worker.model_slot(timeout) as held:
                yield held
            return
        assert self._semaphore is not None
        try:
            await asyncio.wait_for(self._semaphore.acquire(), max(0.0, timeout))
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            self._semaphore.release()
