"""Batching of the second pass's audio encoder across segments that wait at the same time.

Segments of different streams reach the model independently. Encoding them one by one
reads the encoder's weights once per segment; the batcher lets the first segment wait a
short window for company, then runs one encoder + adaptor pass over everything queued
by then (up to `max_batch`). Segments that arrive while a pass runs are queued and go
together into the next one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import Executor
from typing import Callable, Generic, Mapping, Sequence, TypeVar

Request = TypeVar("Request")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")

DEFAULT_WINDOW_MS = 10.0
DEFAULT_MAX_BATCH = 16


def settings_from_parameters(params: Mapping[str, str]) -> dict:
    """window_ms and max_batch from the model parameters `embed_batch_window_ms` and
    `embed_max_batch` (empty = the defaults)."""
    names = {"window_ms": ("embed_batch_window_ms", float, "a number of milliseconds", DEFAULT_WINDOW_MS),
             "max_batch": ("embed_max_batch", int, "a whole number", DEFAULT_MAX_BATCH)}
    settings = {}
    for key, (name, kind, expected, default) in names.items():
        value = params.get(name) or ""
        try:
            settings[key] = kind(value) if value else default
        except ValueError:
            raise ValueError(f"parameter {name} must be {expected}, got {value!r}") from None
    return settings


class EmbeddingBatcher(Generic[Request, Prepared, Result]):
    """`await embed(request)` gives `encode([prepare(request), ...])`'s entry for the request.

    prepare runs per request and may raise for that request alone (bad audio); encode runs
    once per batch. Both run on `executor`, off the event loop. A failing encode fails
    every request of its batch; the batcher keeps serving the next ones. `on_pass(size)` is
    called on the event loop after each encode pass (metrics)."""

    def __init__(self, prepare: Callable[[Request], Prepared], encode: Callable[[Sequence[Prepared]], list[Result]],
                 executor: Executor, window_ms: float = DEFAULT_WINDOW_MS, max_batch: int = DEFAULT_MAX_BATCH,
                 on_pass: Callable[[int], None] | None = None):
        if window_ms < 0:
            raise ValueError(f"the embedding batch window must be >= 0 ms, got {window_ms}")
        if max_batch < 1:
            raise ValueError(f"the embedding batch size must be >= 1, got {max_batch}")
        self._prepare = prepare
        self._encode = encode
        self._executor = executor
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self.batch_sizes: Counter[int] = Counter()  # encode passes by batch size
        self._on_pass = on_pass
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def embed(self, request: Request) -> Result:
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
            # Requests whose caller has gone (cancelled) are not encoded.
            waiting = [(request, future) for request, future in waiting if not future.done()]
            if not waiting:
                continue
            try:
                results, encoded = await loop.run_in_executor(self._executor, self._run, [r for r, _ in waiting])
            except Exception as exc:  # the executor itself failed (shut down): nobody may wait forever
                results, encoded = [exc] * len(waiting), 0
            for (_, future), result in zip(waiting, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if encoded:
                self.batch_sizes[encoded] += 1
                if self._on_pass is not None:
                    self._on_pass(encoded)

    def _run(self, requests: list[Request]) -> tuple[list[Result | Exception], int]:
        """Every request's result or exception, and how many went through the encoder."""
        outcomes: list[Prepared | Exception] = []
        for request in requests:
            try:
                outcomes.append(self._prepare(request))
            except Exception as exc:  # this request's own fault (bad audio): only it fails
                outcomes.append(exc)
        ready = [index for index, outcome in enumerate(outcomes) if not isinstance(outcome, Exception)]
        if ready:
            try:
                encoded = self._encode([outcomes[index] for index in ready])
            except Exception as exc:
                encoded = [exc] * len(ready)
            for index, result in zip(ready, encoded):
                outcomes[index] = result
        return outcomes, len(ready)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_WINDOW_MS", "EmbeddingBatcher", "settings_from_parameters"]
