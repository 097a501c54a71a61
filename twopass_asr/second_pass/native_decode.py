"""Greedy generation for the torch int8 and bf16 LLMs (llm_on_torch, on the compiled kernels) in
C (twopass_asr/kernels/decode_step.c): the prompts' rows after their cached opening are
prefilled in one C pass, and each further token is one C step, over the same layers' weights.
The opening's cache is a C pass too (prefix_cache), once per prompt prefix.

A decode step of the torch int8 LLM on a 2-core AVX2 CPU spent about half its time in HF's
and torch's operations around its int8 products (about 7,000 calls a token) and most of the
rest in one-row products well above what reading the weights costs (perf/RESULTS.md,
2026-12-05, session 21). The C step makes one pass per layer: the norms, rotary embedding,
attention and the products, on the torch thread count. The prefill is the same pass over all
the prompts' rows at once (each attending the rows before it), which spares it HF's forward's
per-layer torch operations around the products (perf/RESULTS.md, session 27). Its products give
the layers' bits; its float arithmetic around them is torch's in another order, so its tokens
equal HF's where no two tokens are near a tie (the tests count both).

Used only where HF's generate would be plain greedy search (greedy_generation_config): any
other logits processing stays with generate. So a pass gives tokens, not logits: a bf16 head is
read through its int8 screen where the CPU allows one (decode_step.Bf16HeadScreen), which finds
the same tokens from half the head's bytes.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from twopass_asr.kernels.bf16_linear import CompiledBf16Linear
from twopass_asr.kernels.decode_step import (
    INPUT_STEP,
    Bf16HeadScreen,
    DecoderLayerStruct,
    HeadScreenStruct,
    ProjectionStruct,
    Qwen3ModelStruct,
    require_decode_step_library,
)
from twopass_asr.kernels.layer_replacement import SharedInputSlice
from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear
from twopass_asr.second_pass.drafts import DraftFollower, DraftTally, default_draft_rows, share_draft_rows

# Generation settings that leave HF's greedy search without logits processing (token ids, and
# sampling and output settings greedy search ignores).
GREEDY_NEUTRAL_SETTINGS = {"bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_k",
                           "top_p", "transformers_version", "_from_model_config", "max_length", "max_new_tokens",
                           "use_cache", "output_attentions", "output_hidden_states"}


def _projection(layer: torch.nn.Module, bf16: bool) -> ProjectionStruct:
    """The C projection of a layer on the compiled bf16 product (bf16) or int8 kernel."""
    if bf16 and isinstance(layer, CompiledBf16Linear) and layer.bias is None:
        return ProjectionStruct(bf16=layer.packed.struct)
    if not bf16 and isinstance(layer, TokenwiseInt8Linear) and layer.kernel == "compiled" and layer.bias is None:
        return ProjectionStruct(int8=layer.packed.struct)
    raise ValueError(f"the C decode step takes {'bf16' if bf16 else 'int8'} layers on the compiled kernel without "
                     f"bias, as the output head is, got {layer}")


def _stacked(module: torch.nn.Module, names: Sequence[str], bf16: bool) -> ProjectionStruct:
    """The one layer behind the fused slices `names` of `module`, checked to be them in order."""
    slices = [getattr(module, name) for name in names]
    if not all(isinstance(piece, SharedInputSlice) for piece in slices):
        raise ValueError(f"expected {', '.join(names)} fused into one product (llm_on_torch), got {slices}")
    layer = slices[0].shared_layer
    start = 0
    for piece in slices:
        if piece.shared_layer is not layer or piece.start != start:
            raise ValueError(f"{', '.join(names)} are not one product's consecutive slices")
        start = piece.stop
    if start != layer.out_features:
        raise ValueError(f"{', '.join(names)} do not cover their product's {layer.out_features} outputs")
    return _projection(layer, bf16)


def greedy_generation_config(llm: torch.nn.Module, extra_kwargs: dict) -> bool:
    """Whether HF's generate, with this LLM's generation config and `extra_kwargs`, is plain
    greedy search (no logits processing), which is all the C step reproduces."""
    config = llm.generation_config
    settings = set(config.to_diff_dict())
    return (not extra_kwargs and not config.do_sample and (config.num_beams or 1) == 1
            and settings <= GREEDY_NEUTRAL_SETTINGS)


class NativeDecoder:
    """The C prefill and decode steps over a Qwen3 causal LM made int8 or bf16 by llm_on_torch
    (whose layers' weights it reads; bf16 where its output head is)."""

    def __init__(self, llm: torch.nn.Module, screen_head: bool = True):
        """screen_head: read a bf16 head through an int8 screen where the CPU allows one
        (Bf16HeadScreen); the tokens are the same either way."""
        library = require_decode_step_library()
        config = llm.config
        if config.model_type != "qwen3" or getattr(config, "attention_bias", False) or config.hidden_act != "silu":
            raise ValueError(f"the C decode step runs Qwen3 without attention bias and with SiLU, got "
                             f"{config.model_type}")
        rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
        if rope.get("rope_type", "default") != "default" or getattr(config, "use_sliding_window", False):
            raise ValueError(f"the C decode step takes the default rotary embedding without sliding windows, "
                             f"got {rope}")
        self.llm = llm
        self.bf16 = isinstance(llm.lm_head, CompiledBf16Linear)
        self._library = library
        self.head_dim = config.head_dim
        self.kv_heads = config.num_key_value_heads
        self._float_tensors: list[torch.Tensor] = []
        layers = llm.model.layers
        self._layer_structs = (DecoderLayerStruct * len(layers))()
        for struct, layer in zip(self._layer_structs, layers):
            attention, mlp = layer.self_attn, layer.mlp
            struct.input_norm = self._floats(layer.input_layernorm.weight)
            struct.post_attention_norm = self._floats(layer.post_attention_layernorm.weight)
            struct.query_norm = self._floats(attention.q_norm.weight)
            struct.key_norm = self._floats(attention.k_norm.weight)
            struct.qkv = _stacked(attention, ("q_proj", "k_proj", "v_proj"), self.bf16)
            struct.output = _projection(attention.o_proj, self.bf16)
            struct.gate_up = _stacked(mlp, ("gate_proj", "up_proj"), self.bf16)
            struct.down = _projection(mlp.down_proj, self.bf16)
        base = rope["rope_theta"]
        inverse_frequencies = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self.model = Qwen3ModelStruct(
            layers=len(layers), hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, intermediate=config.intermediate_size, slots=0, capacity=0,
            norm_eps=config.rms_norm_eps, input_step=INPUT_STEP, bf16_products=self.bf16,
            inverse_frequencies=self._floats(inverse_frequencies), layer=self._layer_structs,
            final_norm=self._floats(llm.model.norm.weight), head=_projection(llm.lm_head, self.bf16))
        self.head_screen = None
        if screen_head and self.bf16 and Bf16HeadScreen.suits(llm.lm_head.packed):
            self.head_screen = Bf16HeadScreen(llm.lm_head.packed)
        self.model.screen = self.head_screen.struct if self.head_screen else HeadScreenStruct()
        self.vocabulary = llm.lm_head.out_features
        # The rows a pass may hold when it checks drafts, unless generate is told otherwise.
        self.draft_rows = default_draft_rows("bf16" if self.bf16 else "int8")

    def _floats(self, tensor: torch.Tensor) -> int:
        kept = tensor.detach().float().contiguous()
        self._float_tensors.append(kept)
        return kept.data_ptr()

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache, opening: int,
                 caps: Sequence[int], stops: set[int], drafts: Sequence[Sequence[int]] | None = None,
                 draft_rows: int | None = None, tally: DraftTally | None = None) -> list[list[int]]:
        """Greedy tokens of each row of inputs_embeds [rows, length, hidden] (float32), each up to
        and including its first stop token and no longer than its cap. attention_mask [rows,
        length] marks the real entries (the rest is padding); `cache`, an HF cache of the first
        `opening` rows (all real), or None with opening 0. Each row's last entry must be real and
        come after the opening (the prompts right-aligned, as generate_tokens lays them out).
        drafts: each row's draft token ids (drafts.py), whose tokens a step checks in the rows
        left of `draft_rows` (default self.draft_rows) after each row's next token; the tokens
        are the same with or without them. `tally` counts what the drafts did."""
        rows, length = attention_mask.shape
        if length <= opening or not bool(attention_mask[:, -1].all()):
            raise ValueError("the C prefill takes prompts right-aligned past the opening: every row's last entry "
                             "real and after it")
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)
        capacity = length + max(caps)
        model, caches = self._sequences(rows, capacity)
        if opening:
            for layer, (keys, values) in enumerate(caches):
                keys[:, :, :opening] = cache.layers[layer].keys[:, :, :opening]
                values[:, :, :opening] = cache.layers[layer].values[:, :, :opening]
        del cache
        valid = torch.zeros(rows, capacity, dtype=torch.uint8)
        valid[:, :length] = attention_mask.to(torch.uint8)
        # The prefill: every real entry after the opening, of all rows, in one pass; logits of
        # each row's last entry only.
        fresh = attention_mask.bool().clone()
        fresh[:, :opening] = False
        slots, indices = fresh.nonzero(as_tuple=True)
        last_entries = torch.cumsum(fresh.sum(-1), 0) - 1
        draft_rows = self.draft_rows if draft_rows is None else draft_rows
        followers = [DraftFollower(draft) for draft in drafts] if drafts is not None and draft_rows > 1 else None
        # Space for the widest pass: the prefill (every row has an entry in it), or a step; logits
        # for a step's rows (the prefill's are one a prompt).
        widest_step = max(rows, draft_rows if followers else 0)
        scratch = torch.empty(self._library.step_scratch_floats(ctypes.byref(model), max(len(slots), widest_step)))
        logits = torch.empty(widest_step, self.vocabulary)
        tokens = self._forward(model, inputs_embeds[slots, indices], slots, position_ids[slots, indices], indices,
                               valid, last_entries, scratch, logits)
        # Each row's last token goes next at this rotary position and cache index.
        next_positions = (position_ids[:, -1] + 1).tolist()
        generated = [[token] for token in tokens]
        active = [row for row in range(rows) if caps[row] > 1 and tokens[row] not in stops]
        embed_tokens = self.llm.model.get_input_embeddings()
        tally = DraftTally() if tally is None else tally
        while active:
            # A step: each active row's last token, then the draft tokens proposed after it (at
            # most what its cap leaves room for, and the rows left), each at the next position.
            checking = followers is not None and draft_rows > len(active)
            proposals = [followers[row].propose(generated[row], min(draft_rows, caps[row] - len(generated[row]) - 1))
                         if checking else [] for row in active]
            granted = share_draft_rows([len(proposed) for proposed in proposals], draft_rows,
                                       [followers[row].left if checking else 0 for row in active])
            proposals = [proposed[:count] for proposed, count in zip(proposals, granted)]
            fed, step_slots, step_positions, step_indices = [], [], [], []
            for row, proposed in zip(active, proposals):
                index = length + len(generated[row]) - 1
                fed += [generated[row][-1], *proposed]
                step_slots += [row] * (1 + len(proposed))
                step_positions += range(next_positions[row], next_positions[row] + 1 + len(proposed))
                step_indices += range(index, index + 1 + len(proposed))
            slots, indices = torch.tensor(step_slots), torch.tensor(step_indices)
            valid[slots, indices] = 1
            predicted = self._forward(model, embed_tokens(torch.tensor(fed)), slots, torch.tensor(step_positions),
                                      indices, valid, torch.arange(len(fed)), scratch, logits)
            tally.passes += 1
            offset = 0
            for row, proposed in zip(active, proposals):
                # The row's next token, then one more for every proposal that token confirms.
                kept = 0
                while True:
                    token = predicted[offset + kept]
                    generated[row].append(token)
                    if kept == len(proposed) or token != proposed[kept] or token in stops:
                        break
                    kept += 1
                tally.proposed += len(proposed)
                tally.accepted += kept
                # The rejected proposals' cache entries are no longer part of the sequence.
                index = length + len(generated[row]) - 1
                valid[row, index:index + len(proposed) - kept] = 0
                next_positions[row] += 1 + kept
                offset += 1 + len(proposed)
            active = [row for row in active if len(generated[row]) < caps[row] and generated[row][-1] not in stops]
        return generated

    def _sequences(self, rows: int, capacity: int) -> tuple[Qwen3ModelStruct, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The model's C structure for `rows` sequences of up to `capacity` entries, and each
        layer's key and value caches it points to ([rows, kv_heads, capacity, head_dim] each):
        a call's own copy of the structures, so that calls may overlap."""
        layer_structs = (DecoderLayerStruct * len(self._layer_structs))(*self._layer_structs)
        model = Qwen3ModelStruct.from_buffer_copy(self.model)
        model.layer, model.slots, model.capacity = layer_structs, rows, capacity
        caches = []
        for struct in layer_structs:
            keys = torch.empty(rows, self.kv_heads, capacity, self.head_dim)
            values = torch.empty_like(keys)
            struct.keys, struct.values = keys.data_ptr(), values.data_ptr()
            caches.append((keys, values))
        return model, caches

    @torch.no_grad()
    def prefix_cache(self, embeds: torch.Tensor):
        """The keys and values of `embeds` [rows, hidden] as one sequence, in an HF cache that
        generate continues from (a prompt prefix's, prompt_prefix). By the C prefill, so that a
        prompt continuing from them gets the bits it gets prefilled whole, as it is in a batch
        with prompts of other prefixes."""
        from transformers import DynamicCache

        rows = embeds.shape[0]
        model, caches = self._sequences(1, rows)
        entries = torch.arange(rows)
        self._forward(model, embeds.clone(), torch.zeros(rows, dtype=torch.int64), entries, entries,
                      torch.ones(1, rows, dtype=torch.uint8), entries[-1:],
                      torch.empty(self._library.step_scratch_floats(ctypes.byref(model), rows)),
                      torch.empty(1, self.vocabulary))
        cache = DynamicCache(config=self.llm.config)
        for layer, (keys, values) in enumerate(caches):
            cache.update(keys, values, layer)
        return cache

    def _forward(self, model: Qwen3ModelStruct, hidden: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 indices: torch.Tensor, valid: torch.Tensor, logit_rows: torch.Tensor, scratch: torch.Tensor,
                 logits: torch.Tensor) -> list[int]:
        """One qwen3_forward over the rows of `hidden` (row r: sequence slots[r] at rotary
        position positions[r], cache index indices[r]; the pass overwrites them where they are
        float32 already): the greedy token after each of `logit_rows`. scratch:
        step_scratch_floats for at least these rows; logits: room for the logits of logit_rows,
        [at least len(logit_rows), vocabulary] (through a head screen, its approximations outside
        the blocks it kept)."""
        hidden = hidden.float().contiguous()
        slots, positions, indices, logit_rows = (tensor.to(torch.int64).contiguous()
                                                 for tensor in (slots, positions, indices, logit_rows))
        tokens = torch.empty(len(logit_rows), dtype=torch.int64)
        self._library.qwen3_forward(ctypes.byref(model), len(hidden), hidden.data_ptr(), slots.data_ptr(),
                                    positions.data_ptr(), indices.data_ptr(), valid.data_ptr(), scratch.data_ptr(),
                                    len(logit_rows), logit_rows.data_ptr(), logits.data_ptr(), tokens.data_ptr(),
                                    torch.get_num_threads())
        return tokens.tolist()


__all__ = ["GREEDY_NEUTRAL_SETTINGS", "NativeDecoder", "greedy_generation_config"]
