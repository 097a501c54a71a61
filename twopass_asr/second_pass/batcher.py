"""Batching of the second pass's torch work across segments that wait at the same time.

Segments of different streams reach the model independently. Running the audio encoder
(or, on the torch fallback, the LLM's generation) one segment at a time reads the
weights once per segment; the batcher lets the first segment wait a short window for
company, then runs one pass over everything queued by the time the worker is free for it
(up to `max_batch`). Segments that arrive while a pass runs, of this batcher or another one
sharing the worker, are queued and go together into the next one. Between batchers sharing
a worker, the later stage goes first.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PassReport:
    """One pass: how many requests went through run_batch, the seconds they had waited
    from submit to the pass's start (summed over them: the batching window, and the shared
    worker busy with other passes), and the seconds the pass ran (prepare included)."""

    size: int
    waited_s: float
    busy_s: float


class PassWorker:
    """One thread that runs the passes of one or more batchers, one pass at a time (the
    model's torch work uses every core already: more threads would only contend).

    Whenever it is free, the worker picks the next pass: that of the batcher with the highest
    priority among those with requests waiting (a later stage first: it finishes segments
    already started), the oldest request first between equals; it then takes that batcher's
    batch. So segments that reach a batcher while another pass runs join its next pass. A
    batch is only waited for (the batcher's window) when its oldest request has not waited
    that long yet."""

    def __init__(self, thread_name_prefix: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._batchers: list[SegmentBatcher] = []
        self._arrival: asyncio.Event | None = None
        self._server: asyncio.Task | None = None

    def attach(self, batcher: SegmentBatcher) -> None:
        self._batchers.append(batcher)

    def serve(self) -> None:
        """Makes sure the running event loop has the task that runs the passes, and wakes it
        (a batcher calls this for each request it queues)."""
        loop = asyncio.get_running_loop()
        # One server task per event loop: a loop that has gone took its task and its
        # batchers' requests with it.
        if self._server is None or self._server.done() or self._server.get_loop() is not loop:
            for batcher in self._batchers:
                batcher.forget_pending()
            self._arrival = asyncio.Event()
            self._server = loop.create_task(self._serve())
        self._arrival.set()

    def _next_pass(self) -> tuple[SegmentBatcher, float] | None:
        """The batcher whose pass comes next, and when its oldest waiting request arrived."""
        waiting = [(batcher, arrived) for batcher in self._batchers
                   if (arrived := batcher.oldest_arrival()) is not None]
        return max(waiting, key=lambda pair: (pair[0].priority, -pair[1]), default=None)

    async def _serve(self) -> None:
        while True:
            chosen = self._next_pass()
            if chosen is None:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            batcher, arrived = chosen
            window_left = arrived + batcher.window_s - time.monotonic()
            if window_left > 0:
                await asyncio.sleep(window_left)
                continue  # choose again: others may have come
            await batcher.run_pass()
            # The callers whose results were just set go on first: those that submit to
            # another batcher of this worker are queued there before the next choice.
            await asyncio.sleep(0)

    async def run(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SegmentBatcher(Generic[Request, Prepared, Result]):
    """`await submit(request)` gives `run_batch([prepare(request), ...])`'s entry for the request.

    prepare (default: none) runs per request and may raise for that request alone (bad
    audio); run_batch runs once per batch. Both run on `worker` (PassWorker: when, and
    which batcher first by `priority`), off the event loop. A failing run_batch fails every
    request of its batch; the batcher keeps serving the next ones. `on_pass(PassReport)` is
    called on the event loop after each pass (metrics)."""

    def __init__(self, run_batch: Callable[[Sequence[Prepared]], list[Result]], worker: PassWorker,
                 prepare: Callable[[Request], Prepared] | None = None, window_ms: float = DEFAULT_WINDOW_MS,
                 max_batch: int = DEFAULT_MAX_BATCH, on_pass: Callable[[PassReport], None] | None = None,
                 priority: int = 0):
        if window_ms < 0:
            raise ValueError(f"the batch window must be >= 0 ms, got {window_ms}")
        if max_batch < 1:
            raise ValueError(f"the batch size must be >= 1, got {max_batch}")
        self._prepare = prepare
        self._run_batch = run_batch
        self._worker = worker
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self.priority = priority
        self.batch_sizes: Counter[int] = Counter()  # passes by batch size
        self._on_pass = on_pass
        self._pending: deque[tuple[float, Request, asyncio.Future]] = deque()
        worker.attach(self)

    async def submit(self, request: Request) -> Result:
        self._worker.serve()
        future = asyncio.get_running_loop().create_future()
        self._pending.append((time.monotonic(), request, future))
        return await future

    def forget_pending(self) -> None:
        self._pending.clear()

    def oldest_arrival(self) -> float | None:
        """When the oldest request still waited for arrived (None: none is); requests whose
        caller has gone (cancelled) are dropped here, never run."""
        while self._pending and self._pending[0][2].done():
            self._pending.popleft()
        return self._pending[0][0] if self._pending else None

    def _take_batch(self) -> list[tuple[float, Request, asyncio.Future]]:
        batch = []
        while self._pending and len(batch) < self.max_batch:
            entry = self._pending.popleft()
            if not entry[2].done():
                batch.append(entry)
        return batch

    async def run_pass(self) -> None:
        """One pass over up to max_batch of the oldest requests, on the worker's thread; each
        caller gets its result or exception."""
        batch = self._take_batch()
        try:
            results, report = await self._worker.run(self._run, [(arrived, request) for arrived, request, _ in batch])
        except Exception as exc:  # the worker itself failed (shut down): nobody may wait forever
            results, report = [exc] * len(batch), None
        for (_, _, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if report is not None:
            self.batch_sizes[report.size] += 1
            if self._on_pass is not None:
                self._on_pass(report)

    def _run(self, requests: list[tuple[float, Request]]) -> tuple[list[Result | Exception], PassReport | None]:
        """Every request's result or exception, and the report of the pass (None when no
        request got as far as run_batch)."""
        started = time.monotonic()
        outcomes: list[Prepared | Exception] = []
        for _, request in requests:
            try:
                outcomes.append(request if self._prepare is None else self._prepare(request))
            except Exception as exc:  # this request's own fault (bad audio): only it fails
                outcomes.append(exc)
        ready = [index for index, outcome in enumerate(outcomes) if not isinstance(outcome, Exception)]
        if not ready:
            return outcomes, None
        try:
            results = self._run_batch([outcomes[index] for index in ready])
        except Exception as exc:
            results = [exc] * len(ready)
        for index, result in zip(ready, results):
            outcomes[index] = result
        waited = sum(started - requests[index][0] for index in ready)
        return outcomes, PassReport(len(ready), waited, time.monotonic() - started)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_WINDOW_MS", "PassReport", "PassWorker", "SegmentBatcher",
           "settings_from_parameters"]
