"""Batching of the second pass's torch work across segments that wait at the same time.

Segments of different streams reach the model independently. Running the audio encoder
(or, on the torch fallback, the LLM's generation) one segment at a time reads the
weights once per segment; the batcher lets the first segment wait a short window for
company, then runs one pass over everything queued by then (up to `max_batch`).
Segments that arrive while a pass runs are queued and go together into the next one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import Executor
from typing import Callable, Generic, Mapping, Sequence, TypeVar

from twopass_asr.parameters import whole_number

Request = TypeVar("Request")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")

DEFAULT_WINDOW_MS = 10.0
DEFAULT_MAX_BATCH = 16


def settings_from_parameters(params: Mapping[str, str], prefix: str) -> dict:
    """window_ms and max_batch from the model parameters `<prefix>_batch_window_ms` and
    `<prefix>_max_batch` (empty = the defaults)."""
    window_name, size_name = f"{prefix}_batch_window_ms", f"{prefix}_max_batch"
    window, size = params.get(window_name) or "", params.get(size_name) or ""
    try:
        window_ms = float(window) if window else DEFAULT_WINDOW_MS
        valid = window_ms >= 0
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"parameter {window_name} must be a number of milliseconds >= 0, got {window!r}")
    max_batch = whole_number(size, f"parameter {size_name}") if size else DEFAULT_MAX_BATCH
    return {"window_ms": window_ms, "max_batch": max_batch}


class SegmentBatcher(Generic[Request, Prepared, Result]):
    """`await submit(request)` gives `run_batch([prepare(request), ...])`'s entry for the request.

    prepare (default: none) runs per request and may raise for that request alone (bad
    audio); run_batch runs once per batch. Both run on `executor`, off the event loop. A
    failing run_batch fails every request of its batch; the batcher keeps serving the next
    ones. `on_pass(size)` is called on the event loop after each pass (metrics)."""

    def __init__(self, run_batch: Callable[[Sequence[Prepared]], list[Result]], executor: Executor,
                 prepare: Callable[[Request], Prepared] | None = None, window_ms: float = DEFAULT_WINDOW_MS,
                 max_batch: int = DEFAULT_MAX_BATCH, on_pass: Callable[[int], None] | None = None):
        if window_ms < 0:
            raise ValueError(f"the batch window must be >= 0 ms, got {window_ms}")
        if max_batch < 1:
            raise ValueError(f"the batch size must be >= 1, got {max_batch}")
        self._prepare = prepare
        self._run_batch = run_batch
        self._executor = executor
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self.batch_sizes: Counter[int] = Counter()  # passes by batch size
        self._on_pass = on_pass
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, request: Request) -> Result:
        loop = asyncio.get_running_loop()
        # One worker per event loop (a loop that has gone took its worker with it).
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._queue.put_nowait((loop.time(), request, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrived, request, future = await self._queue.get()
            waiting = [(request, future)]
            await asyncio.sleep(max(0.0, arrived + self.window_s - loop.time()))
            while len(waiting) < self.max_batch and not self._queue.empty():
                _, request, future = self._queue.get_nowait()
                waiting.append((request, future))
            # Requests whose caller has gone (cancelled) are not run.
            waiting = [(request, future) for request, future in waiting if not future.done()]
            if not waiting:
                continue
            try:
                results, batched = await loop.run_in_executor(self._executor, self._run, [r for r, _ in waiting])
            except Exception as exc:  # the executor itself failed (shut down): nobody may wait forever
                results, batched = [exc] * len(waiting), 0
            for (_, future), result in zip(waiting, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if batched:
                self.batch_sizes[batched] += 1
                if self._on_pass is not None:
                    self._on_pass(batched)

    def _run(self, requests: list[Request]) -> tuple[list[Result | Exception], int]:
        """Every request's result or exception, and how many went through run_batch."""
        outcomes: list[Prepared | Exception] = []
        for request in requests:
            try:
                outcomes.append(request if self._prepare is None else self._prepare(request))
            except Exception as exc:  # this request's own fault (bad audio): only it fails
                outcomes.append(exc)
        ready = [index for index, outcome in enumerate(outcomes) if not isinstance(outcome, Exception)]
        if ready:
            try:
                results = self._run_batch([outcomes[index] for index in ready])
            except Exception as exc:
                results = [exc] * len(ready)
            for index, result in zip(ready, results):
                outcomes[index] = result
        return outcomes, len(ready)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_WINDOW_MS", "SegmentBatcher", "settings_from_parameters"]
