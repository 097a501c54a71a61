"""Segment recognition with FunASR's own FunASRNano, on plain torch generation.

The model is loaded once by funasr.AutoModel; each segment goes through the FunASRNano
object's own prompt building (get_prompt, generate_chatml) and feature extraction
(data_load_speech), its audio encoder and adaptor (several segments in one padded pass,
as FunASRNano.forward batches them), the audio embedding splice inference_prepare does,
then the LLM's greedy `generate` with the arguments FunASRNano.inference_llm uses (several
segments in one padded call, continuing from the cached keys and values of the chat text their
prompts open with: twopass_asr.second_pass.prompt_prefix). The text is therefore FunASR's
`AutoModel.generate(input=<float tensor>, hotwords=..., language=..., itn=...)` text, while
CTC timestamp alignment (which needs torchaudio, absent here) is never run.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from twopass_asr.audio import SAMPLE_RATE, pcm16_to_float
from twopass_asr.first_pass.native_layers import native_auto_kernel
from twopass_asr.funasr_classes import funasr_automodel
from twopass_asr.kernels.int8_linear import quantize_linear_layers, stream_rows
from twopass_asr.kernels.int8_recipe import describe_int8, resolve_int8_setting
from twopass_asr.kernels.prepacked_linear import prepack_linear_layers
from twopass_asr.kernels.tokenwise_int8 import TOKENWISE_KERNELS, replace_linear_layers
from twopass_asr.parameters import whole_number
from twopass_asr.second_pass.drafts import DRAFT_CHARACTERS_PER_TOKEN, DraftTally
from twopass_asr.second_pass.fused_audio_encoder import FusedAudioEncoder
from twopass_asr.second_pass.llm_on_torch import (bf16_llm_for_torch, llm_int8_kernel, quantize_llm_for_torch,
                                                   steps_run_in_c)
from twopass_asr.second_pass.native_decode import NativeDecoder, greedy_generation_config
from twopass_asr.second_pass.precision import TORCH_DTYPES
from twopass_asr.second_pass.prompt_prefix import PromptPrefixCache
from twopass_asr.store.nano_dir import validate_nano_dir

log = logging.getLogger("twopass_asr.second_pass")

NO_LANGUAGE = (None, "", "auto")
SILENCE_MARK = "/sil"


@dataclass(frozen=True)
class NanoRequest:
    """One segment to recognise: 16 kHz mono int16 PCM and the prompt options."""

    pcm: np.ndarray
    hotwords: Sequence[str] = field(default_factory=tuple)
    language: str | None = None
    itn: bool = True


@dataclass(frozen=True)
class PreparedSegment:
    """A segment's prompt before its audio is encoded: token ids (zeros where the audio
    embeddings go) and the audio's fbank features [frames, dim]."""

    source_ids: torch.Tensor
    fbank: torch.Tensor
    audio_start: int
    audio_tokens: int


# Overrides the max_new_tokens model parameter (benchmarks with random models, which never stop).
MAX_NEW_TOKENS_ENV = "TWOPASS_ASR_NANO_MAX_NEW_TOKENS"


# As funasr_nano_vllm's config.pbtxt sets it.
DEFAULT_MAX_NEW_TOKENS = 256


def max_new_tokens_setting(parameter: str | None, default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """The generation cap from $TWOPASS_ASR_NANO_MAX_NEW_TOKENS, else the model parameter."""
    value = os.environ.get(MAX_NEW_TOKENS_ENV) or parameter or str(default)
    return whole_number(value, f"max_new_tokens (parameter or ${MAX_NEW_TOKENS_ENV})")


# Overrides the max_new_tokens_per_second model parameter (benchmarks: a random model never
# stops, so it is cut where a real transcript of the segment's length would end).
MAX_NEW_TOKENS_PER_SECOND_ENV = "TWOPASS_ASR_NANO_MAX_NEW_TOKENS_PER_SECOND"


def tokens_per_second_setting(parameter: str | None) -> float | None:
    """The cap per second of audio from $TWOPASS_ASR_NANO_MAX_NEW_TOKENS_PER_SECOND, else the
    model parameter; None (empty) for no cap by length."""
    value = (os.environ.get(MAX_NEW_TOKENS_PER_SECOND_ENV) or parameter or "").strip()
    if not value:
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"max_new_tokens_per_second (parameter or ${MAX_NEW_TOKENS_PER_SECOND_ENV}) must be a "
                         f"positive number, got {value!r}")
    return rate


def generation_cap(samples: int, max_new_tokens: int, tokens_per_second: float | None) -> int:
    """The tokens a segment of `samples` (16 kHz) may generate: max_new_tokens, and with
    tokens_per_second no more than that many per second of its audio (at least one)."""
    if tokens_per_second is None:
        return max_new_tokens
    return min(max_new_tokens, max(1, math.ceil(tokens_per_second * samples / SAMPLE_RATE)))


class NanoRecognizer:
    """Fun-ASR-Nano on plain torch: `recognize` gives, for one segment, the text FunASR's
    AutoModel.generate gives for the same audio and prompt options.

    max_new_tokens caps generation; the directory's own cap (config.yaml `max_length`,
    FunASR's default 512) still applies, so the text never runs past what FunASR produces.
    tokens_per_second also caps each segment by its length (generation_cap).
    prepack packs the audio encoder's and adaptor's float32 linear weights once for a faster
    GEMM kernel (CPU only; see twopass_asr.kernels.prepacked_linear), and the LLM's when use_dtype makes
    it float32.
    encoder_precision: the audio encoder and adaptor in fp32 (as FunASR runs them), int8 (their
    linear layers quantized at load, each segment's activations on their own) or auto
    (int8 on a CPU); self.encoder_precision says which. encoder_int8_kernel: int8's kernel,
    onnxruntime (FunASR's int8 recipe, twopass_asr.kernels.int8_linear), fbgemm or onednn (per token,
    twopass_asr.kernels.tokenwise_int8) or auto, the one this CPU is fast with
    (twopass_asr.kernels.int8_recipe). self.encoder_int8_kernel says which (None in fp32).
    """

    def __init__(self, model_dir, device: str = "cpu", max_new_tokens: int | None = None, prepack: bool = True,
                 tokens_per_second: float | None = None, encoder_precision: str = "fp32",
                 encoder_int8_kernel: str = "auto", draft_rows: int | None = None):
        from funasr.models.fun_asr_nano.model import dtype_map

        model_dir = Path(model_dir)
        self.encoder_precision, self.encoder_int8_kernel = resolve_int8_setting(
            encoder_precision, encoder_int8_kernel, str(device), "encoder_int8_kernel", auto_kernel=native_auto_kernel)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        # Absolute paths for the LLM, its tokenizer and the CTC vocabulary, so a directory
        # whose configuration.json does not map them still loads without the hub.
        paths = validate_nano_dir(model_dir)
        overrides = {"llm_conf": {"init_param_path": str(paths["llm"])},
                     "tokenizer_conf": {"init_param_path": str(paths["llm"])}}
        if "ctc_vocab" in paths:
            overrides["dataset_conf"] = {"ctc_tokenizer_conf": {"vocab_path": str(paths["ctc_vocab"])}}
        auto = funasr_automodel(model_dir, device=device, disable_update=True, disable_pbar=True,
                                disable_log=True, **overrides)
        self.model = auto.model
        self.kwargs = dict(auto.kwargs)
        self.device = self.kwargs["device"]
        self._tokenizer = self.kwargs["tokenizer"]
        # FunASR's WavFrontend dithers by default (random noise per call): a training-time
        # augmentation that makes the same segment decode differently from call to call.
        self.kwargs["frontend"].dither = 0.0
        configured = int(self.kwargs.get("max_length", 512))
        self.max_new_tokens = configured if max_new_tokens is None else min(max_new_tokens, configured)
        self.tokens_per_second = tokens_per_second
        if draft_rows is not None and draft_rows < 1:
            raise ValueError(f"draft_rows must be at least 1, got {draft_rows}")
        # The rows a C decode pass may hold when it checks drafts (None: as the CPU suits).
        self.draft_rows = draft_rows
        # The precision FunASRNano.inference_llm decodes in (runtime kwargs, not llm_conf).
        llm_dtype = self.kwargs.get("llm_dtype", "fp32")
        if llm_dtype == "fp32":
            llm_dtype = "fp16" if self.kwargs.get("fp16", False) else llm_dtype
            llm_dtype = "bf16" if self.kwargs.get("bf16", False) else llm_dtype
        self.dtype = dtype_map[llm_dtype]
        self.model.llm = self.model.llm.to(self.dtype)
        self.prepack = prepack
        self._generation_released = False
        # The text each prompt opens with, prefilled once (prompt_prefix).
        self.prompt_prefixes = PromptPrefixCache(self._prefix_cache)
        # Prepacked or int8 linear layers fix the LLM's dtype from then on.
        self._llm_layers_replaced = False
        # The int8 LLM's decode steps in C (use_int8_generation), else HF's generate.
        self.native_decoder: NativeDecoder | None = None
        if self.encoder_int8_kernel in TOKENWISE_KERNELS:
            replace_linear_layers(self.model.audio_encoder, lambda name: True, self.encoder_int8_kernel)
            replace_linear_layers(self.model.audio_adaptor, lambda name: True, self.encoder_int8_kernel)
        elif self.encoder_int8_kernel == "onnxruntime":
            stacking = getattr(self.model.audio_adaptor, "k", 1)
            if stacking == 1:
                self._quantize_audio_layers()
            elif encoder_precision == "auto":
                log.warning("the audio adaptor stacks %d frames: its int8 layers are not supported, auto takes fp32",
                            stacking)
                self.encoder_precision, self.encoder_int8_kernel = "fp32", None
            else:
                raise ValueError(f"encoder precision int8 on onnxruntime needs an adaptor without frame stacking "
                                 f"(downsample_rate 1), this one stacks {stacking}")
        if prepack:  # what int8 left in float32
            prepack_linear_layers(self.model.audio_encoder)
            prepack_linear_layers(self.model.audio_adaptor)
        # The int8 encoder layers' per-row work in C where it applies (else FunASR's forward).
        self.fused_audio_encoder = FusedAudioEncoder.for_encoder(self.model.audio_encoder)
        self.llm_dir = paths["llm"]
        self.model_dir = model_dir

    @property
    def encoder_description(self) -> str:
        """The audio encoder's precision, and its kernel in int8: "fp32", "int8 on fbgemm"."""
        return describe_int8(self.encoder_precision, self.encoder_int8_kernel)

    def _quantize_audio_layers(self) -> None:
        """The audio encoder's and adaptor's linear layers in int8 on FunASR's recipe. Every one
        reads the encoder's frames (so the adaptor must not stack frames, as Fun-ASR-Nano's does
        not)."""
        quantize_linear_layers(self.model.audio_encoder, "frames")
        quantize_linear_layers(self.model.audio_adaptor, "frames")

    @torch.no_grad()
    def recognize(self, pcm: np.ndarray, hotwords: Iterable[str] = (), language: str | None = None,
                  itn: bool = True) -> str:
        """Text of one segment (16 kHz mono int16). language None/""/"auto" = no language
        in the prompt; hotwords are plain words (see twopass_asr.hotwords)."""
        embeds = self.prompt_embeds(pcm, hotwords, language, itn)
        return self.generate_batch([embeds], [self.generation_cap(len(pcm))])[0]

    def generation_cap(self, samples: int) -> int:
        """The tokens a segment of `samples` may generate here (see generation_cap)."""
        return generation_cap(samples, self.max_new_tokens, self.tokens_per_second)

    @torch.no_grad()
    def prompt_embeds(self, pcm: np.ndarray, hotwords: Iterable[str] = (), language: str | None = None,
                      itn: bool = True) -> torch.Tensor:
        """The LLM input of one segment, [tokens, hidden] in the LLM's dtype: FunASR's prompt
        (get_prompt, generate_chatml) with the audio embeddings spliced in, as
        FunASRNano.inference_prepare builds it. Both generation engines start from this."""
        return self.embed_prepared([self.prepare(NanoRequest(pcm, tuple(hotwords), language, itn))])[0]

    def prepare(self, request: NanoRequest) -> PreparedSegment:
        """The per-segment half of prompt_embeds: checks the audio and builds the prompt's
        token ids and fbank features (FunASRNano.data_load_speech). Raises ValueError for
        audio the model cannot take."""
        audio = pcm16_to_float(request.pcm)
        if audio.ndim != 1:
            raise ValueError(f"expected mono PCM (one dimension), got shape {tuple(audio.shape)}")
        if audio.numel() < 400:
            raise ValueError(f"segment too short: {audio.numel()} samples; Fun-ASR-Nano needs at "
                             "least 400 (one 25 ms fbank frame)")
        hotwords = [str(word) for word in request.hotwords]
        language = None if request.language in NO_LANGUAGE else str(request.language)
        model = self.model
        chat = model.generate_chatml(model.get_prompt(hotwords, language, bool(request.itn)), audio)
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("tokenizer", "frontend")}
        loaded = model.data_load_speech(model.data_template(chat), self._tokenizer, self.kwargs["frontend"],
                                        meta_data={}, **kwargs)
        # One user turn with one audio span: its start in the prompt and its placeholder count.
        return PreparedSegment(
            source_ids=loaded["source_ids"][0].clamp(min=0),
            fbank=loaded["speech"][0],
            audio_start=int(loaded["fbank_beg"][0, 0].clamp(min=0)),
            audio_tokens=int(loaded["fake_token_len"][0, 0].clamp(min=0)),
        )

    @torch.no_grad()
    def embed_prepared(self, segments: Sequence[PreparedSegment]) -> list[torch.Tensor]:
        """The batched half of prompt_embeds: one audio encoder pass over all the segments'
        fbank features (zero-padded to the longest; the encoder masks the padding), an adaptor
        pass over each segment's own rows, then each segment's audio embeddings spliced into its
        own prompt."""
        if not segments:
            return []
        device = self.device
        fbank = torch.nn.utils.rnn.pad_sequence([s.fbank for s in segments], batch_first=True).to(device)
        lengths = torch.tensor([len(s.fbank) for s in segments], dtype=torch.int32, device=device)
        # FunASR runs the encoder in float32 whatever the LLM's dtype (it has fp32-only ops).
        with stream_rows(frames=lengths.tolist()):
            encoded, encoded_lengths = (self.fused_audio_encoder or self.model.encode)(fbank, lengths)
        embed_tokens = self.model.llm.model.get_input_embeddings()
        prompts = []
        for index, segment in enumerate(segments):
            # The table may be stored in another dtype (release_generation_layers).
            prompt = embed_tokens(segment.source_ids.to(device)).to(self.dtype)
            if segment.audio_start > 0:
                # Alone: over a padded batch torch's attention sums in another order, so a
                # segment's prompt would depend on the segments it was batched with.
                rows = encoded_lengths[index:index + 1]
                with stream_rows(frames=[int(lengths[index])]):
                    adapted, adapted_lengths = self.model.audio_adaptor(encoded[index:index + 1, :int(rows)], rows)
                # inference_prepare copies audio_tokens rows, or the adaptor's whole output
                # when it is shorter (its fallback when the slice does not fit).
                count = min(segment.audio_tokens, int(adapted_lengths[0]))
                prompt[segment.audio_start:segment.audio_start + count] = adapted[0, :count]
                if not self._generation_released:
                    self.prompt_prefixes.remember(segment.source_ids[:segment.audio_start].tolist(),
                                                  prompt[:segment.audio_start])
            prompts.append(prompt)
        return prompts

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Decode (and build prompt embeddings) in `dtype` instead of the model's llm_dtype.
        With prepack, a float32 LLM also gets its linear weights prepacked (torch generation's
        decode steps multiply a few rows); its dtype is fixed from then on. Once the
        generation layers are released, only the prompts change dtype (the table stays)."""
        if self._generation_released:
            self.dtype = dtype
            return
        if self._llm_layers_replaced:
            if dtype != self.dtype:
                raise ValueError(f"the LLM's linear layers were replaced in {self.dtype} (prepacked or int8); it "
                                 f"cannot change to {dtype}")
            return
        self.dtype = dtype
        self.model.llm.to(dtype)
        if self.prepack and dtype == torch.float32:
            self._llm_layers_replaced = prepack_linear_layers(self.model.llm) > 0
        self.prompt_prefixes.clear()

    def use_int8_generation(self, native_steps: bool = True) -> None:
        """Generate on torch with the LLM's decoder projections and output head in int8
        (twopass_asr.second_pass.llm_on_torch), float32 elsewhere and for the prompts. CPU only;
        before use_dtype replaces the layers. native_steps: the prefill and each decode step one
        call into C (native_decode) where the layers are on the compiled kernel and generation
        is plain greedy search; else HF's generate runs them."""
        kernel = llm_int8_kernel()
        self._replace_generation_layers("int8", lambda llm: quantize_llm_for_torch(llm, kernel))
        # Without the compiled kernel (no C compiler) decode_step_library has said so already.
        if native_steps and kernel == "compiled":
            self._use_native_steps("int8")

    def use_bf16_generation(self, native_steps: bool = True) -> None:
        """Generate on torch with the LLM's decoder projections and output head on the compiled
        bf16 product (llm_on_torch): bf16 weights, float32 elsewhere and for the prompts. CPU
        only, where decode_step.c compiles (RuntimeError otherwise); before use_dtype replaces
        the layers. native_steps: as use_int8_generation's."""
        self._replace_generation_layers("bf16", bf16_llm_for_torch)
        if native_steps:
            self._use_native_steps("bf16")

    def use_torch_generation(self, precision: str) -> None:
        """Generate on torch in `precision` (resolved) the fastest way this machine has: int8 on
        its int8 layers, bf16 on a CPU on the compiled bf16 product where decode_step.c compiles,
        else (and in the other precisions) HF's model in that dtype."""
        if precision == "int8":
            self.use_int8_generation()
        elif precision == "bf16" and str(self.device) == "cpu" and steps_run_in_c():
            self.use_bf16_generation()
        else:
            self.use_dtype(TORCH_DTYPES[precision])

    def _replace_generation_layers(self, precision: str, replace: Callable[[torch.nn.Module], None]) -> None:
        if str(self.device) != "cpu":
            raise ValueError(f"{precision} generation on torch's compiled products runs on a CPU, not on "
                             f"{self.device}; on a GPU it runs on vLLM")
        if self._llm_layers_replaced:
            raise ValueError(f"the LLM's linear layers were already replaced in {self.dtype}")
        self._require_generation_layers()
        self.dtype = torch.float32
        self.model.llm.to(torch.float32)
        replace(self.model.llm)
        self._llm_layers_replaced = True
        self.prompt_prefixes.clear()

    def _use_native_steps(self, precision: str) -> None:
        if greedy_generation_config(self.model.llm, self.kwargs.get("llm_kwargs", {})):
            self.native_decoder = NativeDecoder(self.model.llm)
        else:
            log.warning("the %s LLM's decode steps run in HF's generate: its generation settings are not plain "
                        "greedy search, which is all the C step does", precision)

    def release_generation_layers(self, input_embeddings: torch.Tensor | None = None) -> None:
        """Free the LLM's decoder layers and output head, keeping the token embeddings the
        prompts are built from: for when another engine with its own copy of the LLM (vLLM)
        generates (perf/RESULTS.md, 2026-12-02, memory). input_embeddings: the same table
        to build prompts from instead of this model's own copy, in any dtype (a memory map of
        the engine's weights file, llm_export.mapped_input_embeddings). Generating here
        afterwards raises RuntimeError."""
        llm = self.model.llm
        if input_embeddings is not None:
            table = llm.model.get_input_embeddings()
            if input_embeddings.shape != table.weight.shape:
                raise ValueError(f"the token embeddings given are {list(input_embeddings.shape)}, the LLM's "
                                 f"{list(table.weight.shape)}")
            table.weight = torch.nn.Parameter(input_embeddings, requires_grad=False)
        llm.model.layers = torch.nn.ModuleList()
        llm.model.norm = torch.nn.Identity()
        llm.lm_head = None
        self.native_decoder = None
        self._generation_released = True
        self.prompt_prefixes.clear()

    def _require_generation_layers(self) -> None:
        if self._generation_released:
            raise RuntimeError("this recognizer's LLM layers were released (release_generation_layers): "
                               "the engine that holds them generates")

    def generate(self, embeds: torch.Tensor) -> str:
        """Greedy text for prompt_embeds' output, on torch, as FunASRNano.inference_llm runs it
        (one unpadded segment: data_load_speech's attention mask is all ones)."""
        return self.generate_batch([embeds])[0]

    def draft_ids(self, text: str, cap: int) -> list[int]:
        """A draft for generate_tokens from the first pass's text of a segment that generates up
        to `cap` tokens (drafts.py); none where no C decode step would check it."""
        if not self.draft_pass_rows or not text.strip():
            return []
        return self._tokenizer.encode(text[:cap * DRAFT_CHARACTERS_PER_TOKEN], add_special_tokens=False)

    @property
    def draft_pass_rows(self) -> int:
        """The rows a decode pass holds when it checks drafts; 0 where drafts are left aside (the
        decode steps not in C, or one row a pass)."""
        if self.native_decoder is None:
            return 0
        rows = self.native_decoder.draft_rows if self.draft_rows is None else self.draft_rows
        return rows if rows > 1 else 0

    def generate_batch(self, prompts: Sequence[torch.Tensor], caps: Sequence[int] | None = None,
                       drafts: Sequence[Sequence[int]] | None = None, tally: DraftTally | None = None) -> list[str]:
        """Greedy texts for several prompt_embeds outputs in one `generate` call: prompts are
        padded to the longest (after the cached opening they share, if any; generate_tokens) and
        the padding masked out. In float32 each text equals the segment's text alone; in half
        precision the padded shapes round differently and a near tie between two tokens can go
        the other way. caps: each prompt's token cap (default max_new_tokens). drafts, tally:
        as generate_tokens'."""
        rows = self.generate_tokens(prompts, caps, drafts, tally)
        if not rows:
            return []  # batch_decode([]) gives one empty text
        responses = self._tokenizer.batch_decode(rows, skip_special_tokens=self.kwargs.get("skip_special_tokens", True))
        return [clean_response(response) for response in responses]

    @torch.no_grad()
    def generate_tokens(self, prompts: Sequence[torch.Tensor], caps: Sequence[int] | None = None,
                        drafts: Sequence[Sequence[int]] | None = None,
                        tally: DraftTally | None = None) -> list[list[int]]:
        """generate_batch's greedy token ids, each row up to and including its stop token, and
        no longer than its cap (greedy decoding: the first tokens of a longer run are those of
        a shorter one). drafts: each prompt's draft (draft_ids), which the C decode steps check
        in passes of up to self.draft_rows rows (the tokens stay the same; HF's generate leaves
        them aside); `tally` counts what they did."""
        if not prompts:
            return []
        self._require_generation_layers()
        caps = [self.max_new_tokens] * len(prompts) if caps is None else caps
        llm = self.model.llm
        # The prompts continue from the cache of a held prefix they all open with, which sits
        # in the first rows of every sequence; the rest of each prompt is right-aligned after
        # it, padding between (the positions follow the mask).
        prefix = self.prompt_prefixes.prefix_of(prompts)
        opening = 0 if prefix is None else prefix.rows
        longest_rest = max(len(prompt) for prompt in prompts) - opening
        inputs_embeds = prompts[0].new_zeros(len(prompts), opening + longest_rest, prompts[0].shape[-1])
        attention_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.int32, device=inputs_embeds.device)
        inputs_embeds[:, :opening] = prompts[0][:opening]
        attention_mask[:, :opening] = 1
        for row, prompt in enumerate(prompts):
            start = opening + longest_rest - (len(prompt) - opening)
            inputs_embeds[row, start:] = prompt[opening:]
            attention_mask[row, start:] = 1
        cache = None if prefix is None else self.prompt_prefixes.cache_for(prefix, len(prompts))
        stops = stop_token_ids(llm.generation_config.eos_token_id)
        if self.native_decoder is not None:
            return self.native_decoder.generate(inputs_embeds, attention_mask, cache, opening, caps, stops, drafts,
                                                self.draft_rows, tally)
        cached = {} if cache is None else {"past_key_values": cache}
        pad_token_id = llm.config.pad_token_id or llm.config.eos_token_id
        with self._autocast():
            generated = llm.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max(caps),
                pad_token_id=pad_token_id,
                **cached,
                **self.kwargs.get("llm_kwargs", {}),
            )
        # A row that finished early is filled up with pad tokens; alone it would have stopped
        # at its end token (generation stops at the generation config's end tokens only).
        return [until_stop(row.tolist(), stops)[:cap] for row, cap in zip(generated, caps, strict=True)]

    @torch.no_grad()
    def _prefix_cache(self, embeds: torch.Tensor):
        """The LLM's cache of a prompt prefix ([rows, hidden]) as one sequence: by the C prefill
        where generation runs in C (the same bits as the prefix prefilled with the rest of a
        prompt), else by HF's forward."""
        from transformers import DynamicCache

        if self.native_decoder is not None:
            return self.native_decoder.prefix_cache(embeds)
        llm = self.model.llm
        cache = DynamicCache(config=llm.config)
        with self._autocast():
            llm(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    @torch.no_grad()
    def teacher_forced_tokens(self, prompt: torch.Tensor, tokens: Sequence[int]) -> list[int]:
        """The LLM's top-1 token at each position of `tokens`, fed the prompt and the given
        tokens before that position (one forward pass, in this recognizer's dtype). Against
        another precision's greedy tokens this counts every position where the two disagree,
        not only up to the first difference, as comparing greedy texts does."""
        if not tokens:
            return []
        self._require_generation_layers()
        llm = self.model.llm
        given = llm.model.get_input_embeddings()(torch.tensor(list(tokens[:-1]), device=prompt.device))
        inputs_embeds = torch.cat([prompt.to(self.dtype), given.to(self.dtype)])[None]
        with self._autocast():
            logits = llm(inputs_embeds=inputs_embeds).logits[0]
        return logits[len(prompt) - 1:].argmax(-1).tolist()

    def _autocast(self):
        from funasr.models.fun_asr_nano.device_utils import resolve_autocast_device_type

        return torch.autocast(device_type=resolve_autocast_device_type(self.device),
                              enabled=self.dtype != torch.float32, dtype=self.dtype)


def stop_token_ids(eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The token ids at which generation of a row stops (a generation config's eos_token_id)."""
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    return {token for token in ids if token is not None}


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The tokens up to and including the first stop token (all of them if none)."""
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index + 1]
    return tokens


def clean_response(response: str) -> str:
    """FunASRNano.inference_llm's post-processing of the decoded response."""
    return re.sub(r"\s+", " ", response.replace(SILENCE_MARK, " "))


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "MAX_NEW_TOKENS_ENV", "MAX_NEW_TOKENS_PER_SECOND_ENV", "NanoRecognizer",
           "NanoRequest", "PreparedSegment", "clean_response", "generation_cap", "max_new_tokens_setting",
           "stop_token_ids", "tokens_per_second_setting", "until_stop"]
