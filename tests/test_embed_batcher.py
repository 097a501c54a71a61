"""EmbeddingBatcher on its own: which requests share an encode pass, and how failures and
cancelled callers are kept apart (plain functions stand in for the encoder)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from twopass_asr.nano.embed_batcher import (
    DEFAULT_MAX_BATCH,
    DEFAULT_WINDOW_MS,
    EmbeddingBatcher,
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
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def batcher_for(recorder, executor, **settings):
    return EmbeddingBatcher(recorder.prepare, recorder.encode, executor, **settings)


def test_requests_waiting_together_share_one_pass(executor):
    recorder = Recorder()
    reported = []
    batcher = batcher_for(recorder, executor, window_ms=50, on_pass=reported.append)

    async def main():
        return await asyncio.gather(*(batcher.embed(name) for name in "abcd"))

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abcd"]
    assert recorder.passes == [[f"prepared {name}" for name in "abcd"]]
    assert batcher.batch_sizes == {4: 1}
    assert reported == [4]


def test_max_batch_splits_the_queue(executor):
    recorder = Recorder()
    batcher = batcher_for(recorder, executor, window_ms=20, max_batch=2)

    async def main():
        return await asyncio.gather(*(batcher.embed(name) for name in "abcde"))

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abcde"]
    assert [len(batch) for batch in recorder.passes] == [2, 2, 1]


def test_arrivals_during_a_pass_go_together_into_the_next(executor):
    recorder = Recorder(encode_s=0.3)
    batcher = batcher_for(recorder, executor, window_ms=0)

    async def main():
        first = asyncio.ensure_future(batcher.embed("a"))
        await asyncio.sleep(0.1)  # "a" is being encoded now
        later = [asyncio.ensure_future(batcher.embed(name)) for name in "bcd"]
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abcd"]
    assert [len(batch) for batch in recorder.passes] == [1, 3]


def test_without_a_window_one_at_a_time_stays_one_at_a_time(executor):
    recorder = Recorder()
    batcher = batcher_for(recorder, executor, window_ms=0)

    async def main():
        return [await batcher.embed(name) for name in "abc"]

    assert asyncio.run(main()) == [f"encoded {name}" for name in "abc"]
    assert batcher.batch_sizes == {1: 3}


def test_a_bad_request_fails_alone(executor):
    recorder = Recorder()
    batcher = batcher_for(recorder, executor, window_ms=50)

    async def main():
        return await asyncio.gather(batcher.embed("a"), batcher.embed("bad1"), batcher.embed("c"),
                                    return_exceptions=True)

    good_a, bad, good_c = asyncio.run(main())
    assert (good_a, good_c) == ("encoded a", "encoded c")
    assert isinstance(bad, ValueError) and "cannot take bad1" in str(bad)
    assert recorder.passes == [["prepared a", "prepared c"]]


def test_a_failed_pass_fails_its_batch_and_the_next_pass_works(executor):
    recorder = Recorder()
    recorder.fail_next_pass = True
    batcher = batcher_for(recorder, executor, window_ms=20)

    async def main():
        failed = await asyncio.gather(batcher.embed("a"), batcher.embed("b"), return_exceptions=True)
        return failed, await batcher.embed("c")

    failed, later = asyncio.run(main())
    assert all(isinstance(result, RuntimeError) for result in failed)
    assert later == "encoded c"


def test_a_cancelled_caller_is_not_encoded(executor):
    recorder = Recorder()
    batcher = batcher_for(recorder, executor, window_ms=100)

    async def main():
        gone = asyncio.ensure_future(batcher.embed("gone"))
        kept = asyncio.ensure_future(batcher.embed("kept"))
        await asyncio.sleep(0.02)
        gone.cancel()
        return await kept

    assert asyncio.run(main()) == "encoded kept"
    assert recorder.passes == [["prepared kept"]]


def test_a_shut_down_executor_fails_the_callers_instead_of_hanging():
    recorder = Recorder()
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    batcher = batcher_for(recorder, pool, window_ms=0)

    async def main():
        return await asyncio.wait_for(batcher.embed("a"), timeout=5)

    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(main())


def test_each_event_loop_gets_its_own_worker(executor):
    recorder = Recorder()
    batcher = batcher_for(recorder, executor, window_ms=0)
    assert asyncio.run(batcher.embed("a")) == "encoded a"
    # The first loop is closed; a new one must still be served.
    assert asyncio.run(batcher.embed("b")) == "encoded b"


def test_encoding_runs_off_the_event_loop(executor):
    threads = []

    def encode(prepared):
        threads.append(threading.current_thread())
        return prepared

    batcher = EmbeddingBatcher(lambda request: request, encode, executor, window_ms=0)
    assert asyncio.run(batcher.embed("a")) == "a"
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.parametrize("settings", [{"window_ms": -1}, {"max_batch": 0}])
def test_bad_settings_are_named(executor, settings):
    with pytest.raises(ValueError, match="embedding batch"):
        batcher_for(Recorder(), executor, **settings)


def test_settings_come_from_the_model_parameters():
    assert settings_from_parameters({}) == {"window_ms": DEFAULT_WINDOW_MS, "max_batch": DEFAULT_MAX_BATCH}
    assert settings_from_parameters({"embed_batch_window_ms": "", "embed_max_batch": ""}) == \
        {"window_ms": DEFAULT_WINDOW_MS, "max_batch": DEFAULT_MAX_BATCH}
    assert settings_from_parameters({"embed_batch_window_ms": "2.5", "embed_max_batch": "4"}) == \
        {"window_ms": 2.5, "max_batch": 4}
    with pytest.raises(ValueError, match="embed_max_batch must be a whole number, got '2.5'"):
        settings_from_parameters({"embed_max_batch": "2.5"})
    with pytest.raises(ValueError, match="embed_batch_window_ms must be a number of milliseconds, got 'soon'"):
        settings_from_parameters({"embed_batch_window_ms": "soon"})
