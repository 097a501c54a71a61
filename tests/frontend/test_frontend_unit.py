"""Unit tests of the WebSocket frontend's pure parts: protocol parsing, hotwords, audio
input (odd bytes, WAV headers, resampling), history, ordered delivery, static files, and
the per-stream pipeline against a scripted stand-in for Triton (no tritonserver)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import wave

import numpy as np
import pytest

from frontend.audio import AudioHistory, AudioInput, WavHeaderSkipper
from frontend.delivery import OrderedDelivery
from frontend.protocol import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNSUPPORTED_DATA,
    ProtocolError,
    StreamConfig,
    decode_text_frame,
    error_message,
    final_message,
    segment_message,
    start_config,
    update_config,
)
from frontend.server import FrontendServer, static_response
from frontend.session import StreamSession
from frontend.triton_client import SequenceIds, TritonStreamModels, TritonUnavailable
from twopass_asr.hotwords import parse_hotwords

# -- hotwords ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, words",
    [
        ("", []),
        ("   ", []),
        ('{"阿里巴巴": 20, "hello world": 10}', ["阿里巴巴", "hello world"]),
        ("阿里巴巴 达摩院", ["阿里巴巴", "达摩院"]),
        ("alpha,beta, gamma", ["alpha", "beta", "gamma"]),
        ("甲，乙 ,丙", ["甲", "乙", "丙"]),
        ("dup dup other dup", ["dup", "other"]),
        ('{" spaced ": 1, "": 3}', ["spaced"]),
    ],
)
def test_parse_hotwords_forms(text, words):
    assert parse_hotwords(text) == words


def test_parse_hotwords_rejects_broken_json_with_reason():
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_hotwords('{"word": 20')


def test_hotwords_are_bounded_by_what_the_prompt_takes():
    # 200 words of 4 characters and 199 separators: 999 characters, the most allowed.
    words = [f"w{i:03d}" for i in range(200)]
    assert parse_hotwords(" ".join(words)) == words
    assert parse_hotwords(",".join(words + words)) == words  # duplicates do not count
    with pytest.raises(ValueError, match=r"hotwords take 1004 characters \(201 words\).* at most 1000"):
        parse_hotwords(" ".join(words + ["w200"]))


# -- config parsing ------------------------------------------------------------------------

def test_defaults_match_protocol():
    config = start_config(decode_text_frame("{}"), None)
    assert config == StreamConfig()
    assert (config.mode, config.chunk_size, config.chunk_interval) == ("2pass", (5, 10, 5), 10)
    assert (config.encoder_chunk_look_back, config.decoder_chunk_look_back) == (4, 1)
    assert (config.audio_fs, config.wav_name, config.wav_format) == (16000, "demo", "pcm")
    assert (config.is_speaking, config.is_end, config.hotwords, config.itn) == (True, False, "", True)
    assert (config.svs_lang, config.vad_tail_sil, config.vad_max_len, config.vad_energy) == ("auto", 800, 60000, None)
    assert config.first_pass_chunk_samples == 9600  # 600 ms


def test_every_field_is_parsed():
    frame = {
        "mode": "online", "chunk_size": [0, 8, 4], "chunk_interval": 5, "encoder_chunk_look_back": 2,
        "decoder_chunk_look_back": 0, "audio_fs": 8000, "wav_name": "abc", "wav_format": "WAV",
        "is_speaking": False, "is_end": True, "hotwords": "a b", "itn": False, "svs_lang": "en",
        "vad_tail_sil": 500, "vad_max_len": 20000, "vad_energy": -40, "unknown_extra": [1, 2],
    }
    config = start_config(decode_text_frame(json.dumps(frame)), None)
    assert config == StreamConfig(
        mode="online", chunk_size=(0, 8, 4), chunk_interval=5, encoder_chunk_look_back=2, decoder_chunk_look_back=0,
        audio_fs=8000, wav_name="abc", wav_format="wav", is_speaking=False, is_end=True, hotwords="a b", itn=False,
        svs_lang="en", vad_tail_sil=500, vad_max_len=20000, vad_energy=-40.0,
    )
    assert config.ends_stream
    assert config.first_pass_chunk_samples == 8 * 960


@pytest.mark.parametrize("value", ["5,10,5", " 5, 10 ,5", [5, 10, 5]])
def test_chunk_size_as_list_or_string(value):
    assert decode_text_frame(json.dumps({"chunk_size": value}))["chunk_size"] == (5, 10, 5)


@pytest.mark.parametrize(
    "frame, field",
    [
        ({"mode": "fast"}, "mode"),
        ({"mode": 2}, "mode"),
        ({"chunk_size": [5, 10]}, "chunk_size"),
        ({"chunk_size": "5,x,5"}, "chunk_size"),
        ({"chunk_size": [5, 0, 5]}, "chunk_size[1]"),
        ({"chunk_size": [5, 10.5, 5]}, "chunk_size[1]"),
        ({"chunk_interval": "10"}, "chunk_interval"),
        ({"encoder_chunk_look_back": True}, "encoder_chunk_look_back"),
        ({"audio_fs": "16000"}, "audio_fs"),
        ({"wav_name": 7}, "wav_name"),
        ({"is_speaking": "false"}, "is_speaking"),
        ({"is_speaking": 0}, "is_speaking"),
        ({"is_end": "true"}, "is_end"),
        ({"hotwords": {"a": 1}}, "hotwords"),
        ({"hotwords": '{"a": 1'}, "hotwords"),
        ({"itn": "yes"}, "itn"),
        ({"svs_lang": ["zh"]}, "svs_lang"),
        ({"svs_lang": "x" * 33}, "svs_lang"),
        ({"hotwords": " ".join(f"w{i:03d}" for i in range(201))}, "hotwords"),
        ({"vad_tail_sil": 0}, "vad_tail_sil"),
        ({"vad_max_len": "60000"}, "vad_max_len"),
        ({"vad_energy": "loud"}, "vad_energy"),
    ],
)
def test_wrong_types_and_values_name_the_field(frame, field):
    with pytest.raises(ProtocolError) as info:
        decode_text_frame(json.dumps(frame))
    assert info.value.code == "invalid_config"
    assert info.value.close_code == CLOSE_INVALID_PAYLOAD
    assert f"'{field}'" in info.value.message


@pytest.mark.parametrize("text", ["not json", "", "{'mode': 'online'}", "[1, 2]", '"2pass"'])
def test_non_object_text_frames_are_invalid_json(text):
    with pytest.raises(ProtocolError) as info:
        decode_text_frame(text)
    assert info.value.code == "invalid_json"
    assert info.value.close_code == CLOSE_INVALID_PAYLOAD


def test_unsupported_wav_format_and_rate():
    with pytest.raises(ProtocolError) as info:
        decode_text_frame('{"wav_format": "mp3"}')
    assert (info.value.code, info.value.close_code) == ("unsupported_wav_format", CLOSE_UNSUPPORTED_DATA)
    assert "mp3" in info.value.message
    with pytest.raises(ProtocolError) as info:
        decode_text_frame('{"audio_fs": 4000}')
    assert (info.value.code, info.value.close_code) == ("unsupported_audio_fs", CLOSE_UNSUPPORTED_DATA)


def test_null_means_not_given():
    assert decode_text_frame('{"hotwords": null, "svs_lang": null, "vad_energy": null, "mode": "online"}') == {
        "mode": "online"}


def test_updates_inside_a_stream():
    config = start_config(decode_text_frame('{"mode": "2pass", "hotwords": "a"}'), None)
    updated = update_config(config, decode_text_frame('{"hotwords": "b c", "mode": "2pass", "is_speaking": false}'))
    assert (updated.hotwords, updated.ends_stream, updated.mode) == ("b c", True, "2pass")
    assert update_config(config, decode_text_frame('{"is_end": true}')).ends_stream
    assert not update_config(config, decode_text_frame('{"is_speaking": true}')).ends_stream
    for frame in ('{"mode": "online"}', '{"audio_fs": 8000}', '{"wav_format": "wav"}'):
        with pytest.raises(ProtocolError) as info:
            update_config(config, decode_text_frame(frame))
        assert (info.value.code, info.value.close_code) == ("config_locked", CLOSE_POLICY_VIOLATION)


def test_next_stream_inherits_settings_but_not_end_flags():
    first = start_config(decode_text_frame('{"mode": "offline", "wav_name": "one", "is_speaking": false}'), None)
    second = start_config(decode_text_frame('{"wav_name": "two"}'), first)
    assert (second.mode, second.wav_name, second.is_speaking, second.is_end) == ("offline", "two", True, False)


def test_result_messages():
    config = StreamConfig(mode="2pass", wav_name="w")
    segment = segment_message(config, "你好", 120, 980)
    assert segment == {"mode": "2pass-offline", "text": "你好", "wav_name": "w", "is_final": False,
                       "start_time": 120, "end_time": 980}
    assert final_message(config, segment) == {**segment, "is_final": True, "is_end": True}
    assert final_message(config, None) == {"mode": "2pass-offline", "text": "", "wav_name": "w",
                                           "is_final": True, "is_end": True}
    assert final_message(StreamConfig(mode="online"), None)["mode"] == "online"
    assert error_message("2pass", "w", "x", "why") == {"mode": "2pass", "wav_name": "w", "is_final": True,
                                                       "is_end": True, "error": "why", "code": "x"}


# -- audio input ---------------------------------------------------------------------------

def _wav_bytes(pcm: np.ndarray, rate: int = 16000, extra_chunk: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    data = buffer.getvalue()
    if extra_chunk:  # a LIST chunk before "data", as some encoders write
        data = data[:36] + b"LIST" + struct.pack("<I", len(extra_chunk)) + extra_chunk + data[36:]
    return data


def test_odd_trailing_byte_waits_for_next_frame():
    samples = np.array([1, -2, 300, -32768, 32767], dtype=np.int16)
    raw = samples.astype("<i2").tobytes()
    audio = AudioInput(16000, "pcm")
    pieces = [audio.feed(raw[:3]), audio.feed(raw[3:4]), audio.feed(raw[4:])]
    assert [len(p) for p in pieces] == [1, 1, 3]
    np.testing.assert_array_equal(np.concatenate(pieces), samples)
    assert len(audio.finish()) == 0


def test_lone_odd_byte_at_the_end_is_dropped():
    audio = AudioInput(16000, "pcm")
    assert len(audio.feed(b"\x01\x00\x02")) == 1
    assert len(audio.finish()) == 0


@pytest.mark.parametrize("split", [1, 7, 20, 44, 60])
def test_wav_header_skipped_wherever_frames_split(split):
    pcm = (np.arange(500) * 37 % 2000 - 1000).astype(np.int16)
    data = _wav_bytes(pcm, extra_chunk=b"INFOsome metadata!")
    audio = AudioInput(16000, "wav")
    out = [audio.feed(data[i:i + split]) for i in range(0, len(data), split)]
    out.append(audio.finish())
    np.testing.assert_array_equal(np.concatenate(out), pcm)


def test_wav_without_header_is_taken_as_pcm():
    pcm = np.arange(-50, 50, dtype=np.int16)
    audio = AudioInput(16000, "wav")
    out = np.concatenate([audio.feed(pcm.tobytes()[:5]), audio.feed(pcm.tobytes()[5:]), audio.finish()])
    np.testing.assert_array_equal(out, pcm)


def test_wav_header_rejects_stereo_and_missing_data():
    stereo = bytearray(_wav_bytes(np.zeros(10, dtype=np.int16)))
    stereo[22:24] = struct.pack("<H", 2)
    with pytest.raises(ProtocolError) as info:
        WavHeaderSkipper().feed(bytes(stereo))
    assert info.value.code == "unsupported_wav_format" and "2 channel" in info.value.message
    header_only = b"RIFF\x00\x00\x00\x00WAVE" + b"JUNK" + struct.pack("<I", 70000) + bytes(70000)
    with pytest.raises(ProtocolError, match="no 'data' chunk"):
        WavHeaderSkipper().feed(header_only)


def _tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def _dominant_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_rates_are_resampled_to_16k_across_frames(rate):
    tone = _tone(rate, 1.0)
    audio = AudioInput(rate, "pcm")
    raw = tone.tobytes()
    step = 2 * (rate // 50) + 1  # 20 ms frames, odd sizes on purpose
    out = np.concatenate([audio.feed(raw[i:i + step]) for i in range(0, len(raw), step)] + [audio.finish()])
    assert abs(len(out) - 16000) <= 2
    assert abs(_dominant_hz(out, 16000) - 440.0) < 2.0


def test_wav_header_rate_overrides_audio_fs():
    audio = AudioInput(16000, "wav")
    out = np.concatenate([audio.feed(_wav_bytes(_tone(8000, 0.5), rate=8000)), audio.finish()])
    assert abs(len(out) - 8000) <= 2  # 0.5 s at 16 kHz


# -- history and ordering ------------------------------------------------------------------

def test_audio_history_slices_by_ms_and_forgets_old_audio():
    history = AudioHistory()
    stream = np.arange(16000 * 3, dtype=np.int64).astype(np.int16)
    for offset in range(0, len(stream), 960):
        history.append(stream[offset:offset + 960])
    np.testing.assert_array_equal(history.slice_ms(1000, 1500), stream[16000:24000])
    history.discard_before_ms(1200)
    np.testing.assert_array_equal(history.slice_ms(1000, 1500), stream[19200:24000])  # clipped
    np.testing.assert_array_equal(history.slice_ms(2000, 3000), stream[32000:48000])
    np.testing.assert_array_equal(history.slice_ms(2900, 4000), stream[46400:48000])  # ends at the last sample


def test_ordered_delivery_emits_in_submission_order():
    """Jobs run at once, yet come out in submission order: the first job finishes only after the
    last one started, so run one after another they would never finish (wait_for fails)."""
    async def scenario():
        emitted = []
        last_started = asyncio.Event()

        async def emit(message):
            emitted.append(message)

        async def first():
            await last_started.wait()
            return "a"

        async def second():
            return "b"

        async def last():
            last_started.set()
            return "c"

        delivery = OrderedDelivery(emit, on_failure=pytest.fail)
        for job in (first(), second(), last()):
            delivery.submit(job)
        await asyncio.wait_for(delivery.drain(), 30)
        return emitted

    assert asyncio.run(scenario()) == ["a", "b", "c"]


def test_ordered_delivery_stops_at_a_failure():
    async def scenario():
        emitted, failures = [], []

        async def emit(message):
            emitted.append(message)

        async def ok(name):
            return name

        async def broken():
            await asyncio.sleep(0.01)
            raise RuntimeError("model failed")

        delivery = OrderedDelivery(emit, failures.append)
        delivery.submit(ok("first"))
        delivery.submit(broken())
        delivery.submit(ok("after"))
        with pytest.raises(RuntimeError):
            await delivery.drain()
        return emitted, failures

    emitted, failures = asyncio.run(scenario())
    assert emitted == ["first"]
    assert [str(f) for f in failures] == ["model failed"]


# -- server helpers ------------------------------------------------------------------------

def test_static_files(tmp_path):
    (tmp_path / "index.html").write_text("<html>hi</html>")
    (tmp_path / "app.js").write_text("let x = 1;")
    (tmp_path.parent / "secret.txt").write_text("no")
    index = static_response(tmp_path, "/?x=1")
    assert index.status_code == 200 and index.body == b"<html>hi</html>"
    assert index.headers["Content-Type"].startswith("text/html")
    script = static_response(tmp_path, "/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    assert static_response(tmp_path, "/../secret.txt").status_code == 404
    assert static_response(tmp_path, "/%2e%2e/secret.txt").status_code == 404
    assert static_response(tmp_path, "/missing.css").status_code == 404
    assert static_response(tmp_path / "absent", "/").status_code == 404


def test_subprotocol_binary_when_offered_none_otherwise():
    assert FrontendServer.select_subprotocol(None, ["binary"]) == "binary"
    assert FrontendServer.select_subprotocol(None, []) is None
    assert FrontendServer.select_subprotocol(None, ["chat"]) is None


def test_sequence_ids_unique_and_nonzero():
    ids = SequenceIds()
    values = [ids.next() for _ in range(1000)]
    assert len(set(values)) == 1000 and all(0 < v < 2**64 for v in values)
    assert SequenceIds().next() != SequenceIds().next()


# -- the per-stream pipeline against a scripted Triton -------------------------------------

class _Result:
    def __init__(self, **outputs):
        self.outputs = outputs


class ScriptedStream:
    """Stands in for one gRPC sequence stream: records requests, answers from a script."""

    def __init__(self, gateway, model):
        self.gateway, self.model = gateway, model

    async def infer(self, inputs, sequence_id, start=False, end=False, timeout=None):
        audio = inputs[0][1]
        self.gateway.requests.append((self.model, sequence_id, start, end, len(audio), [i[0] for i in inputs]))
        await asyncio.sleep(0)
        if self.model == "vad":
            events = self.gateway.vad_events(len(audio), end)
            self.gateway.answered.append((self.model, end, len(self.gateway.second_pass),
                                          any(stop >= 0 for _, stop in events)))
            return _Result(SEGMENTS=events)
        self.gateway.answered.append((self.model, end, len(self.gateway.second_pass), False))
        return _Result(TEXT=f"<{len(audio)}>" if len(audio) else "")

    async def close(self):
        self.gateway.closed.append(self.model)

    def cancel(self):
        self.gateway.closed.append(self.model)


class LosingStream(ScriptedStream):
    async def infer(self, inputs, sequence_id, start=False, end=False, timeout=None):
        if len(self.gateway.requests) >= self.gateway.lose_after:
            raise TritonUnavailable("inference server unreachable (scripted)")
        return await super().infer(inputs, sequence_id, start, end, timeout)


class ScriptedGateway:
    """VAD events at fixed sample positions; first pass answers with the chunk length;
    the second pass answers with the segment length after a delay that makes earlier
    segments finish last (so ordering is really exercised)."""

    url = "scripted:1"

    def __init__(self, segments_ms):
        self.segments_ms = segments_ms
        self.position = 0
        self.requests = []
        self.closed = []
        self.second_pass = []
        self.answered = []  # (model, end, second passes started by then, closes a segment), in answer order

    def vad_events(self, samples, end):
        before, self.position = self.position, self.position + samples
        now_ms, before_ms = self.position // 16, before // 16
        events = []
        for start, stop in self.segments_ms:
            starts, stops = before_ms < start + 300 <= now_ms, before_ms < stop + 800 <= now_ms
            if end and start + 300 <= now_ms < stop + 800:
                stops = True
            if starts and stops:
                events.append([start, min(stop, now_ms)])
            elif starts:
                events.append([start, -1])
            elif stops:
                events.append([-1, min(stop, now_ms)])
        return events

    def open_stream(self, model):
        return ScriptedStream(self, model)

    @staticmethod
    def audio_inputs(pcm):
        return [("AUDIO", pcm)]

    @staticmethod
    def vad_inputs(pcm, *knobs):
        return [("AUDIO", pcm)] + [("KNOB", k) for k in knobs]

    @staticmethod
    def first_pass_inputs(pcm, *options):
        return [("AUDIO", pcm)] + [("OPTION", o) for o in options]

    @staticmethod
    def segments(result):
        return [tuple(e) for e in result.outputs["SEGMENTS"]]

    @staticmethod
    def text(result):
        return result.outputs["TEXT"]

    async def recognize_segment(self, pcm, hotwords, language, itn, draft=""):
        self.second_pass.append((len(pcm), hotwords, language, itn, draft))
        await asyncio.sleep(0.2 / len(self.second_pass))
        return f"seg{len(pcm)}"


class LosingGateway(ScriptedGateway):
    """A ScriptedGateway that is lost (unreachable) from its `lose_after`-th request on."""

    def __init__(self, segments_ms, lose_after):
        super().__init__(segments_ms)
        self.lose_after = lose_after

    def open_stream(self, model):
        return LosingStream(self, model)


class TakingTurnsModels(TritonStreamModels):
    """The scripted Triton models as a backend that runs the passes in turn would use them."""

    second_pass_beside_first_pass = False


def _run_session(config, gateway, pcm, frame=960, spare=None, models_class=TritonStreamModels):
    """The session's messages; when `gateway` is lost, the stream may move to `spare`."""
    async def scenario():
        messages, failures = [], []

        async def emit(message):
            messages.append(message)

        async def relocate(lost):
            return spare

        models = models_class(gateway, SequenceIds(), 30.0, relocate, lambda gateway: None)
        session = StreamSession(config, models, emit, failures.append)
        raw = pcm.tobytes()
        for offset in range(0, len(raw), 2 * frame):
            await session.push_audio(raw[offset:offset + 2 * frame])
        await session.end()
        assert not failures, failures
        assert session.completed
        return messages

    return asyncio.run(scenario())


def test_2pass_pipeline_orders_segments_restarts_first_pass_and_ends_once():
    gateway = ScriptedGateway([(500, 1500), (2500, 3000), (4000, 4600)])
    pcm = np.zeros(16 * 4700, dtype=np.int16)  # the stream ends inside the last segment
    config = StreamConfig(mode="2pass", wav_name="t", hotwords="hw", svs_lang="zh", itn=False)
    messages = _run_session(config, gateway, pcm)

    segments = [m for m in messages if m["mode"] == "2pass-offline"]
    assert [(m["start_time"], m["end_time"]) for m in segments] == [(500, 1500), (2500, 3000), (4000, 4600)]
    # Text from exactly the audio between VAD start and end (16 samples per ms).
    assert [m["text"] for m in segments] == ["seg16000", "seg8000", "seg9600"]
    assert gateway.second_pass[0][1:4] == ("hw", "zh", False)
    # Exactly one final, last, and it carries the segment closed by the end-of-stream flush.
    assert [m.get("is_final") for m in messages].count(True) == 1
    assert messages[-1] == {**segments[-1], "is_final": True, "is_end": True}
    assert all(m["mode"] == "2pass-online" and not m["is_final"] for m in messages if "start_time" not in m)

    vad = [r for r in gateway.requests if r[0] == "vad"]
    assert len({r[1] for r in vad}) == 1 and vad[0][2] and vad[-1][3]
    assert vad[0][5].count("KNOB") == 3 and all(r[5] == ["AUDIO"] for r in vad[1:])
    first = [r for r in gateway.requests if r[0] == "paraformer_streaming"]
    sequences = list(dict.fromkeys(r[1] for r in first))
    assert len(sequences) == 3  # restarted at each segment end; the last closed by the flush
    for sequence in sequences:
        requests = [r for r in first if r[1] == sequence]
        assert requests[0][2] and requests[-1][3] and not any(r[3] for r in requests[:-1])
        assert all(r[4] == 9600 for r in requests[:-1])  # 600 ms chunks inside a sequence
    assert sum(r[4] for r in first) == len(pcm)
    assert sorted(gateway.closed) == ["paraformer_streaming", "vad"]


def _first_pass_answers_after_segment_ends(gateway):
    """For each VAD answer that closed a segment, the first answer of the first pass after it
    (the decode of that audio, or the flush): whether it ended the sequence, and how many
    second passes had started by then."""
    answers, closing = [], False
    for model, end, started, closes in gateway.answered:
        if model == "vad" and closes:
            closing = True
        elif model == "paraformer_streaming" and closing:
            answers.append((end, started))
            closing = False
    return answers


def test_a_segments_second_pass_starts_before_the_first_pass_decodes_the_audio_that_closed_it():
    # The scripted VAD reports each end 800 ms after it: at 2400 and 4200 ms with the 60 ms
    # piece that completes a 600 ms chunk of the first pass's sequence (restarted at 2400),
    # at 5640 ms with one that does not.
    segments = [(500, 1600), (2500, 3400), (4500, 4800)]
    pcm = np.zeros(16 * 6000, dtype=np.int16)
    config = StreamConfig(mode="2pass")
    beside, in_turn = ScriptedGateway(segments), ScriptedGateway(segments)
    messages = _run_session(config, beside, pcm)
    assert [m["text"] for m in messages if "start_time" in m] == ["seg17600", "seg14400", "seg4800"]
    answers = _first_pass_answers_after_segment_ends(beside)
    assert [end for end, _ in answers] == [False, False, True]
    # The n-th segment's second pass had gone out before the first pass answered.
    assert [started for _, started in answers] == [1, 2, 3]
    # A backend whose passes take turns gets the segment after the first pass's answers, as
    # FunASR's servers do.
    assert _run_session(config, in_turn, pcm, models_class=TakingTurnsModels) == messages
    assert [started for _, started in _first_pass_answers_after_segment_ends(in_turn)] == [0, 1, 2]
    # Each second pass has the first pass's text of its segment as its draft: beside the first
    # pass, without the audio that closed the segment; taking turns, with it and the flush.
    assert [draft for *_, draft in beside.second_pass] == ["<9600>" * 3, "<9600>" * 2, "<9600>" * 2]
    assert [draft for *_, draft in in_turn.second_pass] == ["<9600>" * 4, "<9600>" * 3, "<9600>" * 2 + "<3840>"]


def test_a_2pass_stream_lost_during_a_flush_asks_for_the_segment_once_on_the_new_server():
    segments = [(500, 1500), (2500, 3000)]
    pcm = np.zeros(16 * 3500, dtype=np.int16)
    config = StreamConfig(mode="2pass")
    reference = ScriptedGateway(segments)
    expected = _run_session(config, reference, pcm)
    first_flush = next(index for index, request in enumerate(reference.requests)
                        if request[0] == "paraformer_streaming" and request[3])
    lost, spare = LosingGateway(segments, lose_after=first_flush), ScriptedGateway(segments)
    moved = _run_session(config, lost, pcm, spare=spare)
    assert [m for m in moved if "start_time" in m] == [m for m in expected if "start_time" in m]
    # The first segment's second pass, started beside the flush, was cancelled with it; the new
    # server was asked for each segment once.
    assert lost.second_pass == []
    assert [length for length, *_ in spare.second_pass] == [length for length, *_ in reference.second_pass]


def test_offline_mode_sends_no_partials_and_final_is_empty_after_silence():
    gateway = ScriptedGateway([(300, 1000)])
    messages = _run_session(StreamConfig(mode="offline"), gateway, np.zeros(16 * 3000, dtype=np.int16))
    assert [m["mode"] for m in messages] == ["offline", "offline"]
    assert [draft for *_, draft in gateway.second_pass] == [""]  # no first pass, no draft
    assert (messages[0]["start_time"], messages[0]["end_time"], messages[0]["is_final"]) == (300, 1000, False)
    assert messages[1] == {"mode": "offline", "text": "", "wav_name": "demo", "is_final": True, "is_end": True}
    assert not [r for r in gateway.requests if r[0] == "paraformer_streaming"]


def test_online_mode_single_sequence_final_carries_tail():
    gateway = ScriptedGateway([(300, 1000)])
    pcm = np.zeros(16000 + 500, dtype=np.int16)
    messages = _run_session(StreamConfig(mode="online", chunk_size=(0, 5, 5)), gateway, pcm, frame=333)
    assert not [r for r in gateway.requests if r[0] == "vad"]
    assert {r[1] for r in gateway.requests} and len({r[1] for r in gateway.requests}) == 1
    assert [m["text"] for m in messages] == ["<4800>", "<4800>", "<4800>", "<2100>"]
    assert messages[-1]["is_final"] and messages[-1]["is_end"] and messages[-1]["mode"] == "online"
    assert not any(m["is_final"] for m in messages[:-1])


def test_online_stream_moves_when_its_server_is_lost_and_sends_each_partial_once():
    config = StreamConfig(mode="online", chunk_size=(0, 5, 5))
    pcm = np.zeros(16 * 4000 + 500, dtype=np.int16)
    expected = _run_session(config, ScriptedGateway([]), pcm, frame=333)
    # Lost at its 6th request: five 300 ms chunks were decoded and their partials sent.
    spare = ScriptedGateway([])
    moved = _run_session(config, LosingGateway([], lose_after=5), pcm, frame=333, spare=spare)
    assert moved == expected
    # The spare's fresh sequence began four chunks before the first one not yet decoded; the
    # texts of those four were not sent again.
    requests = [(r[2], r[3], r[4]) for r in spare.requests]
    assert requests[0] == (True, False, 4800) and len(spare.requests) == len(expected) - 5 + 4
    assert sum(r[2] for r in requests) == len(pcm) - 5 * 4800 + 4 * 4800


def test_a_stream_whose_server_is_lost_with_no_other_ends_with_the_error():
    async def scenario():
        failures = []

        async def emit(message):
            pass

        async def relocate(lost):
            return None

        models = TritonStreamModels(LosingGateway([], lose_after=2), SequenceIds(), 30.0, relocate, lambda g: None)
        session = StreamSession(StreamConfig(mode="online"), models, emit, failures.append)
        for _ in range(10):
            await session.push_audio(np.zeros(9600, dtype=np.int16).tobytes())
        await asyncio.wait_for(session.end(), 10)
        return failures

    failures = asyncio.run(scenario())
    assert len(failures) == 1 and isinstance(failures[0], TritonUnavailable)


def test_stream_without_audio_gets_one_empty_final():
    gateway = ScriptedGateway([])
    messages = _run_session(StreamConfig(mode="2pass", wav_name="x"), gateway, np.zeros(0, dtype=np.int16))
    assert messages == [{"mode": "2pass-offline", "text": "", "wav_name": "x", "is_final": True, "is_end": True}]
    assert gateway.requests == []
