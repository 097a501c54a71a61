"""Unit tests of the per-CORRID state store (fake clock)."""

import pytest

from twopass_asr.serving.stream_store import StreamError, StreamStore


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_start_get_end():
    store = StreamStore(max_streams=4, idle_timeout_s=10, clock=FakeClock())
    state = store.start(1, dict)
    assert store.get(1) is state
    store.end(1)
    assert 1 not in store
    with pytest.raises(StreamError, match="unknown stream 1"):
        store.get(1)


def test_restart_replaces_state():
    store = StreamStore(max_streams=1, idle_timeout_s=10, clock=FakeClock())
    first = store.start(7, dict)
    second = store.start(7, dict)  # a START on a live CORRID within the bound
    assert second is not first and store.get(7) is second and len(store) == 1


def test_end_of_a_replaced_state_keeps_the_restarted_stream():
    """A decoupled model ends a stream when its last chunk is answered; a START for the
    same CORRID may have come in meanwhile and must survive that."""
    store = StreamStore(max_streams=4, idle_timeout_s=10, clock=FakeClock())
    first = store.start(7, dict)
    second = store.start(7, dict)
    store.end(7, first)
    assert store.get(7) is second
    store.end(7, second)
    assert 7 not in store


def test_bound_is_enforced_with_clear_error():
    store = StreamStore(max_streams=2, idle_timeout_s=10, clock=FakeClock())
    store.start(1, dict)
    store.start(2, dict)
    with pytest.raises(StreamError, match="too many active streams"):
        store.start(3, dict)
    store.end(1)
    store.start(3, dict)
    assert len(store) == 2


def test_idle_streams_are_reclaimed():
    clock = FakeClock()
    store = StreamStore(max_streams=2, idle_timeout_s=10, clock=clock)
    store.start(1, dict)
    store.start(2, dict)
    clock.now = 6
    store.get(2)  # stream 2 stays alive by being used
    clock.now = 12
    store.start(3, dict)  # reaping stream 1 makes room
    assert 1 not in store and 2 in store and 3 in store
    clock.now = 30
    assert sorted(store.reap_idle()) == [2, 3]
