"""SegmentBatcher on its own: which requests share a pass, and how failures and cancelled
callers are kept apart (plain functions stand in for the encoder)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from twopass_asr.second_pass.batcher import (
    DEFAULT_MAX_BATCH,
    DEFAULT_WINDOW_MS,
    PassWorker,
    SegmentBatcher,
    settings_from_parameters,
)


class Recorder:
    """prepare = check and tag; encode = one list of results per pass, recorded."""

    def __init__(self, encode_s: float = 0.0):
        self.encode_s = encode_s
        self.passes: list[list[str]] = []
        self.fail_next_pass = False

    def prepare(self, request: str) -> str:
        if request.startswith("bad"):
            raise ValueError(f"cannot take {request}")
        return f"prepared {request}"

    def encode(self, prepared: list[str]) -> list[str]:
        self.passes.append(list(prepared))
        time.sleep(self.encode_s)
        if self.fail_next_pass:
            self.fail_next_pass = False
            raise RuntimeError("encoder blew up")
        return [item.replace("prepared", "encoded") for item in prepared]


@pytest.fixture
def worker():
    pass_worker = PassWorker(thread_name_prefix="test")
    yield pass_worker
    pass_worker.shutdown()


def batcher_for(recorder, worker, **settings):
    return SegmentBatcher(recorder.encode, worker, prepare=recorder.prepare, **settings)


def test_requests_waiting_together_share_one_pass(worker):
    recorder = Recorder()
    reported = []
    batcher = batcher_for(recorder, worker, window_ms=50, on_pass=reported.append)

    async def main():
        return await asyncio.gather(*(batcher.submit(name) for name in "abcd"))

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abcd"]
    assert recorder.passes == [[f"prepared {name}" for name in "abcd"]]
    assert batcher.batch_sizes == {4: 1}
    assert [report.size for report in reported] == [4]


def test_a_pass_reports_the_time_its_segments_waited_and_ran(worker):
    """One worker shared by two batchers, as in the model: a segment of the second one waits
    for the first one's pass on top of its own window."""
    slow, quick = Recorder(encode_s=0.3), Recorder(encode_s=0.05)
    slow_reports, quick_reports = [], []
    slow_batcher = batcher_for(slow, worker, window_ms=0, on_pass=slow_reports.append)
    quick_batcher = batcher_for(quick, worker, window_ms=20, on_pass=quick_reports.append)

    async def main():
        first = asyncio.ensure_future(slow_batcher.submit("a"))
        await asyncio.sleep(0.1)  # "a" holds the worker for 0.2 s more
        await asyncio.gather(first, *(quick_batcher.submit(name) for name in "bc"))

    asyncio.run(main())
    (slow_report,), (quick_report,) = slow_reports, quick_reports
    assert slow_report.size == 1 and quick_report.size == 2
    assert 0.3 <= slow_report.busy_s < 0.6 and slow_report.waited_s < 0.1
    assert 0.05 <= quick_report.busy_s < 0.3
    # Each of the two waited from its submit until "a"'s pass was over.
    assert 2 * 0.15 <= quick_report.waited_s < 2 * 0.5


class Stage(Recorder):
    """A Recorder that also notes, in a log shared by the stages, which segments each pass ran."""

    def __init__(self, name: str, encode_s: float, log: list):
        super().__init__(encode_s)
        self.name, self.log = name, log

    def encode(self, prepared: list[str]) -> list[str]:
        self.log.append((self.name, [item.split()[-1] for item in prepared]))
        return super().encode(prepared)


def two_segments_through_two_stages(worker, generation_priority: int) -> list:
    """As the model at two streams: x is encoded (0.2 s), then generated; y arrives while x's
    encoding runs. Returns the passes in the order they ran."""
    log = []
    encode = batcher_for(Stage("encode", 0.2, log), worker, window_ms=0)
    generate = batcher_for(Stage("generate", 0.05, log), worker, window_ms=0, priority=generation_priority)

    async def both_passes(name):
        return await generate.submit(await encode.submit(name))

    async def main():
        x = asyncio.ensure_future(both_passes("x"))
        await asyncio.sleep(0.1)  # x's encoder pass runs
        return await asyncio.gather(x, both_passes("y"))

    assert asyncio.run(main()) == ["encoded encoded x", "encoded encoded y"]
    return log


def test_segments_reaching_a_batcher_while_the_shared_worker_is_busy_join_its_waiting_pass(worker):
    """Two stages of one priority: x's generation waits while y's encoder pass holds the
    worker; y's generation, which arrives only as that pass ends, still shares x's pass."""
    assert two_segments_through_two_stages(worker, generation_priority=0) == [
        ("encode", ["x"]), ("encode", ["y"]), ("generate", ["x", "y"])]


def test_a_later_stage_goes_first_when_both_wait(worker):
    """As the model ranks generation over encoding: when x's encoding ends with y's waiting,
    x's generation runs first, and x is done before y's encoding starts."""
    assert two_segments_through_two_stages(worker, generation_priority=1) == [
        ("encode", ["x"]), ("generate", ["x"]), ("encode", ["y"]), ("generate", ["y"])]


def test_max_batch_splits_the_queue(worker):
    recorder = Recorder()
    batcher = batcher_for(recorder, worker, window_ms=20, max_batch=2)

    async def main():
        return await asyncio.gather(*(batcher.submit(name) for name in "abcde"))

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abcde"]
    assert [len(batch) for batch in recorder.passes] == [2, 2, 1]


def test_arrivals_during_a_pass_go_together_into_the_next(worker):
    recorder = Recorder(encode_s=0.3)
    batcher = batcher_for(recorder, worker, window_ms=0)

    async def main():
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.1)  # "a" is being encoded now
        later = [asyncio.ensure_future(batcher.submit(name)) for name in "bcd"]
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abcd"]
    assert [len(batch) for batch in recorder.passes] == [1, 3]


def test_without_a_window_one_at_a_time_stays_one_at_a_time(worker):
    recorder = Recorder()
    batcher = batcher_for(recorder, worker, window_ms=0)

    async def main():
        return [await batcher.submit(name) for name in "abc"]

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abc"]
    assert batcher.batch_sizes == {1: 3}


def test_a_bad_request_fails_alone(worker):
    recorder = Recorder()
    batcher = batcher_for(recorder, worker, window_ms=50)

    async def main():
        return await asyncio.gather(batcher.submit("a"), batcher.submit("bad1"), batcher.submit("c"),
                                    return_exceptions=True)

    good_a, bad, good_c = asyncio.run(main())
    assert (good_a, good_c) == ("encoded a", "encoded c")
    assert isinstance(bad, ValueError) and "cannot take bad1" in str(bad)
    assert recorder.passes == [["prepared a", "prepared c"]]


def test_a_failed_pass_fails_its_batch_and_the_next_pass_works(worker):
    recorder = Recorder()
    recorder.fail_next_pass = True
    batcher = batcher_for(recorder, worker, window_ms=20)

    async def main():
        failed = await asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
        return failed, await batcher.submit("c")

    failed, later = asyncio.run(main())
    assert all(isinstance(result, RuntimeError) for result in failed)
    assert later == "encoded c"


def test_a_cancelled_caller_is_not_encoded(worker):
    recorder = Recorder()
    batcher = batcher_for(recorder, worker, window_ms=100)

    async def main():
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0.02)
        gone.cancel()
        return await kept

    assert asyncio.run(main()) == "encoded kept"
    assert recorder.passes == [["prepared kept"]]


def test_a_shut_down_worker_fails_the_callers_instead_of_hanging():
    recorder = Recorder()
    worker = PassWorker(thread_name_prefix="test")
    worker.shutdown()
    batcher = batcher_for(recorder, worker, window_ms=0)

    async def main():
        return await asyncio.wait_for(batcher.submit("a"), timeout=5)

    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(main())


def test_each_event_loop_gets_its_own_worker(worker):
    recorder = Recorder()
    batcher = batcher_for(recorder, worker, window_ms=0)
    assert asyncio.run(batcher.submit("a")) == "encoded a"
    # The first loop is closed; a new one must still be served.
    assert asyncio.run(batcher.submit("b")) == "encoded b"


def test_encoding_runs_off_the_event_loop(worker):
    threads = []

    def encode(prepared):
        threads.append(threading.current_thread())
        return prepared

    batcher = SegmentBatcher(encode, worker, window_ms=0)
    assert asyncio.run(batcher.submit("a")) == "a"
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.parametrize("settings, message", [({"window_ms": -1}, "batch window"), ({"max_batch": 0}, "batch size")])
def test_bad_settings_are_named(worker, settings, message):
    with pytest.raises(ValueError, match=message):
        batcher_for(Recorder(), worker, **settings)


def test_a_batcher_without_prepare_runs_the_requests_themselves(worker):
    passes = []

    def run_batch(requests):
        passes.append(list(requests))
        return [request.upper() for request in requests]

    batcher = SegmentBatcher(run_batch, worker, window_ms=50)

    async def main():
        return await asyncio.gather(*(batcher.submit(name) for name in "ab"))

    assert asyncio.run(main()) == ["A", "B"]
    assert passes == [["a", "b"]]


@pytest.mark.parametrize("prefix", ["embed", "torch"])
def test_settings_come_from_the_model_parameters(prefix):
    window, size = f"{prefix}_batch_window_ms", f"{prefix}_max_batch"
    defaults = {"window_ms": DEFAULT_WINDOW_MS, "max_batch": DEFAULT_MAX_BATCH}
    assert settings_from_parameters({}, prefix) == defaults
    assert settings_from_parameters({window: "", size: ""}, prefix) == defaults
    assert settings_from_parameters({window: "2.5", size: "4"}, prefix) == {"window_ms": 2.5, "max_batch": 4}
    assert settings_from_parameters({window: "0", size: "1"}, prefix) == {"window_ms": 0, "max_batch": 1}
    for bad in ("2.5", "0", "-3"):
        with pytest.raises(ValueError, match=f"{size} must be a whole number >= 1, got '{bad}'"):
            settings_from_parameters({size: bad}, prefix)
    for bad in ("soon", "-1"):
        with pytest.raises(ValueError, match=f"{window} must be a number of milliseconds >= 0, got '{bad}'"):
            settings_from_parameters({window: bad}, prefix)
