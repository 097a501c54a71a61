"""Second-pass results of one stream: computed concurrently, delivered in segment order."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class OrderedDelivery:
    """Each submitted job runs at once as its own task; its result is emitted only after
    every earlier job's result was. A failing job stops delivery and is reported through
    `on_failure` (later results are never emitted out of order)."""

    def __init__(self, emit: Callable[[Any], Awaitable[None]], on_failure: Callable[[BaseException], None]):
        self._emit = emit
        self._on_failure = on_failure
        self._queue: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()
        self._jobs: set[asyncio.Task] = set()
        self._deliverer = asyncio.create_task(self._deliver())
        self._deliverer.add_done_callback(self._report_failure)

    def submit(self, job: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        self._queue.put_nowait(task)

    async def drain(self) -> None:
        """Wait until every submitted result was emitted; re-raises a job's failure."""
        self._queue.put_nowait(None)
        await asyncio.shield(self._deliverer)

    def cancel(self) -> None:
        """Stop delivering and cancel unfinished jobs (their inference requests too)."""
        self._deliverer.cancel()
        for task in list(self._jobs):
            task.cancel()

    async def _deliver(self) -> None:
        while (task := await self._queue.get()) is not None:
            await self._emit(await task)

    def _report_failure(self, deliverer: asyncio.Task) -> None:
        if not deliverer.cancelled() and deliverer.exception() is not None:
            for task in list(self._jobs):
                task.cancel()
            self._on_failure(deliverer.exception())
