"""The batched streaming VAD gives, stream for stream and chunk for chunk, the segment events
and frame scores of FunASR's own per-stream streaming VAD (real FSMN-VAD weights)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from twopass_asr.audio import pcm16_to_float
from twopass_asr.kernels import row_kernels
from twopass_asr.speech_synth import ENGLISH_VOICE, MANDARIN_VOICE, speech_with_silences
from twopass_asr.store.model_store import bundled_vad_dir
from twopass_asr.vad.batched import DEFAULT_VAD_STEP_MS, BatchedStreamingVad, VadOptions, stream_vad_opts
from twopass_asr.vad.native_fsmn import fsmn_vad_library

torch.set_num_threads(1)

PHRASES = [
    ("jin1 tian1 tian1 qi4 hen3 hao3", MANDARIN_VOICE),
    ("please call me back when you get this message", ENGLISH_VOICE),
    ("wo3 men5 qu4 gong1 yuan2 san4 bu4 ba5", MANDARIN_VOICE),
    ("the meeting starts at nine", ENGLISH_VOICE),
]
KNOBS = [
    VadOptions(),
    VadOptions(max_end_silence_ms=500),
    VadOptions(max_end_silence_ms=250, max_segment_ms=1500),
    VadOptions(max_segment_ms=900, energy_db=-45.0),
    VadOptions(max_end_silence_ms=800, energy_db=-30.0),
]


@pytest.fixture(scope="module")
def recordings() -> list[np.ndarray]:
    """Several utterances with silences, clean and at different noise levels (dBFS)."""
    return [
        speech_with_silences([PHRASES[(i + k) % len(PHRASES)] for k in range(3)], gaps, noise_db=noise, seed=i)
        for i, (gaps, noise) in enumerate([
            ([300, 1300, 700, 500], None),
            ([900, 600, 1800, 200], -55.0),
            ([100, 1000, 400, 1500], -40.0),
            ([1200, 2200, 900, 0], -30.0),
        ])
    ]


@pytest.fixture(scope="module")
def engine() -> BatchedStreamingVad:
    engine = BatchedStreamingVad(bundled_vad_dir())
    assert engine.native_encoder is not None, "did fsmn_vad.c compile?"
    return engine


@pytest.fixture(scope="module")
def torch_layers_engine() -> BatchedStreamingVad:
    """The engine where the native encoder does not apply (no C compiler, a GPU): torch's layers."""
    engine = BatchedStreamingVad(bundled_vad_dir())
    engine.native_encoder = None
    return engine


@dataclass
class Reference:
    model: object  # funasr.AutoModel
    pristine_opts: object  # its VADXOptions as loaded


@pytest.fixture(scope="module")
def reference_model() -> Reference:
    from funasr import AutoModel

    model = AutoModel(model=str(bundled_vad_dir()), disable_update=True, disable_pbar=True, disable_log=True,
                      ncpu=torch.get_num_threads())
    return Reference(model, copy.deepcopy(model.model.vad_opts))


def reference_run(reference: Reference, options: VadOptions, chunks: list[np.ndarray], finals: list[bool]):
    """FunASR's generate() for one stream alone, as FunASR's own streaming examples call it;
    the model's options are this stream's (FunASR keeps them on the model object).
    Returns per chunk (events, encoder output for the new frames)."""
    model = reference.model
    model.model.vad_opts = stream_vad_opts(reference.pristine_opts, options)
    kwargs = {} if options.max_end_silence_ms is None else {"max_end_silence_time": options.max_end_silence_ms}
    captured = []
    hook = model.model.encoder.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        cache, out = {}, []
        for chunk, final in zip(chunks, finals):
            captured.clear()
            result = model.generate(input=pcm16_to_float(chunk), cache=cache, is_final=final,
                                    chunk_size=DEFAULT_VAD_STEP_MS, **kwargs)
            scores = torch.cat([c[0] for c in captured]) if captured else torch.empty(0, model.model.encoder.output_dim)
            out.append(([list(map(int, seg)) for seg in result[0]["value"]], scores))
        return out
    finally:
        hook.remove()


def random_chunks(rng: np.random.Generator, pcm: np.ndarray) -> list[np.ndarray]:
    """Chunk sizes a client may send: whole 60 ms steps, 600 ms, odd sizes, a few empty."""
    sizes = [960, 9600, 4000, 11, 1234, 0, 16000]
    chunks, at = [], 0
    while at < len(pcm):
        size = int(rng.choice(sizes))
        chunks.append(pcm[at:at + size])
        at += size
    return chunks


def make_streams(rng: np.random.Generator, recordings, count: int):
    streams = []
    for i in range(count):
        pcm = recordings[i % len(recordings)]
        begin = int(rng.integers(0, len(pcm) // 2))
        length = int(rng.integers(len(pcm) // 4, len(pcm) - begin + 1))
        streams.append({
            "options": KNOBS[int(rng.integers(len(KNOBS)))],
            "chunks": random_chunks(rng, pcm[begin:begin + length]),
            "start_tick": int(rng.integers(0, 6)),
        })
    return streams


def run_batched(engine, rng, streams, max_batch: int):
    """Streams join at their start tick; each tick a random subset (at most max_batch) of
    the open streams sends its next chunk, all in one batched call."""
    states = [engine.new_stream(s["options"]) for s in streams]
    next_chunk = [0] * len(streams)
    out = [[] for _ in streams]
    batch_sizes = []
    tick = 0
    while any(n < len(s["chunks"]) for n, s in zip(next_chunk, streams)):
        open_ = [i for i, s in enumerate(streams) if s["start_tick"] <= tick and next_chunk[i] < len(s["chunks"])]
        rng.shuffle(open_)
        batch = open_[:int(rng.integers(1, max_batch + 1))]
        if batch:
            chunks = [streams[i]["chunks"][next_chunk[i]] for i in batch]
            finals = [next_chunk[i] == len(streams[i]["chunks"]) - 1 for i in batch]
            results = engine.process_batch_with_scores([states[i] for i in batch], chunks, finals)
            for i, result in zip(batch, results):
                out[i].append(result)
                next_chunk[i] += 1
            batch_sizes.append(len(batch))
        tick += 1
    return out, batch_sizes


@pytest.mark.parametrize("encoder", ["native", "torch layers"])
@pytest.mark.parametrize("seed, count, max_batch", [(0, 6, 1), (1, 10, 4), (2, 16, 16)])
def test_batched_equals_per_stream_funasr(request, reference_model, recordings, encoder, seed, count, max_batch):
    """Each stream's events equal FunASR's for it alone, and its scores agree to float rounding,
    batched with others, with the encoder in one C call (native_fsmn) or as torch's layers."""
    engine = request.getfixturevalue("engine" if encoder == "native" else "torch_layers_engine")
    rng = np.random.default_rng(seed)
    streams = make_streams(rng, recordings, count)
    got, batch_sizes = run_batched(engine, rng, streams, max_batch)
    assert max(batch_sizes) <= max_batch
    if max_batch > 1:
        assert max(batch_sizes) > 1  # the schedule really batched

    events_seen = 0
    for index, stream in enumerate(streams):
        finals = [k == len(stream["chunks"]) - 1 for k in range(len(stream["chunks"]))]
        expected = reference_run(reference_model, stream["options"], stream["chunks"], finals)
        assert len(got[index]) == len(expected)
        for chunk_index, ((events, scores), (ref_events, ref_scores)) in enumerate(zip(got[index], expected)):
            where = f"stream {index} ({stream['options']}), chunk {chunk_index}"
            assert events == ref_events, where
            assert scores.shape == ref_scores.shape, where
            torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-7, msg=where)
            events_seen += len(events)
    assert events_seen >= count  # speech was found, so the comparison covered segmentation


def funasr_step_features(frontend, cache: dict, chunks, finals, step_samples: int):
    """Per chunk, the (features, waveform) FunASR's inference loop hands to forward() for
    each step_ms slice: the slices cut from leftover + chunk, each through the frontend."""
    from funasr.utils.load_utils import extract_fbank

    prev, out = torch.empty(0), []
    for chunk, final in zip(chunks, finals):
        audio = torch.cat((prev, pcm16_to_float(chunk)))
        n = len(audio) // step_samples + int(final)
        steps = []
        for i in range(n):
            feats, _ = extract_fbank([audio[i * step_samples:(i + 1) * step_samples]], frontend=frontend,
                                     cache=cache, is_final=final and i == n - 1, return_waveform=True)
            steps.append((feats.reshape(-1, 400), cache["aligned_waveforms"] if feats.numel() else None))
        leftover = 0 if final else len(audio) % step_samples
        prev = audio[len(audio) - leftover:] if leftover else torch.empty(0)
        out.append(steps)
        if final:
            cache.clear()
            prev = torch.empty(0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_are_bit_identical_to_funasr_frontend(engine, reference_model, recordings, seed, monkeypatch):
    """Whole-chunk feature extraction, re-cut into steps, gives exactly FunASR's per-step
    frontend output: the same frames and the same waveform samples under them."""
    rng = np.random.default_rng(seed)
    pcm = recordings[seed][: int(rng.integers(3000, 60000))]
    chunks = random_chunks(rng, pcm)
    chunks = [c for c in chunks if len(c)] + [pcm[:777]]  # a second utterance after the final
    finals = [False] * (len(chunks) - 2) + [True, True]
    expected = funasr_step_features(reference_model.model.kwargs["frontend"], {}, chunks, finals,
                                    engine.step_samples)
    plans = []

    def spy(*args):
        plans.append(extract(*args))
        return plans[-1]

    extract = engine._extract_features
    monkeypatch.setattr(engine, "_extract_features", spy)
    stream = engine.new_stream()
    for chunk, final in zip(chunks, finals):
        engine.process(stream, chunk, final)
    assert len(plans) == len(expected)
    for chunk_index, (plan, expected_steps) in enumerate(zip(plans, expected)):
        assert len(plan.steps) == len(expected_steps), chunk_index
        for step, (feats, waveform) in zip(plan.steps, expected_steps):
            assert torch.equal(step.feats, feats), chunk_index
            assert (step.waveform is None) == (waveform is None), chunk_index
            if waveform is not None:
                assert torch.equal(step.waveform, waveform), chunk_index


def test_final_then_reuse_matches_funasr(engine, reference_model, recordings):
    """FunASR resets a stream's cache on the final chunk but keeps it usable: feeding a
    second utterance afterwards gives the same events as FunASR's cache reuse."""
    first = [recordings[0][i:i + 9600] for i in range(0, len(recordings[0]), 9600)]
    second = [recordings[2][i:i + 4000] for i in range(0, len(recordings[2]), 4000)]
    chunks = first + second
    finals = [k == len(first) - 1 or k == len(chunks) - 1 for k in range(len(chunks))]
    for options in (VadOptions(), VadOptions(max_end_silence_ms=400)):
        stream, other = engine.new_stream(options), engine.new_stream(VadOptions(max_segment_ms=500))
        got = []
        for k, (chunk, final) in enumerate(zip(chunks, finals)):
            # Batched next to another stream that has other knobs, to show nothing leaks.
            got.append(engine.process_batch([stream, other], [chunk, chunks[-1 - k]], [final, False])[0])
        expected = [events for events, _ in reference_run(reference_model, options, chunks, finals)]
        assert got == expected
        assert sum(len(e) for e in got) >= 4


def test_empty_chunks_match_funasr(engine, reference_model, recordings):
    """An empty chunk yields nothing and changes nothing, an empty final one included."""
    pcm = recordings[1]
    empty = pcm[:0]
    chunks = [empty, pcm[:20000], empty, pcm[20000:], empty]
    finals = [False, False, False, False, True]
    stream = engine.new_stream()
    got = [engine.process(stream, c, f) for c, f in zip(chunks, finals)]
    expected = [events for events, _ in reference_run(reference_model, VadOptions(), chunks, finals)]
    assert got == expected


def test_bad_input_is_rejected(engine):
    stream = engine.new_stream()
    pcm = np.zeros(960, np.int16)
    with pytest.raises(ValueError, match="one chunk and one final flag per stream"):
        engine.process_batch([stream], [pcm, pcm], [False])
    with pytest.raises(ValueError, match="appears twice"):
        engine.process_batch([stream, stream], [pcm, pcm], [False, False])
    with pytest.raises(ValueError, match="int16"):
        engine.process(stream, pcm.astype(np.float32), False)
    with pytest.raises(ValueError, match="1-D"):
        engine.process(stream, pcm.reshape(2, -1), False)
    with pytest.raises(ValueError, match="max_end_silence_ms"):
        VadOptions(max_end_silence_ms=0)


def test_without_a_compiler_the_encoder_runs_as_torch_layers(recordings, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(row_kernels.CACHE_ENV, str(tmp_path / "cache"))
    fsmn_vad_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            engine = BatchedStreamingVad(bundled_vad_dir())
        assert engine.native_encoder is None
        assert any("fsmn_vad.c" in record.getMessage() and "no-such-compiler" in record.getMessage()
                   for record in caplog.records if record.levelno == logging.WARNING), caplog.text
        stream = engine.new_stream()
        assert engine.process(stream, recordings[0], True), "the speech gave no segment"
    finally:
        fsmn_vad_library.cache_clear()


def test_loading_keeps_the_callers_thread_count():
    """FunASR's AutoModel would set torch's process-wide thread count to 4."""
    before = torch.get_num_threads()
    BatchedStreamingVad(bundled_vad_dir())
    assert torch.get_num_threads() == before
