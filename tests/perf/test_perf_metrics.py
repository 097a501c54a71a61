"""Latency accounting of the load tool (perf/metrics.py, perf/ws_load.py's per-stream
summary and probe, perf/capacity.py's search) on scripted timelines and a scripted websocket server,
and the precision profiles the perf tools start the service in: no service, no models."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.server import serve

from perf import capacity, metrics, ws_load
from perf.bench_args import PROFILES, comma_choices, profile_environment
from perf.metrics import Piece
from twopass_asr.first_pass.options import PRECISION_ENV as FIRST_PASS_PRECISION_ENV
from twopass_asr.second_pass.precision import ENCODER_PRECISION_ENV, PRECISION_ENV

FRAME = 960  # 60 ms at 16 kHz, what FunASR's clients send per frame
CHUNK = 9600  # 600 ms first-pass chunk


def test_percentiles_match_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.05]
    for q in (0, 25, 50, 90, 95, 99, 100):
        assert metrics.percentile(values, q) == pytest.approx(np.percentile(values, q))
    summary = metrics.summarise(values)
    assert summary["count"] == 7 and summary["max"] == 0.9
    assert summary["p95"] == pytest.approx(np.percentile(values, 95))
    assert metrics.summarise([])["p95"] is None
    with pytest.raises(ValueError, match="no values"):
        metrics.percentile([], 50)


def test_pieces_follow_the_frames_and_split_large_ones():
    # 60 ms frames: one piece each; the end-of-stream piece holds the short tail frame.
    assert metrics.server_pieces([960, 960, 500], 960, 9600) == [Piece(0, 960), Piece(1, 960), Piece(3, 500, True)]
    # One 1.5 s frame: 600 + 600 + 300 ms, all completed by frame 0.
    assert metrics.server_pieces([24000], 960, 9600) == [Piece(0, 9600), Piece(0, 9600), Piece(0, 4800),
                                                         Piece(1, 0, True)]
    # 20 ms frames wait for each other until 60 ms are there.
    assert metrics.server_pieces([320] * 4, 960, 9600) == [Piece(2, 960), Piece(4, 320, True)]
    with pytest.raises(ValueError):
        metrics.server_pieces([960], 0, 9600)


def test_segment_ends_pair_starts_with_ends_and_ignore_orphan_ends():
    events = [[], [[300, -1]], [], [[-1, 1200]], [[-1, 1500]], [[2000, 2400]], [[2600, -1]]]
    assert metrics.segment_ends(events) == [(3, 300, 1200), (5, 2000, 2400)]


def test_first_pass_grid_restarts_at_segment_ends():
    pieces = metrics.server_pieces([FRAME] * 25, FRAME, CHUNK)  # 1.5 s, 60 ms frames
    # No segment end: chunks complete at frames 9 and 19, the end flush decodes the rest.
    assert metrics.first_pass_decodes(pieces, CHUNK) == [9, 19, 25]
    # Online mode: the end flush's text goes into the final message, not a partial.
    assert metrics.first_pass_decodes(pieces, CHUNK, final_flush_is_partial=False) == [9, 19]
    # A segment end reported with frame 12 flushes there; the next grid counts from frame 13.
    assert metrics.first_pass_decodes(pieces, CHUNK, flush_pieces=[12]) == [9, 12, 22, 25]
    # A flush right after a whole chunk with nothing buffered still ends the open sequence.
    assert metrics.first_pass_decodes(pieces, CHUNK, flush_pieces=[9]) == [9, 9, 19, 25]


def test_partial_lags_on_a_backlogged_timeline():
    """A server that needs 0.25 s per decode and works through a backlog: the lags grow,
    and matching by the probe's frames recovers exactly the scripted lags."""
    frame_sent = [0.06 * (f + 1) for f in range(40)]
    end_sent = 0.06 * 41
    partial_frames = [9, 19, 29, 39, 40]  # 40 = the end-of-stream flush
    done, arrivals = 0.0, []
    for frame in partial_frames:
        done = max(done, metrics.sent_time(frame, frame_sent, end_sent)) + 0.25
        arrivals.append(done)
    lags = metrics.partial_lags(arrivals, partial_frames, frame_sent, end_sent)
    expected = [a - metrics.sent_time(f, frame_sent, end_sent) for a, f in zip(arrivals, partial_frames)]
    assert lags == pytest.approx(expected)
    assert lags[0] == pytest.approx(0.25)
    # A missing partial or one before its chunk was sent: the stream cannot be matched.
    assert metrics.partial_lags(arrivals[:-1], partial_frames, frame_sent, end_sent) is None
    assert metrics.partial_lags([0.1] + arrivals[1:], partial_frames, frame_sent, end_sent) is None


def test_segment_end_maps_to_the_frame_carrying_its_audio():
    frames = [FRAME] * 10 + [500]
    assert metrics.segment_reference_frame(600, frames) == 9  # last sample 9599 is in frame 9
    assert metrics.segment_reference_frame(601, frames) == 10
    assert metrics.segment_reference_frame(0, frames) == 0
    assert metrics.segment_reference_frame(99_000, frames) == 10  # clipped to the last frame
    frame_sent = [float(i) for i in range(11)]
    assert metrics.second_pass_latencies([(600, 9.5), (640, 12.0)], frames, frame_sent) == [0.5, 2.0]
    assert metrics.detection_latencies([(600, 9.5), (777, 20.0)], {600: 9}, frame_sent, 11.0) == [0.5]


def _record(plan: ws_load.AudioPlan, messages: list[tuple[dict, float]], frame_sent: list[float], end_sent: float):
    record = ws_load.StreamRecord(0)
    record.frame_sent, record.end_sent = frame_sent, end_sent
    record.result.end_sent_s = end_sent
    for message, arrival in messages:
        record.result.messages.append(message)
        record.result.arrival_s.append(arrival)
    record.done = True
    return record


def test_stream_metrics_of_a_scripted_stream():
    frame_lengths = [FRAME] * 25
    pieces = metrics.server_pieces(frame_lengths, FRAME, CHUNK)
    config = ws_load.stream_config("2pass")
    decodes = metrics.first_pass_decodes(pieces, CHUNK, flush_pieces=[12])
    plan = ws_load.AudioPlan(np.zeros(25 * FRAME, np.int16), config, frame_lengths, pieces, decodes, {700: 12},
                             partial_frames=[9, 12, 22], partial_texts=["a", "b", "c"])
    frame_sent = [0.06 * f for f in range(25)]
    end_sent = 1.6
    messages = [
        ({"mode": "2pass-online", "text": "a", "is_final": False}, 0.60),
        ({"mode": "2pass-online", "text": "b", "is_final": False}, 0.80),
        ({"mode": "2pass-offline", "text": "ab", "is_final": False, "start_time": 100, "end_time": 700}, 1.10),
        ({"mode": "2pass-online", "text": "c", "is_final": False}, 1.50),
        ({"mode": "2pass-offline", "text": "", "is_final": True, "is_end": True}, 1.70),
    ]
    result = ws_load.stream_metrics(plan, _record(plan, messages, frame_sent, end_sent))
    assert result["partial_lag"] == pytest.approx([0.60 - 0.54, 0.80 - 0.72, 1.50 - 1.32])
    assert result["first_partial"] == pytest.approx([0.60])
    # end_time 700 ms: sample 11199 is in frame 11, sent at 0.66 s; the VAD reported it with frame 12.
    assert result["second_pass"] == pytest.approx([1.10 - 0.66])
    assert result["second_pass_after_detection"] == pytest.approx([1.10 - 0.72])
    assert result["end_of_stream"] == pytest.approx([0.10])
    assert result["final"] and result["segments"] == 1 and not result["partial_unmatched"]
    assert not result["partial_text_differs"]

    # One partial short: no lags from this stream, and it is counted as unmatched.
    short = _record(plan, messages[:3] + messages[4:], frame_sent, end_sent)
    result = ws_load.stream_metrics(plan, short)
    assert result["partial_lag"] == [] and result["partial_unmatched"]


def _scripted_server(plan: ws_load.AudioPlan, second_pass_s: float, second_pass_first: bool,
                     segment_ends: dict[int, int] | None = None, empty_decodes: tuple[int, ...] = ()):
    """A websocket server answering plan's decodes with a partial each at once (none for the
    frames in empty_decodes), and each segment end its VAD reports (by default the plan's, as
    {frame: end_ms}) with a second-pass result after second_pass_s: before the stream's next
    audio and decodes (second_pass_first, as FunASR's servers) or beside them."""
    decodes = [0 if f in empty_decodes else plan.decode_frames.count(f) for f in range(len(plan.frame_lengths) + 1)]
    if segment_ends is None:
        segment_ends = {frame: end_ms for end_ms, frame in plan.detection_frames.items()}

    async def second_pass(websocket, end_ms: int) -> None:
        await asyncio.sleep(second_pass_s)
        await websocket.send(json.dumps({"mode": "2pass-offline", "text": "s", "is_final": False,
                                         "start_time": 0, "end_time": end_ms}))

    async def handle(websocket) -> None:
        frame, passes = 0, []
        async for message in websocket:
            if isinstance(message, str) and not json.loads(message).get("is_end"):
                continue  # the stream's config
            if frame in segment_ends:
                passes.append(asyncio.create_task(second_pass(websocket, segment_ends[frame])))
                if second_pass_first:
                    await passes[-1]
            for _ in range(decodes[frame]):
                await websocket.send(json.dumps({"mode": "2pass-online", "text": f"p{frame}", "is_final": False}))
            if isinstance(message, str):  # the end: the final after every second pass
                await asyncio.gather(*passes)
                await websocket.send(json.dumps({"mode": "2pass-offline", "text": "", "is_final": True}))
            frame += 1

    return serve(handle, "127.0.0.1", 0)


def _one_segment_plan() -> ws_load.AudioPlan:
    """25 frames whose VAD ends a segment at 700 ms, reported with frame 12 (the first pass
    flushes there)."""
    frame_lengths = [FRAME] * 25
    pieces = metrics.server_pieces(frame_lengths, FRAME, CHUNK)
    decodes = metrics.first_pass_decodes(pieces, CHUNK, flush_pieces=[12])
    return ws_load.AudioPlan(np.zeros(25 * FRAME, np.int16), ws_load.stream_config("2pass"), frame_lengths,
                             pieces, decodes, {700: 12})


def _probe_scripted_server(plan: ws_load.AudioPlan, final_timeout_s: float, **server) -> None:
    """ws_load.probe of `plan` against _scripted_server(plan, **server)."""

    async def run() -> None:
        async with _scripted_server(plan, **server) as scripted:
            await ws_load.probe(f"ws://127.0.0.1:{scripted.sockets[0].getsockname()[1]}/", plan, max_wait_s=5.0,
                                final_timeout_s=final_timeout_s)

    asyncio.run(run())


@pytest.mark.parametrize("second_pass_first", [True, False], ids=["before the next audio", "beside it"])
def test_probe_ties_partials_to_their_frames_across_a_slow_second_pass(second_pass_first):
    """A second pass that takes far longer than the server's decodes: the probe still ties
    each partial to the frame whose decode sent it, whether the server holds the stream's
    next decodes until that pass is done or answers them beside it."""
    plan = _one_segment_plan()
    decodes = list(plan.decode_frames)
    _probe_scripted_server(plan, 30.0, second_pass_s=1.0, second_pass_first=second_pass_first)
    assert plan.partial_frames == decodes
    assert plan.partial_texts == [f"p{frame}" for frame in decodes]


def test_probe_reports_a_segment_end_the_server_never_answers():
    """The plan's VAD ends a segment the server's does not: the probe waits for its second
    pass up to final_timeout_s after the frame that ended it (once, not again for each empty
    decode after it), then says what differs."""
    plan = _one_segment_plan()
    with pytest.raises(ws_load.ProbeMismatch, match="no second-pass result within 1.5 s of frame 12"):
        _probe_scripted_server(plan, 1.5, second_pass_s=0.0, second_pass_first=False, segment_ends={},
                               empty_decodes=(12, 22))


def test_stream_without_final_is_dropped_and_error_is_counted():
    frame_lengths = [FRAME] * 3
    pieces = metrics.server_pieces(frame_lengths, FRAME, CHUNK)
    plan = ws_load.AudioPlan(np.zeros(3 * FRAME, np.int16), ws_load.stream_config("2pass"), frame_lengths, pieces,
                             [3], {}, partial_frames=[3], partial_texts=["x"])
    dropped = ws_load.stream_metrics(plan, _record(plan, [], [0.0, 0.06, 0.12], None))
    assert dropped["dropped"] and not dropped["final"]
    error = {"mode": "2pass", "is_final": True, "is_end": True, "error": "boom", "code": "internal_error"}
    failed = ws_load.stream_metrics(plan, _record(plan, [(error, 0.2)], [0.0, 0.06, 0.12], 0.18))
    assert failed["error"] == "internal_error" and not failed["final"] and not failed["dropped"]
    runs = ws_load.summarise_run(plan, [_record(plan, [(error, 0.2)], [0.0], 0.1)], 1, 1.0, 0.0, 1.0, {})
    assert runs["errors"] == 1 and runs["finals"] == 0
    assert capacity.check_run(runs, 0.6, 2.0).startswith("1 of 1 streams without a final message")


def test_second_pass_limit_counts_from_the_vad_end_unless_asked_otherwise():
    latency = {key: metrics.summarise([0.1]) for key in ("first_partial", "partial_lag", "end_of_stream")}
    latency["second_pass"] = metrics.summarise([2.5])  # includes the VAD's end-silence wait
    latency["second_pass_after_detection"] = metrics.summarise([1.5])
    run = {"clients": 1, "finals": 1, "errors": 0, "failures": 0, "dropped": 0, "mode": "2pass", "latency_s": latency}
    assert capacity.check_run(run, 0.6, 2.0) is None
    assert capacity.check_run(run, 0.6, 2.0, "speech") == "p95 second-pass latency from the speech end 2500 ms >= 2000 ms"
    assert capacity.check_run(run, 0.6, 1.0, "vad") == "p95 second-pass latency from the vad end 1500 ms >= 1000 ms"


def test_capacity_search_finds_the_largest_passing_load(monkeypatch):
    """A fake server whose p95 partial lag is 0.1 s per stream: 5 streams pass (0.5 s),
    6 do not; the search must land on 5 via 1, 2, 4, 8 and a binary search."""
    tried = []

    async def fake_run_load(url, plan, clients, **_options):
        tried.append(clients)
        latency = {key: metrics.summarise([0.1]) for key in
                   ("first_partial", "second_pass", "second_pass_after_detection", "end_of_stream")}
        latency["partial_lag"] = metrics.summarise([0.1 * clients])
        return {"clients": clients, "finals": clients, "errors": 0, "failures": 0, "dropped": 0, "mode": "2pass",
                "latency_s": latency}

    monkeypatch.setattr(ws_load, "run_load", fake_run_load)
    monkeypatch.setattr(capacity, "SETTLE_S", 0)
    plan = ws_load.AudioPlan(np.zeros(FRAME, np.int16), ws_load.stream_config(), [FRAME], [], [], {})
    result = capacity.search("ws://fake", plan, 64, 0.55, 2.0)
    assert result["capacity"] == 5 and not result["bounded_by_max_clients"]
    assert tried == [1, 2, 4, 8, 6, 5]
    tried.clear()
    result = capacity.search("ws://fake", plan, 3, 0.55, 2.0)
    assert result["capacity"] == 3 and result["bounded_by_max_clients"] and tried == [1, 2, 3]
    tried.clear()
    assert capacity.search("ws://fake", plan, 8, 0.05, 2.0)["capacity"] == 0 and tried == [1]


def test_served_breakdown_takes_means_over_the_run_from_the_counters():
    before = {
        "twopass_frontend_second_pass_seconds_sum": {"": 10.0},
        "twopass_frontend_second_pass_seconds_count": {"": 4.0},
        "twopass_asr_nano_encoded_segments_total": {"funasr_nano_vllm": 4.0},
        "twopass_asr_nano_encoder_passes_total": {"funasr_nano_vllm": 4.0},
        "twopass_asr_nano_encoder_wait_seconds_total": {"funasr_nano_vllm": 1.0},
        "twopass_asr_nano_encoder_pass_seconds_total": {"funasr_nano_vllm": 2.0},
        "twopass_asr_sequence_passes_total": {"vad": 100.0, "paraformer_streaming": 40.0},
        "twopass_asr_sequence_pass_chunks_total": {"vad": 100.0, "paraformer_streaming": 50.0},
        "twopass_asr_sequence_pass_seconds_total": {"vad": 1.0, "paraformer_streaming": 9.0},
    }
    after = {
        "twopass_frontend_second_pass_seconds_sum": {"": 16.0},
        "twopass_frontend_second_pass_seconds_count": {"": 7.0},
        "twopass_asr_nano_encoded_segments_total": {"funasr_nano_vllm": 7.0},
        "twopass_asr_nano_encoder_passes_total": {"funasr_nano_vllm": 6.0},
        "twopass_asr_nano_encoder_wait_seconds_total": {"funasr_nano_vllm": 1.6},
        "twopass_asr_nano_encoder_pass_seconds_total": {"funasr_nano_vllm": 3.0},
        "twopass_asr_sequence_passes_total": {"vad": 108.0, "paraformer_streaming": 45.0},
        "twopass_asr_sequence_pass_chunks_total": {"vad": 110.0, "paraformer_streaming": 60.0},
        "twopass_asr_sequence_pass_seconds_total": {"vad": 1.4, "paraformer_streaming": 10.5},
        "twopass_asr_nano_torch_generated_segments_total": {"funasr_nano_vllm": 4.0},
        "twopass_asr_nano_draft_tokens_accepted_total": {"funasr_nano_vllm": 10.0},
    }
    served = metrics.served_breakdown(before, after)
    assert served["frontend_segments"] == 3
    assert served["frontend_second_pass_s"] == pytest.approx(2.0)
    assert served["encoder_wait_s"] == pytest.approx(0.2)  # 0.6 s over 3 segments
    assert served["encoder_pass_s"] == pytest.approx(0.5)  # 1 s over 2 passes
    assert served["encoder_batch"] == pytest.approx(1.5)
    assert served["paraformer_streaming_pass_s"] == pytest.approx(0.3)
    assert served["paraformer_streaming_batch"] == pytest.approx(2.0)
    assert served["vad_pass_s"] == pytest.approx(0.05)
    assert served["vad_batch"] == pytest.approx(1.25)
    assert served["draft_tokens_per_segment"] == pytest.approx(2.5)  # counted since its server started
    # vLLM generation keeps no torch counters: nothing is made up for it.
    assert served["torch_generate_wait_s"] is None and served["torch_generate_batch"] is None
    # A server restarted by the run has no counters from before.
    assert metrics.served_breakdown({}, after)["encoder_batch"] == pytest.approx(7 / 6)


def test_the_served_table_names_each_runs_breakdown():
    served = {key: None for key in metrics.served_breakdown({}, {})}
    served.update(frontend_segments=3.0, encoder_wait_s=0.2, encoder_batch=1.5, draft_tokens_per_segment=4.25)
    table = ws_load.served_table([{"clients": 2, "served": served}, {"clients": 4, "served": None}])
    rows = table.splitlines()
    assert len(rows) == 3 and rows[2].startswith("| 2 | 3 | - | 200 | - | 1.50 |")
    assert "| draft tokens kept per segment |" in rows[0] and "| 4.25 |" in rows[2]
    assert ws_load.served_table([{"clients": 1, "served": None}]) is None



def test_each_profile_sets_every_models_precision_and_others_are_refused():
    """perf's precision profiles start tritonserver with all three precision settings given (so
    int8 takes the LLM too); --profiles refuses a name it does not know."""
    for profile in PROFILES:
        assert profile_environment(profile) == {FIRST_PASS_PRECISION_ENV: profile, PRECISION_ENV: profile,
                                                ENCODER_PRECISION_ENV: profile}
    parser = argparse.ArgumentParser()
    assert comma_choices(parser, "--profiles", "auto,int8", PROFILES) == ["auto", "int8"]
    with pytest.raises(SystemExit):
        comma_choices(parser, "--profiles", "auto,int4", PROFILES)
