"""Streaming FSMN-VAD batched across streams.

Per process_batch call: each stream's new audio becomes features (fbank -> LFR -> CMVN,
FunASR's WavFrontendOnline semantics via twopass_asr.streaming_fbank, leftovers kept per
stream), then ONE FSMN encoder forward scores the new frames of all streams together (on a
CPU in one C call, twopass_asr.vad.native_fsmn, else as torch's layers), then
each stream's segmentation state machine (FunASR's own FsmnVADStreaming methods, run on
that stream's cache and options) turns its scores into segment events. Per stream the
events equal, chunk for chunk, FunASR 1.4.16's
`AutoModel.generate(input=chunk, cache=cache, is_final=..., chunk_size=step_ms)` run for
that stream alone: FunASR cuts every chunk into step_ms slices and runs the state machine
once per slice, and so does this engine (only the features and the encoder are computed
for the whole chunk at once, which gives the same frames).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twopass_asr.audio import pcm16_to_float
from twopass_asr.funasr_classes import funasr_automodel
from twopass_asr.streaming_fbank import StreamingFeatures
from twopass_asr.vad.native_fsmn import NativeFsmnEncoder

# FunASR's websocket server feeds its VAD in 60 ms steps; segment times are this granular.
DEFAULT_VAD_STEP_MS = 60


@dataclass(frozen=True)
class VadOptions:
    """Per-stream knobs; None keeps the model's default (for end silence that is FunASR's
    dynamic end-silence schedule)."""

    max_end_silence_ms: int | None = None
    max_segment_ms: int | None = None
    energy_db: float | None = None

    def __post_init__(self):
        for name in ("max_end_silence_ms", "max_segment_ms"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 3_600_000:
                raise ValueError(f"{name} must be between 1 and 3600000 ms, got {value}")
        if self.energy_db is not None and not -200.0 <= self.energy_db <= 100.0:
            raise ValueError(f"energy_db must be between -200 and 100 dB, got {self.energy_db}")


@dataclass
class VadStream:
    options: VadOptions
    vad_opts: Any  # FunASR VADXOptions copy, so knobs never leak between streams
    # FunASR's streaming cache layout, except that "frontend" holds this engine's feature state.
    cache: dict = field(default_factory=dict)


def stream_vad_opts(model_opts: Any, options: VadOptions) -> Any:
    """A copy of the model's FunASR VADXOptions with this stream's knobs applied."""
    opts = copy.deepcopy(model_opts)
    if options.max_end_silence_ms is not None:
        opts.max_end_silence_time = options.max_end_silence_ms
    if options.max_segment_ms is not None:
        opts.max_single_segment_time = options.max_segment_ms
    if options.energy_db is not None:
        opts.decibel_thres = options.energy_db
    return opts


@dataclass
class _Step:
    """One step_ms slice of a chunk, as FunASR's inference loop cuts it."""

    feats: torch.Tensor  # (frames, feature_dim); frames may be 0
    waveform: torch.Tensor | None  # (1, samples) under those frames, for the decibels
    is_final: bool


@dataclass
class _ChunkPlan:
    steps: list[_Step]
    is_final: bool

    @property
    def frames(self) -> int:
        return sum(step.feats.shape[0] for step in self.steps)


class BatchedStreamingVad:
    """Streaming VAD for many streams; not thread-safe (one call at a time)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", step_ms: int = DEFAULT_VAD_STEP_MS):
        from funasr.frontends.wav_frontend import WavFrontendOnline
        from funasr.models.fsmn_vad_streaming.model import FsmnVADStreaming

        if not 0 < step_ms < 15000:
            # FunASR treats chunk_size >= 15000 ms as offline input, with other outputs.
            raise ValueError(f"step_ms must be between 1 and 14999, got {step_ms}")
        automodel = funasr_automodel(model_dir, device=device, disable_update=True, disable_pbar=True,
                                     disable_log=True)
        model = automodel.model
        if not isinstance(model, FsmnVADStreaming):
            raise ValueError(f"{model_dir} holds a {type(model).__name__}, not an FsmnVADStreaming VAD model")
        frontend = automodel.kwargs.get("frontend")
        if not isinstance(frontend, WavFrontendOnline):
            raise ValueError(f"{model_dir}: the VAD needs FunASR's WavFrontendOnline frontend, got "
                             f"{type(frontend).__name__}")
        for block in model.encoder.fsmn:
            if block.fsmn_block.conv_right is not None:
                # Right context would look past each step's end; FunASR zero-pads it per step,
                # which batching several steps into one forward would not reproduce.
                raise ValueError(f"{model_dir}: FSMN blocks with right context (rorder > 0) are not supported")
        if frontend.lfr_n != 1:
            raise ValueError(f"{model_dir}: the VAD frontend must have lfr_n 1, got {frontend.lfr_n}")
        self.model = model.eval()
        self.frontend = frontend
        self.features = StreamingFeatures(frontend)
        self.frame_samples = frontend.frame_sample_length
        self.shift_samples = frontend.frame_shift_sample_length
        self.lfr_context = (frontend.lfr_m - 1) // 2
        self.device = torch.device(device)
        self.step_ms = step_ms
        self.step_samples = int(step_ms * frontend.fs / 1000)
        self._default_opts = copy.deepcopy(model.vad_opts)
        self.native_encoder = NativeFsmnEncoder.for_encoder(model.encoder, self.device)

    def new_stream(self, options: VadOptions = VadOptions()) -> VadStream:
        return VadStream(options=options, vad_opts=stream_vad_opts(self._default_opts, options))

    def process(self, stream: VadStream, pcm: np.ndarray, is_final: bool) -> list[list[int]]:
        """Feed one chunk; returns segment events [[start_ms, end_ms]] with -1 for unknown."""
        return self.process_batch([stream], [pcm], [is_final])[0]

    def process_batch(self, streams: list[VadStream], chunks: list[np.ndarray],
                      finals: list[bool]) -> list[list[list[int]]]:
        return [events for events, _ in self.process_batch_with_scores(streams, chunks, finals)]

    @torch.no_grad()
    def process_batch_with_scores(self, streams: list[VadStream], chunks: list[np.ndarray],
                                  finals: list[bool]) -> list[tuple[list[list[int]], torch.Tensor]]:
        """Like process_batch, plus each stream's encoder output (softmax over the model's
        pdfs; shape (new_frames, pdfs)) for the frames this chunk completed."""
        if not len(streams) == len(chunks) == len(finals):
            raise ValueError(f"need one chunk and one final flag per stream, got {len(streams)} streams, "
                             f"{len(chunks)} chunks, {len(finals)} flags")
        if len({id(stream) for stream in streams}) != len(streams):
            raise ValueError("a stream appears twice in one batch; feed its chunks in separate calls")
        for index, chunk in enumerate(chunks):
            if np.ndim(chunk) != 1:
                raise ValueError(f"chunk {index}: expected 1-D PCM samples, got shape {np.shape(chunk)}")

        plans = [self._extract_features(s, c, bool(f)) for s, c, f in zip(streams, chunks, finals)]
        with_frames = [i for i, plan in enumerate(plans) if plan is not None and plan.frames > 0]
        scores: dict[int, torch.Tensor] = {}
        if with_frames:
            encode = self._encode if self.native_encoder is None else self.native_encoder.encode
            encoded = encode([torch.cat([step.feats for step in plans[i].steps]) for i in with_frames],
                             [streams[i].cache["encoder"] for i in with_frames])
            scores = dict(zip(with_frames, encoded))

        results = []
        for index, (stream, plan) in enumerate(zip(streams, plans)):
            stream_scores = scores.get(index, torch.empty(1, 0, self.model.encoder.output_dim))
            events = [] if plan is None else self._segment(stream, plan, stream_scores)
            results.append((events, stream_scores[0]))
        return results

    def _use_options(self, stream: VadStream) -> None:
        # FunASR's segmentation methods read the options from the model object; the engine
        # runs one stream at a time, so it lends the model this stream's copy.
        self.model.vad_opts = stream.vad_opts

    def _extract_features(self, stream: VadStream, pcm: np.ndarray, is_final: bool) -> _ChunkPlan | None:
        """FunASR's inference loop up to the encoder: the chunk (plus the previous leftover)
        is cut into step_ms slices, each fed to the streaming frontend. Feature frames do not
        depend on where the feed is cut, so the whole chunk goes through the frontend at once;
        the frames each slice would have completed are then counted from the samples fed."""
        samples = pcm16_to_float(pcm)
        cache = stream.cache
        self._use_options(stream)
        if not cache:
            self.model.init_cache(cache, **self._init_kwargs(stream))
        if samples.numel() == 0:
            return None  # FunASR returns no events and leaves the stream untouched

        audio = torch.cat((cache["prev_samples"], samples))
        n_steps = len(audio) // self.step_samples + int(is_final)
        leftover = 0 if is_final else len(audio) % self.step_samples
        fed = audio[:len(audio) - leftover]
        cache["prev_samples"] = audio[len(audio) - leftover:] if leftover > 0 else torch.empty(0)

        # FunASR's init_cache empties cache["frontend"] at the start and after a final chunk.
        state = cache["frontend"]
        if "features" not in state:
            state.update(features=self.features.new_state(), fed_samples=0, emitted_frames=0,
                         waveform=torch.empty(0))
        feats = self.features.extract(state["features"], fed, is_final)
        # state["waveform"] starts at the first sample of frame emitted_frames.
        waveform = torch.cat((state["waveform"], fed))
        base = state["emitted_frames"]
        emitted, fed_samples = base, state["fed_samples"]
        steps = []
        for i in range(n_steps):
            step_final = is_final and i == n_steps - 1
            fed_samples += min(self.step_samples, len(audio) - i * self.step_samples)
            fbank_frames = self.frontend.compute_frame_num(fed_samples, self.frame_samples, self.shift_samples)
            # The LFR window needs lfr_context frames to the right; the final slice pads them.
            ready = fbank_frames if step_final else max(0, fbank_frames - self.lfr_context)
            if ready > emitted:
                first, last = (emitted - base) * self.shift_samples, (ready - 1 - base) * self.shift_samples
                steps.append(_Step(feats[emitted - base:ready - base],
                                   waveform[first:last + self.frame_samples].unsqueeze(0), step_final))
            else:
                steps.append(_Step(feats[:0], None, step_final))
            emitted = ready
        if emitted - base != feats.shape[0]:
            raise RuntimeError(f"VAD frontend emitted {feats.shape[0]} frames where {emitted - base} were expected")
        state.update(fed_samples=fed_samples, emitted_frames=emitted,
                     waveform=waveform[(emitted - base) * self.shift_samples:])
        return _ChunkPlan(steps=steps, is_final=is_final)

    @staticmethod
    def _init_kwargs(stream: VadStream) -> dict:
        if stream.options.max_end_silence_ms is None:
            return {}
        return {"max_end_silence_time": stream.options.max_end_silence_ms}

    def _encode(self, feats: list[torch.Tensor], caches: list[dict]) -> list[torch.Tensor]:
        """One FSMN encoder forward over all streams' new frames (right-padded to the longest), as
        torch's layers (NativeFsmnEncoder computes the same in one C call).
        The encoder is causal, so padding never reaches a real frame; each stream's per-layer
        memory is cut at its own last real frame. Returns (1, frames_i, pdfs) per stream."""
        encoder = self.model.encoder
        lengths = torch.tensor([f.shape[0] for f in feats])
        batch = len(feats)
        x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(self.device)
        x = encoder.relu(encoder.in_linear2(encoder.in_linear1(x)))
        for block in encoder.fsmn:
            name = f"cache_layer_{block.stack_layer}"
            fsmn = block.fsmn_block
            memory = (fsmn.lorder - 1) * fsmn.lstride
            projected = block.linear(x).unsqueeze(1).permute(0, 3, 2, 1)  # (B, proj, T, 1)
            past = torch.cat([
                cache[name].to(self.device) if name in cache
                else torch.zeros(1, projected.shape[1], memory, 1, device=self.device)
                for cache in caches
            ])
            history = torch.cat((past, projected), dim=2)
            ends = (lengths.view(batch, 1) + torch.arange(memory)).to(self.device)
            new_past = history.gather(2, ends.view(batch, 1, memory, 1).expand(-1, projected.shape[1], -1, -1))
            for cache, stream_past in zip(caches, new_past.split(1)):
                cache[name] = stream_past
            memorised = (projected + fsmn.conv_left(history)).permute(0, 3, 2, 1).squeeze(1)
            x = block.relu(block.affine(memorised))
        out = encoder.out_linear2(encoder.out_linear1(x))
        if encoder.use_softmax:
            out = encoder.softmax(out)
        out = out.cpu()  # the state machine reads single scores; do it off the device
        return [out[i:i + 1, :length] for i, length in enumerate(lengths.tolist())]

    def _segment(self, stream: VadStream, plan: _ChunkPlan, scores: torch.Tensor) -> list[list[int]]:
        """FunASR's inference loop after the encoder, per step: the dynamic end-silence
        schedule, then forward()'s decibels, detection and event collection."""
        from funasr.models.fsmn_vad_streaming.model import DEFAULT_SILENCE_SCHEDULE, VadStateMachine

        model = self.model
        cache = stream.cache
        self._use_options(stream)
        dynamic_silence = stream.options.max_end_silence_ms is None
        speech_to_sil_ms = stream.vad_opts.speech_to_sil_time_thres
        accumulated_ms = cache.get("_dynamic_accumulated_ms", 0)
        in_speech = cache.get("_dynamic_in_speech", False)
        events: list[list[int]] = []
        offset = 0
        for step in plan.steps:
            if dynamic_silence:
                stats = cache["stats"]
                if stats.vad_state_machine == VadStateMachine.kVadInStateInSpeechSegment or in_speech:
                    accumulated_ms += self.step_ms
                    in_speech = True
                for limit_ms, silence_ms in DEFAULT_SILENCE_SCHEDULE:
                    if accumulated_ms <= limit_ms:
                        stats.max_end_sil_frame_cnt_thresh = max(silence_ms - speech_to_sil_ms, 0)
                        stats.speech_noise_thres = 0.5
                        break
                cache["_dynamic_accumulated_ms"] = accumulated_ms
                cache["_dynamic_in_speech"] = in_speech

            frames = step.feats.shape[0]
            if frames == 0:
                continue
            step_events = self._detect(cache, step, scores[:, offset:offset + frames])
            offset += frames
            if step_events:
                events.extend(step_events)
                if dynamic_silence:
                    accumulated_ms = 0
                    in_speech = False
                    cache["_dynamic_accumulated_ms"] = 0
                    cache["_dynamic_in_speech"] = False
        if plan.is_final:
            model.init_cache(cache)
        return events

    def _detect(self, cache: dict, step: _Step, scores: torch.Tensor) -> list[list[int]]:
        """FsmnVADStreaming.forward for one step, with the scores already computed."""
        model = self.model
        stats = cache["stats"]
        frames = scores.shape[1]
        stats.waveform = step.waveform
        model.ComputeDecibel(frame_count=frames, cache=cache)
        # What ComputeScores does besides running the encoder.
        model.vad_opts.nn_eval_block_size = frames
        stats.frm_cnt += frames
        stats.scores = scores if stats.scores is None else torch.cat((stats.scores, scores), dim=1)
        if step.is_final:
            model.DetectLastFrames(cache=cache)
        else:
            model.DetectCommonFrames(cache=cache)
        model.DropCachedFrames(stats.data_buf_start_frame, cache=cache)
        return self._new_events(stats)

    @staticmethod
    def _new_events(stats) -> list[list[int]]:
        """forward()'s streaming output: [start, -1] when a segment opens, [-1, end] when it
        closes, [start, end] when both happen within one call."""
        events = []
        for segment in stats.output_data_buf[stats.output_data_buf_offset:]:
            if not segment.contain_seg_start_point:
                continue
            if not stats.next_seg and not segment.contain_seg_end_point:
                continue
            start_ms = segment.start_ms if stats.next_seg else -1
            if segment.contain_seg_end_point:
                end_ms = segment.end_ms
                stats.next_seg = True
                stats.output_data_buf_offset += 1
            else:
                end_ms = -1
                stats.next_seg = False
            events.append([int(start_ms), int(end_ms)])
        return events
