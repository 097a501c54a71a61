"""Runs the chunks of many streams on a few worker threads of one model instance.

Triton's sequence batcher pins each stream to one model instance, so with one stream per
busy instance a chunk of a second stream on that instance waits a whole forward pass while
the other instance may sit idle. A decoupled model answers later instead: its one instance
hands each chunk to whichever worker is free. A stream's chunks still run one at a time in
arrival order, and the chunks that queued up while every worker was busy go together in
one batched pass (one chunk per stream).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

Done = Callable[[Any, "BaseException | None"], None]


@dataclass(eq=False)  # queued jobs are told apart by identity, never by their streams' contents
class _Job:
    stream: Any  # its chunks run in order, one at a time
    payload: Any
    done: Done


def run_outcomes(run_batch: Callable[[list], list], payloads: list) -> list[tuple[Any, BaseException | None]]:
    """(result, None) per payload, or (None, error) for all of them when the pass fails."""
    try:
        results = run_batch(payloads)
    except Exception as exc:
        return [(None, exc)] * len(payloads)
    if len(results) != len(payloads):
        error = RuntimeError(f"run_batch returned {len(results)} results for {len(payloads)} chunks")
        return [(None, error)] * len(payloads)
    return [(result, None) for result in results]


class ChunkScheduler:
    """`run_batch(payloads) -> results` runs on `workers` threads, each call with at most
    `max_batch` payloads of distinct streams; every submitted job's `done(result, error)`
    is called once, on a worker thread. A stream whose pass failed fails its queued and
    later chunks with the same error instead of running them on a state it lost."""

    def __init__(self, run_batch: Callable[[list], list], workers: int, max_batch: int,
                 on_worker_start: Callable[[], None] | None = None, name: str = "chunks"):
        if workers < 1 or max_batch < 1:
            raise ValueError(f"workers and max_batch must be >= 1, got {workers} and {max_batch}")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._on_worker_start = on_worker_start
        self._pending: deque[_Job] = deque()
        self._busy: set[int] = set()  # id() of the streams in a running pass
        # id -> (weak reference to the stream, its error): a reused id is never mistaken.
        self._failed: dict[int, tuple[weakref.ref, BaseException]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, stream: Any, payload: Any, done: Done) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            error = self._error_of(stream)
            if error is None:
                self._pending.append(_Job(stream, payload, done))
                self._cond.notify()
        if error is not None:
            done(None, error)

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        """Run what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _error_of(self, stream: Any) -> BaseException | None:
        entry = self._failed.get(id(stream))
        return entry[1] if entry is not None and entry[0]() is stream else None

    def _remember_failure(self, stream: Any, error: BaseException) -> None:
        for key in [k for k, (ref, _) in self._failed.items() if ref() is None]:
            del self._failed[key]  # streams that are gone
        self._failed[id(stream)] = (weakref.ref(stream), error)

    def _take(self) -> list[_Job]:
        """The oldest chunk of each stream that is not in a running pass, oldest first."""
        taken, seen = [], set()
        for job in self._pending:
            key = id(job.stream)
            if key not in seen and key not in self._busy:
                taken.append(job)
                if len(taken) == self._max_batch:
                    break
            seen.add(key)
        for job in taken:
            self._pending.remove(job)
            self._busy.add(id(job.stream))
        return taken

    def _work(self) -> None:
        if self._on_worker_start is not None:
            self._on_worker_start()
        while True:
            with self._cond:
                while not (jobs := self._take()):
                    if self._closed and not self._pending:
                        return
                    self._cond.wait()
            outcomes = run_outcomes(self._run_batch, [job.payload for job in jobs])
            # Answered before the stream is free again, so its answers keep their order.
            self._answer(zip(jobs, outcomes))
            with self._cond:
                for job, (_, error) in zip(jobs, outcomes):
                    self._busy.discard(id(job.stream))
                    if error is not None:
                        self._remember_failure(job.stream, error)
                dropped = [(job, (None, error)) for job in self._pending
                           if (error := self._error_of(job.stream)) is not None]
                for job, _ in dropped:
                    self._pending.remove(job)
                self._cond.notify_all()
            self._answer(dropped)

    @staticmethod
    def _answer(answers) -> None:
        for job, (result, error) in answers:
            try:
                job.done(result, error)
            except Exception:  # a failed answer must not stop the worker
                log.exception("answering a chunk failed")
