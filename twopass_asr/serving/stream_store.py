"""Per-stream state held by a sequence-batched model, keyed by Triton's CORRID.

Triton does not tell a Python model when it drops an idle sequence, so idle states are
reclaimed here by age; the number of live streams is bounded so memory is too. Thread-safe:
a decoupled model ends streams from its worker threads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

State = TypeVar("State")


class StreamError(Exception):
    """A request that cannot be served; the message is returned to the client."""


@dataclass
class _Entry(Generic[State]):
    state: State
    last_used: float = field(default_factory=time.monotonic)


class StreamStore(Generic[State]):
    def __init__(self, max_streams: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_streams = max_streams
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._entries: dict[int, _Entry[State]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, corrid: int) -> bool:
        return corrid in self._entries

    def start(self, corrid: int, factory: Callable[[], State]) -> State:
        """Begin a stream; a START for a live CORRID restarts it from scratch."""
        self.reap_idle()
        with self._lock:
            if corrid not in self._entries and len(self._entries) >= self.max_streams:
                raise StreamError(
                    f"too many active streams ({self.max_streams}); end some streams or raise max_streams"
                )
        entry = _Entry(factory(), self._clock())
        with self._lock:
            self._entries[corrid] = entry
        return entry.state

    def get(self, corrid: int) -> State:
        with self._lock:
            entry = self._entries.get(corrid)
        if entry is None:
            raise StreamError(
                f"unknown stream {corrid}: no START was received for it, or it was idle longer "
                f"than {self.idle_timeout_s:.0f} s and was freed"
            )
        entry.last_used = self._clock()
        return entry.state

    def end(self, corrid: int, state: State | None = None) -> None:
        """Forget a stream; with `state`, only if the CORRID still holds that state (it may
        have been restarted since)."""
        with self._lock:
            entry = self._entries.get(corrid)
            if entry is not None and (state is None or entry.state is state):
                del self._entries[corrid]

    def reap_idle(self) -> list[int]:
        now = self._clock()
        with self._lock:
            expired = [c for c, e in self._entries.items() if now - e.last_used > self.idle_timeout_s]
            for corrid in expired:
                del self._entries[corrid]
        return expired
