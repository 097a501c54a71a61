"""First-pass streaming Paraformer computed for many streams in one batched forward pass.

Every stream's output equals, chunk for chunk, what FunASR 1.4.16 returns for that stream
alone from `AutoModel.generate(input=chunk, cache=cache, is_final=..., chunk_size=...,
encoder_chunk_look_back=..., decoder_chunk_look_back=...)`. The module weights are FunASR's
own (the model is loaded with AutoModel); the streaming orchestration is re-implemented so
that the chunks of all streams go through the encoder, the CIF predictor and the decoder
together:

- Each call's audio is cut into steps exactly as FunASR does (chunk_size[1] * 60 ms of
  samples per step, the remainder kept for the next call; a final step shorter than 60 ms
  re-encodes the cached overlap frames instead of new features). Streams needing several
  steps in one call run in successive batched rounds.
- Streams differ in chunk length, position, history length and options, so every batch
  tensor is padded on the right and masked: convolutions see zeros where FunASR pads with
  zeros, the CIF integrates padded frames with weight 0.
- A stream's results are the same bits alone or in any batch (which int8 needs: a last bit
  can cross a rounding step). The operations whose last bits would follow the batch's shape
  run per shape: attention over each stream's own queries and keys, the CIF's sigmoid per
  stream, its convolution as a linear layer over frame windows.
- Per-stream state (encoder key/value look-back per layer, overlap frames, CIF remainder,
  decoder FSMN memory and cross-attention look-back) is kept per stream, stacked into
  batch tensors at each step and split back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.fused_encoder import FusedInt8EncoderLayers
from twopass_asr.first_pass.native_layers import (
    NativeInt8Decoder,
    NativeInt8Encoder,
    StreamLookBack,
    native_auto_kernel,
)
from twopass_asr.first_pass.options import SAMPLES_PER_CHUNK_UNIT, DecodeOptions
from twopass_asr.funasr_classes import funasr_automodel
from twopass_asr.kernels.int8_linear import load_exported_int8_layers, stream_rows
from twopass_asr.kernels.int8_recipe import describe_int8, resolve_int8_setting, stays_float
from twopass_asr.kernels.prepacked_linear import prepack_linear_layers
from twopass_asr.kernels.tokenwise_int8 import TOKENWISE_KERNELS, replace_linear_layers
from twopass_asr.store.funasr_onnx_export import INT8_FILES, cached_paraformer_export, require_export
from twopass_asr.streaming_fbank import FeatureState, StreamingFeatures

# FunASR encodes a final step shorter than one chunk unit from the cached overlap frames only.
MIN_FINAL_STEP_SAMPLES = SAMPLES_PER_CHUNK_UNIT


@dataclass
class EncoderState:
    position: int  # frames fed so far: the next frame's sinusoidal position minus one
    overlap: torch.Tensor  # embedded frames re-fed at the start of the next chunk
    # Look-back keys and values (layers, heads, room, d_k), the first `history` frames of each head
    # this stream's; None before the first chunk. The native encoder updates them in place.
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    history: int = 0


@dataclass
class CifState:
    hidden: torch.Tensor  # (d,) weighted mean of the frames integrated since the last token
    weight: torch.Tensor  # () CIF weight integrated since the last token


@dataclass
class DecoderState:
    fsmn: torch.Tensor  # (layers, d, kernel - 1): last inputs of each layer's causal FSMN
    # Cross-attention look-back (layers, heads, room, d_k), as EncoderState's; the native decoder
    # updates them, and fsmn, in place.
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    history: int = 0


@dataclass
class StreamState:
    pending_samples: torch.Tensor  # samples short of a whole step, kept for the next call
    features: FeatureState
    encoder: EncoderState
    cif: CifState
    decoder: DecoderState


@dataclass
class BatchedParaformerStream:
    options: DecodeOptions
    state: StreamState


@dataclass
class _Step:
    """One step of one stream inside a batched round."""

    stream: BatchedParaformerStream
    samples: torch.Tensor | None  # None: final tail, re-encode the overlap frames
    is_final: bool
    tokens: list[str] = field(default_factory=list)


def _last(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x[..., -n:, ...] along `dim` with Python's slice semantics, where -0: keeps all;
    FunASR's caches rely on that for zero-sized chunk_size entries."""
    return x.narrow(dim, x.shape[dim] - n, n) if 0 < n < x.shape[dim] else x


def _concat_last(old: torch.Tensor, fresh: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """_last(torch.cat((old, fresh), dim), n, dim) copying only the frames kept."""
    old_len, fresh_len = old.shape[dim], fresh.shape[dim]
    drop = old_len + fresh_len - n if 0 < n < old_len + fresh_len else 0
    from_old = min(drop, old_len)
    from_fresh = drop - from_old
    return torch.cat((old.narrow(dim, from_old, old_len - from_old),
                      fresh.narrow(dim, from_fresh, fresh_len - from_fresh)), dim)


def _drop_last(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x[..., :-n, ...] with Python's slice semantics, where :-0 keeps nothing."""
    return x.narrow(dim, 0, max(x.shape[dim] - n, 0)) if n > 0 else x.narrow(dim, 0, 0)


def _window_linear(conv: torch.nn.Conv1d) -> torch.nn.Linear:
    """The CIF predictor's convolution over time as a linear layer over each frame's window of
    frames: a linear layer computes a row alike in any batch, where torch picks a
    convolution's kernel by the batch size and length, which moves the last bits of a
    stream's result with the streams batched beside it (as in _LookBackBuffer.attend)."""
    out_channels, in_channels, width = conv.weight.shape
    linear = torch.nn.Linear(in_channels * width, out_channels, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(out_channels, in_channels * width))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear.to(conv.weight.device)


def _look_back_in_place(state: EncoderState | DecoderState, fresh: int, kept: int, most: int,
                        shape: tuple[int, int, int], device: torch.device) -> StreamLookBack:
    """A native step's look-back over state's keys and values, which are made or grown (layers,
    heads, room, d_k) for `shape` (layers, heads, d_k) to hold its history, the `kept` frames it
    keeps and the `most` frames it may keep later, its history copied over when they grow."""
    room = max(kept, state.history, most)
    if state.keys is None or state.keys.shape[2] < room:
        layers, heads, d_k = shape
        keys, values = (torch.empty((layers, heads, room, d_k), device=device) for _ in range(2))
        if state.keys is not None:
            keys[:, :, :state.history] = state.keys[:, :, :state.history]
            values[:, :, :state.history] = state.values[:, :, :state.history]
        state.keys, state.values = keys, values
    return StreamLookBack(state.keys, state.values, state.history, fresh, kept)


class _LookBackBuffer:
    """Keys and values of every layer for one batched step: each stream's look-back history
    (right-padded to the longest) followed by the current chunk, written layer by layer.
    Shapes (layers, batch, heads, max_history + time, d_k). Each stream's queries are its
    first `query_lengths` rows (default: as many as its current frames, self-attention)."""

    def __init__(self, histories: list[tuple[torch.Tensor, torch.Tensor] | None], layers: int, heads: int, d_k: int,
                 current_valid: torch.Tensor, query_lengths: list[int] | None = None):
        batch, time = current_valid.shape
        device = current_valid.device
        self.history_lengths = [0 if h is None else h[0].shape[2] for h in histories]
        self.history = max(self.history_lengths, default=0)
        self.keys = torch.empty((layers, batch, heads, self.history + time, d_k), device=device)
        self.values = torch.empty_like(self.keys)
        for i, (history, length) in enumerate(zip(histories, self.history_lengths)):
            if history is not None:
                self.keys[:, i, :, :length] = history[0]
                self.values[:, i, :, :length] = history[1]
        current_lengths = current_valid.sum(dim=1).tolist()
        # Streams whose queries and keys have the same shapes attend together (see attend).
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, shape in enumerate(zip(self.history_lengths, current_lengths, query_lengths or current_lengths)):
            groups.setdefault(shape, []).append(i)
        self.groups = [(history, current, queries, torch.tensor(members, device=device))
                       for (history, current, queries), members in groups.items()]

    def write(self, layer: int, k_h: torch.Tensor, v_h: torch.Tensor) -> None:
        """Store this layer's current keys/values (batch, heads, time, d_k)."""
        self.keys[layer, :, :, self.history:] = k_h
        self.values[layer, :, :, self.history:] = v_h

    def attend(self, layer: int, q_h: torch.Tensor, d_k: int) -> torch.Tensor:
        """FunASR's scaled dot-product attention of q_h (batch, heads, queries, d_k) over the
        layer's written keys and values; (batch, queries, heads * d_k), zeros after each
        stream's queries.

        Each stream attends with exactly its own queries over exactly its own keys, never
        padding: padded keys, though masked, change how the sums over keys are split across
        vector lanes and kernel blocks, and the number of query rows changes the matrix
        product's kernel; either moves the last bits of the result, and in int8 those bits can
        cross a rounding step. So streams attend in groups of equal shapes, and a stream's
        result is the same bits alone or batched with any others."""
        keys, values = self.keys[layer], self.values[layer]
        batch, heads, time, _ = q_h.shape
        whole_batch = len(self.groups) == 1
        out = None
        for history, current, queries, members in self.groups:
            q, k, v = (q_h, keys, values) if whole_batch else (t.index_select(0, members) for t in (q_h, keys, values))
            if history != self.history:
                k, v = (torch.cat((t[:, :, :history], t[:, :, self.history:]), dim=2) for t in (k, v))
            q, k, v = q[:, :, :queries], k[:, :, :history + current], v[:, :, :history + current]
            weights = torch.softmax(torch.matmul(q * d_k ** (-0.5), k.transpose(-2, -1)), dim=-1)
            attended = torch.matmul(weights, v)
            if whole_batch:
                out = attended
            else:
                if out is None:
                    out = attended.new_zeros(batch, heads, time, d_k)
                out[members, :, :queries] = attended
        return out.transpose(1, 2).reshape(batch, time, heads * d_k)

    def history_of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.history_lengths[i]
        return self.keys[:, i, :, :n], self.values[:, i, :, :n]

    def current_of(self, i: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.keys[:, i, :, self.history: self.history + frames],
                self.values[:, i, :, self.history: self.history + frames])


class BatchedStreamingParaformer:
    """Streaming Paraformer over FunASR's weights; `process_batch` advances many streams in
    one batched forward pass."""

    default_options = DecodeOptions()

    def __init__(self, model_dir: str | Path, device: str = "cpu", linear_kernel: str | None = "auto",
                 precision: str = "fp32", int8_export: str | Path | None = None, int8_kernel: str = "auto"):
        """`linear_kernel`: the kernel whose packed layout the float32 linear weights get once
        at load (CPU only; twopass_asr.kernels.prepacked_linear.choose_kernel); None keeps torch's
        nn.Linear. `precision` "int8": the layers FunASR's int8 export quantizes run in int8, the
        others in float32, on `int8_kernel` (twopass_asr.kernels.int8_recipe.choose_int8_kernel;
        self.int8_kernel says which):
        - onnxruntime: as FunASR's int8 runtime runs them (twopass_asr.kernels.int8_linear), the
          export read from `int8_export` (twopass_asr.store.funasr_onnx_export), or made at the
          first load into the export cache and reused by later ones (cached_paraformer_export);
        - fbgemm, onednn, compiled: quantized at load, activations per token
          (twopass_asr.kernels.tokenwise_int8); the encoder's layers fused around torch's products
          on fbgemm and oneDNN (fused_encoder); on the compiled kernel the encoder's layers and the
          decoder's each in one native call (native_layers).
        "auto": int8 on a CPU, fp32 on a GPU (self.precision says which)."""
        self.precision, self.int8_kernel = resolve_int8_setting(
            precision, int8_kernel, device, auto_kernel=native_auto_kernel)
        automodel = funasr_automodel(model_dir, device=device, disable_update=True, disable_pbar=True,
                                     disable_log=True)
        self.model = automodel.model.eval()
        self.device = torch.device(device)
        self.features = StreamingFeatures(automodel.kwargs["frontend"])
        self.token_list = list(automodel.kwargs["tokenizer"].token_list)
        self._check_supported()
        if self.int8_kernel == "onnxruntime":
            self._load_int8_layers(model_dir, int8_export)
        elif self.int8_kernel in TOKENWISE_KERNELS:
            replace_linear_layers(self.model, lambda name: not stays_float(name), self.int8_kernel)
        self.cif_window_linear = torch.nn.Sequential(_window_linear(self.model.predictor.cif_conv1d))
        if linear_kernel is not None:
            prepack_linear_layers(self.model, linear_kernel)
            prepack_linear_layers(self.cif_window_linear, linear_kernel)

        encoder, decoder = self.model.encoder, self.model.decoder
        self.encoder_layers = list(encoder.encoders0) + list(encoder.encoders)
        # Per-token int8 layers take the native encoder and decoder (compiled kernel) or the fused
        # encoder (fbgemm, oneDNN) where their C code compiles.
        self.native_encoder = NativeInt8Encoder.for_layers(self.encoder_layers)
        self.fused_encoder = FusedInt8EncoderLayers.for_layers(self.encoder_layers)
        self.native_decoder = NativeInt8Decoder.for_decoder(decoder)
        self.d_model = encoder.output_size()
        self.input_scale = self.d_model ** 0.5
        attn = self.encoder_layers[0].self_attn
        self.encoder_heads, self.encoder_d_k = attn.h, attn.d_k
        cross = decoder.decoders[0].src_attn
        self.decoder_heads, self.decoder_d_k = cross.h, cross.d_k
        self.decoder_fsmn_memory = decoder.decoders[0].self_attn.kernel_size - 1
        self.skip_token_ids = {self.model.sos, self.model.eos, self.model.blank_id}

    @property
    def precision_description(self) -> str:
        """The precision, and its kernel in int8: "fp32", "int8 on fbgemm"."""
        return describe_int8(self.precision, self.int8_kernel)

    def _load_int8_layers(self, model_dir: str | Path, export_dir: str | Path | None) -> None:
        export = require_export(export_dir or cached_paraformer_export(model_dir), quantized=True)
        load_exported_int8_layers(self.model, [export / name for name in INT8_FILES], self._rows_read_by)

    @staticmethod
    def _rows_read_by(layer: str) -> str:
        """Which rows an int8 layer reads: encoder frames (the decoder's cross-attention
        projects them too) or decoder tokens."""
        return "frames" if layer.startswith("encoder.") or layer.endswith("src_attn.linear_k_v") else "tokens"

    def _check_supported(self) -> None:
        """The re-implemented streaming path covers the layer configuration of the released
        online Paraformer; anything else must fail loudly instead of decoding differently."""
        from funasr.models.paraformer.cif_predictor import CifPredictorV2
        from funasr.models.scama.encoder import SANMEncoderChunkOpt
        from funasr.models.transformer.embedding import StreamSinusoidalPositionEncoder

        model = self.model
        problems = []
        if type(model).__name__ != "ParaformerStreaming":
            problems.append(f"model is {type(model).__name__}, expected ParaformerStreaming")
        if not isinstance(model.encoder, SANMEncoderChunkOpt):
            problems.append(f"encoder is {type(model.encoder).__name__}, expected SANMEncoderChunkOpt")
        elif not isinstance(model.encoder.embed, StreamSinusoidalPositionEncoder):
            problems.append("encoder input layer must be 'pe_online'")
        elif not model.encoder.normalize_before or model.encoder.interctc_layer_idx:
            problems.append("encoder must be pre-norm without intermediate CTC")
        if not isinstance(model.predictor, CifPredictorV2):
            problems.append(f"predictor is {type(model.predictor).__name__}, expected CifPredictorV2")
        else:
            conv = model.predictor.cif_conv1d
            if (conv.stride, conv.padding, conv.dilation, conv.groups) != ((1,), (0,), (1,), 1):
                problems.append("the CIF convolution must have stride 1, no padding or dilation, one group")
        if type(model.decoder).__name__ != "ParaformerSANMDecoder":
            problems.append(f"decoder is {type(model.decoder).__name__}, expected ParaformerSANMDecoder")
        else:
            decoder = model.decoder
            # FunASR runs the FSMN-only decoders2 blocks only when there are more than one.
            if decoder.num_blocks - decoder.att_layer_num > 1:
                problems.append("decoder blocks without source attention (decoders2) are not supported")
            pad = decoder.decoders[0].self_attn.pad_fn.padding
            if pad[1] != 0 or pad[0] != decoder.decoders[0].self_attn.kernel_size - 1:
                problems.append(f"decoder FSMN must be causal (sanm_shfit = (kernel-1)/2), padding is {pad}")
            if not decoder.normalize_before or decoder.output_layer is None:
                problems.append("decoder must be pre-norm with an output layer")
        if model.normalize is not None:
            problems.append("feature normalisation inside the model is not supported")
        if getattr(model, "beam_search", None) is not None:
            problems.append("beam search decoding is not supported")
        if problems:
            raise ValueError("unsupported streaming Paraformer: " + "; ".join(problems))

    def new_stream(self, options: DecodeOptions = DecodeOptions()) -> BatchedParaformerStream:
        return BatchedParaformerStream(options=options, state=self._fresh_state(options))

    def _fresh_state(self, options) -> StreamState:
        c0, _, c2 = options.chunk_size
        decoder_layers = len(self.model.decoder.decoders)
        return StreamState(
            pending_samples=torch.empty(0),
            features=self.features.new_state(),
            encoder=EncoderState(position=0, overlap=torch.zeros((c0 + c2, self.features.dim), device=self.device)),
            cif=CifState(hidden=torch.zeros(self.d_model, device=self.device),
                         weight=torch.zeros((), device=self.device)),
            decoder=DecoderState(
                fsmn=torch.zeros((decoder_layers, self.d_model, self.decoder_fsmn_memory), device=self.device)),
        )

    def process(self, stream: BatchedParaformerStream, pcm: np.ndarray, is_final: bool) -> str:
        """Feed one chunk of any length; returns the text newly decoded by it."""
        return self.process_batch([stream], [pcm], [is_final])[0]

    @torch.inference_mode()
    def process_batch(self, streams: list[BatchedParaformerStream], chunks: list[np.ndarray],
                      finals: list[bool], trace: list | None = None) -> list[str]:
        """Advance every stream by its chunk in batched forward passes; returns each stream's
        new text. With `trace` (a list), each step appends {"stream", "encoder_out",
        "alphas", "tokens"} for inspection."""
        from funasr.utils.postprocess_utils import sentence_postprocess

        if not len(streams) == len(chunks) == len(finals):
            raise ValueError(f"got {len(streams)} streams, {len(chunks)} chunks and {len(finals)} final flags")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears more than once in one batch")

        plans = [self._plan_steps(s, pcm16_to_float(np.asarray(c).reshape(-1)), bool(f))
                 for s, c, f in zip(streams, chunks, finals)]
        for round_index in range(max((len(p) for p in plans), default=0)):
            self._run_steps([p[round_index] for p in plans if len(p) > round_index], trace)

        texts = []
        for stream, plan, is_final in zip(streams, plans, finals):
            text, _ = sentence_postprocess([token for step in plan for token in step.tokens])
            texts.append(text)
            if is_final:
                stream.state = self._fresh_state(stream.options)
        return texts

    def _plan_steps(self, stream: BatchedParaformerStream, samples: torch.Tensor, is_final: bool) -> list[_Step]:
        """FunASR's cut of a call's audio into steps (ParaformerStreaming.inference)."""
        audio = torch.cat((stream.state.pending_samples, samples))
        step = stream.options.step_samples
        n_steps = audio.shape[0] // step + int(is_final)
        steps = []
        for i in range(n_steps):
            last = is_final and i == n_steps - 1
            part = audio[i * step: (i + 1) * step]
            steps.append(_Step(stream, None if last and part.shape[0] < MIN_FINAL_STEP_SAMPLES else part, last))
        stream.state.pending_samples = torch.empty(0) if is_final else audio[n_steps * step:]
        return steps

    def _run_steps(self, steps: list[_Step], trace: list | None) -> None:
        inputs = [self._encoder_input(s) for s in steps]
        # A stream with chunk_size [0, n, 0] whose whole audio is a final call under 60 ms
        # has no frame to encode (FunASR raises there); it decodes nothing.
        steps, inputs = [s for s, x in zip(steps, inputs) if x.shape[0]], [x for x in inputs if x.shape[0]]
        if not steps:
            return
        lengths = torch.tensor([x.shape[0] for x in inputs], device=self.device)
        x = pad_sequence(inputs, batch_first=True)
        valid = torch.arange(x.shape[1], device=self.device)[None, :] < lengths[:, None]

        with stream_rows(frames=lengths.tolist()):
            encoder_out = self._encode(x, valid, lengths, steps)
        alphas, embeds = self._cif(encoder_out, valid, lengths, steps)
        token_scores = self._decode(encoder_out, valid, lengths, embeds, steps)

        for i, s in enumerate(steps):
            s.tokens = [self.token_list[t] for t in token_scores[i].argmax(dim=-1).tolist()
                        if t not in self.skip_token_ids]
            if trace is not None:
                n = int(lengths[i])
                trace.append({"stream": s.stream, "encoder_out": encoder_out[i, :n].clone(),
                              "alphas": alphas[i, :n].clone(), "token_scores": token_scores[i],
                              "tokens": list(s.tokens)})

    def _encoder_input(self, step: _Step) -> torch.Tensor:
        """Scaled, position-encoded frames preceded by the previous chunk's overlap frames."""
        enc = step.stream.state.encoder
        if step.samples is None:
            # FunASR scales its cached (already scaled and position-encoded) overlap frames
            # in place and encodes them as they are.
            return enc.overlap * self.input_scale
        feats = self.features.extract(step.stream.state.features, step.samples, step.is_final).to(self.device)
        if feats.shape[0] == 0:
            raise RuntimeError(f"a {step.samples.shape[0]}-sample step produced no feature frames; FunASR "
                               "cannot encode it either (chunk_size[1] too small?)")
        n = feats.shape[0]
        positions = torch.arange(enc.position + 1, enc.position + n + 1)[None, :]
        encoding = self.model.encoder.embed.encode(positions, feats.shape[1], feats.dtype).to(self.device)
        enc.position += n
        x = torch.cat((enc.overlap, feats * self.input_scale + encoding[0]))
        c0, _, c2 = step.stream.options.chunk_size
        enc.overlap = _last(x, c0 + c2, 0)
        return x

    def _encode(self, x, valid, lengths, steps) -> torch.Tensor:
        states = [s.stream.state.encoder for s in steps]
        keeps_keys = any(s.stream.options.encoder_look_back > 0 for s in steps)
        if self.native_encoder is not None:
            look_back = [self._native_look_back(s, enc, frames) for s, enc, frames in
                         zip(steps, states, lengths.tolist())] if keeps_keys else None
            x = self.native_encoder.encode(x, lengths, look_back)
            for enc, kept in zip(states, look_back or []):
                if kept is not None:
                    enc.history = kept.kept
            return self.model.encoder.after_norm(x)

        look_back = _LookBackBuffer(
            [None if e.keys is None else (e.keys[:, :, :e.history], e.values[:, :, :e.history]) for e in states],
            len(self.encoder_layers), self.encoder_heads, self.encoder_d_k, valid)
        if self.fused_encoder is not None:
            for index in range(len(self.encoder_layers)):
                x = self.fused_encoder.forward(index, x, lengths, look_back)
        else:
            valid_f = valid[..., None].to(x.dtype)
            for index, layer in enumerate(self.encoder_layers):
                x = self._encoder_layer(index, layer, x, valid_f, look_back)
        x = self.model.encoder.after_norm(x)

        for i, (s, enc) in enumerate(zip(steps, states)):
            history = s.stream.options.encoder_look_back
            if history == 0:
                continue
            _, c1, c2 = s.stream.options.chunk_size
            # FunASR keeps all but the last chunk_size[2] frames of this chunk's keys, and
            # trims the history to look_back chunks only from the second chunk on.
            fresh_k, fresh_v = (_drop_last(t, c2, 2) for t in look_back.current_of(i, int(lengths[i])))
            if enc.keys is None:
                enc.keys, enc.values = fresh_k.contiguous(), fresh_v.contiguous()
            else:
                old_k, old_v = look_back.history_of(i)
                enc.keys = _concat_last(old_k, fresh_k, history * c1, 2)
                enc.values = _concat_last(old_v, fresh_v, history * c1, 2)
            enc.history = enc.keys.shape[2]
        return x

    def _native_look_back(self, step: _Step, enc: EncoderState, frames: int) -> StreamLookBack | None:
        """A stream's look-back for the native encoder's step, kept as FunASR keeps it (see the
        torch path in _encode), its buffers made or grown to hold it. The native encoder writes
        what it keeps in place: no batch buffer is assembled and no history copied a step."""
        look_back = step.stream.options.encoder_look_back
        if look_back == 0:
            return None
        _, c1, c2 = step.stream.options.chunk_size
        fresh = len(range(frames)[:-c2])  # as _drop_last slices: with chunk_size[2] 0, none
        kept = fresh if enc.keys is None else min(look_back * c1, enc.history + fresh)
        return _look_back_in_place(enc, fresh, kept, look_back * c1,
                                   (len(self.encoder_layers), self.encoder_heads, self.encoder_d_k), self.device)

    def _native_decoder_look_back(self, step: _Step, dec: DecoderState, frames: int) -> StreamLookBack | None:
        """As _native_look_back, for the native decoder's cross-attention: FunASR keeps the last
        look-back chunks of its history and all of this step's frames (see the torch path in
        _decode)."""
        look_back = step.stream.options.decoder_look_back
        if look_back == 0:
            return None
        keep = look_back * step.stream.options.chunk_size[1]
        return _look_back_in_place(dec, frames, min(keep, dec.history + frames), keep,
                                   (len(self.model.decoder.decoders), self.decoder_heads, self.decoder_d_k),
                                   self.device)

    @staticmethod
    def _encoder_layer(index, layer, x, valid_f, look_back) -> torch.Tensor:
        """FunASR's SANM encoder layer over a padded batch (valid_f: 1.0 at each stream's frames,
        0.0 after them); FusedInt8EncoderLayers computes the same in int8 with fewer passes."""
        attn = layer.self_attn
        batch, time, _ = x.shape
        q, k, v = torch.split(attn.linear_q_k_v(layer.norm1(x)), attn.h * attn.d_k, dim=-1)
        v = v * valid_f  # FunASR's FSMN sees zeros after each stream's last frame
        fsmn = attn.fsmn_block(attn.pad_fn(v.transpose(1, 2))).transpose(1, 2) + v
        q_h, k_h, v_h = (t.reshape(batch, time, attn.h, attn.d_k).transpose(1, 2) for t in (q, k, v))
        look_back.write(index, k_h, v_h)
        attended = attn.linear_out(look_back.attend(index, q_h, attn.d_k)) + fsmn
        x = x + attended if layer.in_size == layer.size else attended
        return x + layer.feed_forward(layer.norm2(x))

    def _cif(self, encoder_out, valid, lengths, steps) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CifPredictorV2.forward_chunk for the batch: returns the raw per-frame weights and
        each stream's fired acoustic embeddings (tokens, d)."""
        predictor = self.model.predictor
        batch, time, d = encoder_out.shape
        hidden = encoder_out * valid[..., None].to(encoder_out.dtype)
        width = predictor.cif_conv1d.kernel_size[0]
        windows = predictor.pad(hidden.transpose(1, 2)).unfold(2, width, 1)  # (batch, d, time, width)
        conv = torch.relu(self.cif_window_linear(windows.transpose(1, 2).reshape(batch, time, d * width)))
        logits = predictor.cif_output(conv).squeeze(-1)
        # torch's vector loop and its scalar tail compute a sigmoid a few ulps apart, and which
        # frames fall in the tail follows the batch's shape: each stream's frames go alone.
        raw_alphas = torch.zeros_like(logits)
        for i, n in enumerate(lengths.tolist()):
            raw_alphas[i, :n] = torch.sigmoid(logits[i, :n])
        raw_alphas = torch.nn.functional.relu(raw_alphas * predictor.smooth_factor - predictor.noise_threshold)

        frame = torch.arange(time, device=self.device)
        keep = torch.zeros((batch, time), dtype=torch.bool, device=self.device)
        for i, s in enumerate(steps):
            c0, c1, _ = s.stream.options.chunk_size
            end = int(lengths[i]) if s.is_final else min(c0 + c1, int(lengths[i]))
            keep[i] = (frame >= c0) & (frame < end)
        alphas = raw_alphas.masked_fill(~keep, 0.0)

        # The remainder of the previous chunk leads; a final step ends with a zero frame
        # of weight tail_threshold. Padded frames carry weight 0, which never fires and
        # leaves the integration unchanged.
        cif = [s.stream.state.cif for s in steps]
        tail_weight = torch.tensor([predictor.tail_threshold if s.is_final else 0.0 for s in steps],
                                   device=self.device)
        seq_hidden = torch.cat((torch.stack([c.hidden for c in cif])[:, None], hidden,
                                torch.zeros((batch, 1, d), device=self.device)), dim=1)
        seq_alphas = torch.cat((torch.stack([c.weight for c in cif])[:, None], alphas, tail_weight[:, None]), dim=1)

        threshold = predictor.threshold
        integrated = torch.zeros(batch, device=self.device)
        frames = torch.zeros((batch, d), device=self.device)
        fired: list[list[torch.Tensor]] = [[] for _ in steps]
        for t in range(seq_alphas.shape[1]):
            alpha, h = seq_alphas[:, t], seq_hidden[:, t]
            fire = ~(alpha + integrated < threshold)
            if fire.any():
                emitted = frames + (threshold - integrated)[:, None] * h
                for i in fire.nonzero()[:, 0].tolist():
                    fired[i].append(emitted[i])
            integrated_next = integrated + alpha
            integrated = torch.where(fire, integrated_next - threshold, integrated_next)
            frames = torch.where(fire[:, None], integrated[:, None] * h, frames + alpha[:, None] * h)

        has_weight = integrated > 0.0
        remainder = torch.where(has_weight[:, None], frames / torch.where(has_weight, integrated, 1.0)[:, None],
                                frames)
        for i, c in enumerate(cif):
            c.weight, c.hidden = integrated[i].clone(), remainder[i].clone()
        embeds = [torch.stack(f) if f else torch.zeros((0, d), device=self.device) for f in fired]
        return raw_alphas, embeds

    def _decode(self, encoder_out, valid, lengths, embeds, steps) -> list[torch.Tensor]:
        """ParaformerSANMDecoder.forward_chunk for the streams that fired tokens: each step's
        log-probabilities (tokens, vocabulary). FunASR skips the decoder (and leaves its caches
        alone) for a chunk without tokens."""
        decoder = self.model.decoder
        token_scores = [torch.empty((0, decoder.output_layer.out_features)) for _ in steps]
        active = [i for i, e in enumerate(embeds) if e.shape[0] > 0]
        if not active:
            return token_scores
        memory, memory_valid = encoder_out[active], valid[active]
        n_tokens = [embeds[i].shape[0] for i in active]
        x = pad_sequence([embeds[i] for i in active], batch_first=True)
        active_steps = [steps[i] for i in active]
        dec_states = [s.stream.state.decoder for s in active_steps]
        frames = lengths[active].tolist()

        with stream_rows(frames=frames, tokens=n_tokens):
            if self.native_decoder is not None:
                look_back = [self._native_decoder_look_back(s, dec, n) for s, dec, n in
                             zip(active_steps, dec_states, frames)]
                x = self.native_decoder.decode(x, memory, lengths[active], n_tokens, [d.fsmn for d in dec_states],
                                               None if all(kept is None for kept in look_back) else look_back)
                for dec, kept in zip(dec_states, look_back):
                    if kept is not None:
                        dec.history = kept.kept
            else:
                x = self._torch_decoder_step(x, memory, memory_valid, n_tokens, active_steps, frames)
            log_probs = torch.log_softmax(decoder.output_layer(decoder.after_norm(x)), dim=-1)
        for j, i in enumerate(active):
            token_scores[i] = log_probs[j, :n_tokens[j]]
        return token_scores

    def _torch_decoder_step(self, x, memory, memory_valid, n_tokens, active_steps, frames) -> torch.Tensor:
        """The decoder's layers for the streams with tokens in torch (_decoder_layers), their
        FSMN inputs and look-back kept in their states as FunASR keeps them: the last layer's
        output."""
        dec_states = [s.stream.state.decoder for s in active_steps]
        fsmn_state = torch.stack([d.fsmn for d in dec_states], dim=1)  # (layers, batch, d, memory)
        histories = [None if d.keys is None else (d.keys[:, :, :d.history], d.values[:, :, :d.history])
                     for d in dec_states]
        look_back = _LookBackBuffer(histories, len(self.model.decoder.decoders), self.decoder_heads,
                                    self.decoder_d_k, memory_valid, n_tokens)
        x, fsmn_inputs = self._decoder_layers(x, memory, fsmn_state, look_back)
        for j, (s, dec) in enumerate(zip(active_steps, dec_states)):
            count = n_tokens[j]
            dec.fsmn = fsmn_inputs[:, j, :, count: count + self.decoder_fsmn_memory].contiguous()
            history = s.stream.options.decoder_look_back
            if history > 0:
                keep = history * s.stream.options.chunk_size[1]
                (old_k, old_v), (fresh_k, fresh_v) = look_back.history_of(j), look_back.current_of(j, frames[j])
                dec.keys = _concat_last(old_k, fresh_k, keep, 2)
                dec.values = _concat_last(old_v, fresh_v, keep, 2)
                dec.history = dec.keys.shape[2]
        return x

    def _decoder_layers(self, x, memory, fsmn_state, look_back) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's layers over a batch of tokens (NativeInt8Decoder computes the same in
        int8 in one call): the last layer's output and each layer's FSMN input (layers, batch, d,
        memory + max tokens)."""
        decoder = self.model.decoder
        layers = list(decoder.decoders)
        fsmn_inputs = []
        for index, layer in enumerate(layers):
            residual = x
            h = layer.norm2(layer.feed_forward(layer.norm1(x)))
            fsmn = layer.self_attn
            full = torch.cat((fsmn_state[index], h.transpose(1, 2)), dim=2)
            x = residual + (fsmn.fsmn_block(full).transpose(1, 2) + h)
            fsmn_inputs.append(full)

            cross = layer.src_attn
            batch, n, _ = x.shape
            q_h = cross.linear_q(layer.norm3(x)).reshape(batch, n, cross.h, cross.d_k).transpose(1, 2)
            k, v = torch.split(cross.linear_k_v(memory), cross.h * cross.d_k, dim=-1)
            k_h, v_h = (t.reshape(batch, -1, cross.h, cross.d_k).transpose(1, 2) for t in (k, v))
            look_back.write(index, k_h, v_h)
            x = x + cross.linear_out(look_back.attend(index, q_h, cross.d_k))
        for layer in decoder.decoders3:
            x = layer.feed_forward(layer.norm1(x))
        return x, torch.stack(fsmn_inputs)
