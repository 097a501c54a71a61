"""ChunkScheduler: per-stream order, parallel workers, batching of queued chunks, failures."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from twopass_asr.serving.chunk_scheduler import ChunkScheduler


class Stream:
    def __init__(self, name: str):
        self.name = name


class Answers:
    def __init__(self):
        self.received: list[tuple[str, object, BaseException | None]] = []
        self.all_done = threading.Event()
        self.expected = 0
        self._lock = threading.Lock()

    def expect(self, count: int) -> None:
        self.expected += count

    def done_for(self, tag: str):
        def done(result, error):
            with self._lock:
                self.received.append((tag, result, error))
                if len(self.received) == self.expected:
                    self.all_done.set()
        return done

    def wait(self) -> None:
        assert self.all_done.wait(10), f"only {len(self.received)} of {self.expected} answers arrived"


class PassBlockedOn:
    """run_batch that records each pass and holds the pass over exactly `payloads` until
    `release` is set."""

    def __init__(self, payloads: list):
        self.blocked = payloads
        self.release = threading.Event()
        self.batches: list[list] = []

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        if payloads == self.blocked:
            assert self.release.wait(5)
        return payloads


def test_chunks_of_a_stream_run_in_order_and_never_together():
    batches = []
    lock = threading.Lock()

    def run_batch(payloads):
        with lock:
            batches.append(list(payloads))
        return [f"out-{p}" for p in payloads]

    answers = Answers()
    scheduler = ChunkScheduler(run_batch, workers=2, max_batch=16)
    streams = [Stream(f"s{i}") for i in range(4)]
    answers.expect(4 * 6)
    for k in range(6):
        for stream in streams:
            scheduler.submit(stream, (stream.name, k), answers.done_for(f"{stream.name}/{k}"))
    answers.wait()
    scheduler.close()

    for batch in batches:
        assert len({name for name, _ in batch}) == len(batch), f"two chunks of one stream in {batch}"
    for stream in streams:
        order = [k for batch in batches for name, k in batch if name == stream.name]
        assert order == list(range(6))
        tags = [tag for tag, _, _ in answers.received if tag.startswith(stream.name + "/")]
        assert tags == [f"{stream.name}/{k}" for k in range(6)], "answers keep each stream's order"
    assert all(error is None for _, _, error in answers.received)
    assert {(tag, result) for tag, result, _ in answers.received} == {
        (f"{s.name}/{k}", f"out-{(s.name, k)}") for s in streams for k in range(6)}


def test_two_workers_run_two_streams_at_the_same_time():
    both_running = threading.Barrier(2, timeout=5)

    def run_batch(payloads):
        both_running.wait()  # breaks (and fails the chunks) unless a second pass runs meanwhile
        return payloads

    answers = Answers()
    answers.expect(2)
    scheduler = ChunkScheduler(run_batch, workers=2, max_batch=16)
    scheduler.submit(Stream("a"), "a", answers.done_for("a"))
    while scheduler.queued():  # a worker has taken it; a second one must take the next
        pass
    scheduler.submit(Stream("b"), "b", answers.done_for("b"))
    answers.wait()
    scheduler.close()
    assert sorted((tag, result, error) for tag, result, error in answers.received) == [("a", "a", None),
                                                                                       ("b", "b", None)]


def test_chunks_queued_while_the_worker_is_busy_go_in_one_pass_up_to_max_batch():
    run_batch = PassBlockedOn(["first"])
    answers = Answers()
    answers.expect(6)
    scheduler = ChunkScheduler(run_batch, workers=1, max_batch=3)
    scheduler.submit(Stream("busy"), "first", answers.done_for("first"))
    while scheduler.queued():  # the worker has taken it
        pass
    for i in range(5):
        scheduler.submit(Stream(f"q{i}"), f"q{i}", answers.done_for(f"q{i}"))
    run_batch.release.set()
    answers.wait()
    scheduler.close()
    assert run_batch.batches == [["first"], ["q0", "q1", "q2"], ["q3", "q4"]]


def test_a_failed_pass_fails_that_streams_queued_and_later_chunks_only():
    release = threading.Event()

    def run_batch(payloads):
        if "bad-0" in payloads:
            assert release.wait(5)
            raise RuntimeError("boom")
        return payloads

    answers = Answers()
    bad, good = Stream("bad"), Stream("good")
    scheduler = ChunkScheduler(run_batch, workers=1, max_batch=1)
    answers.expect(5)
    scheduler.submit(bad, "bad-0", answers.done_for("bad-0"))
    while scheduler.queued():
        pass
    scheduler.submit(bad, "bad-1", answers.done_for("bad-1"))
    scheduler.submit(good, "good-0", answers.done_for("good-0"))
    release.set()
    while len(answers.received) < 3:
        pass
    scheduler.submit(bad, "bad-2", answers.done_for("bad-2"))
    scheduler.submit(good, "good-1", answers.done_for("good-1"))
    answers.wait()
    scheduler.close()

    outcome = {tag: (result, None if error is None else str(error)) for tag, result, error in answers.received}
    assert outcome == {"bad-0": (None, "boom"), "bad-1": (None, "boom"), "bad-2": (None, "boom"),
                       "good-0": ("good-0", None), "good-1": ("good-1", None)}


def test_close_runs_what_is_queued_and_then_refuses():
    answers = Answers()
    answers.expect(3)
    scheduler = ChunkScheduler(lambda payloads: payloads, workers=1, max_batch=1)
    stream = Stream("s")
    for k in range(3):
        scheduler.submit(stream, k, answers.done_for(str(k)))
    scheduler.close()
    answers.wait()
    assert [result for _, result, _ in answers.received] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(stream, 3, answers.done_for("3"))


def test_a_wrong_number_of_results_is_an_error_for_every_chunk():
    answers = Answers()
    answers.expect(1)
    scheduler = ChunkScheduler(lambda payloads: [], workers=1, max_batch=4)
    scheduler.submit(Stream("s"), 0, answers.done_for("s"))
    answers.wait()
    scheduler.close()
    [(_, result, error)] = answers.received
    assert result is None and "0 results for 1 chunks" in str(error)


@dataclass
class TensorState:
    """Like the engines' stream states: a dataclass whose == compares arrays (and so cannot
    be used as a truth value)."""
    cache: np.ndarray = field(default_factory=lambda: np.zeros(3))


def test_a_chunk_is_taken_past_a_busy_streams_queued_chunk_with_array_states():
    run_batch = PassBlockedOn(["a0"])
    answers = Answers()
    answers.expect(3)
    scheduler = ChunkScheduler(run_batch, workers=2, max_batch=4)
    a, b = TensorState(), TensorState()
    scheduler.submit(a, "a0", answers.done_for("a0"))
    while scheduler.queued():
        pass
    scheduler.submit(a, "a1", answers.done_for("a1"))  # waits: stream a is in a pass
    scheduler.submit(b, "b0", answers.done_for("b0"))  # the idle worker takes it past a1
    while len(answers.received) < 1:
        pass
    run_batch.release.set()
    answers.wait()
    scheduler.close()
    assert run_batch.batches == [["a0"], ["b0"], ["a1"]]
    assert [tag for tag, _, _ in answers.received] == ["b0", "a0", "a1"]
