"""Second-pass speed: Fun-ASR-Nano's LLM on vLLM's async engine vs the torch fallback vs
FunASR's FunASRNano inference one segment at a time.

With the full-size random Nano (`python -m twopass_asr.store.prepare --store .model_store-full
--random full`), C clients (C in --concurrency) each send their segments one after another,
as the Triton model serves them: prompt embeddings on one torch worker thread (the audio
encoder batched over the segments waiting together, as funasr_nano_vllm's SegmentBatcher
does; --embed-max-batch 1 encodes one segment at a time), then

  vllm   the AsyncLLM stream (requests of different clients batched by the engine),
         compiled as the CPU preset has it; vllm-eager the same with vllm_enforce_eager=true,
  torch  NanoRecognizer.generate_batch on the same single worker, over the segments waiting
         together (as the model's torch fallback; --torch-max-batch 1: one at a time),
  funasr FunASRNano.inference (what AutoModel.generate runs), one at a time, C=1 only, on a
         second copy of the model left as FunASR loads it (torch's own linear layers; the
         served recognizer packs its audio encoder's once, twopass_asr.kernels.prepacked_linear).

After the torch levels, one segment alone is timed part by part (preparing its audio, the audio
encoder, the prefill, each further token, beside the time a decode step's weights take to read
at the machine's measured memory rate), and one generate call over as many segments as each
level has clients is timed continuing from the prompts' cached opening (the chat text before
the audio, prefilled once: twopass_asr.second_pass.prompt_prefix) and prefilling the whole
prompts.

Latency is segment submitted -> last text delta; throughput is segments / wall time of the
level. Every engine decodes in --precision (auto: as funasr_nano_vllm resolves it on this
CPU; int8 is vLLM's W8A8 on vLLM and the compiled int8 kernel (activations per token) on torch,
bf16 on torch the compiled bf16 product, twopass_asr.second_pass.llm_on_torch, while FunASR,
which has no int8, runs in fp32); with another than fp32 it is also compared with fp32 (greedy
texts and teacher-forced tokens: of the torch path in that precision, and of vLLM's compiled
engine for int8). The served audio
encoder runs in --encoder-precision (auto: as funasr_nano_vllm resolves it, int8 on a CPU), compared
the same way with FunASR's float32 encoder. In-process (no tritonserver), so the numbers are the engines', not
gRPC's. A random model rarely emits EOS: every segment decodes --max-new-tokens tokens, by
default what a real transcript of that length has (perf.bench_args.REAL_SPEECH_TOKENS_PER_S).

    .venv/bin/python -m perf.bench_second_pass [--concurrency 1,4,8,16] [--precision auto] [--encoder-precision auto]
        [--max-new-tokens N] [--segments-per-client 3] [--segment-seconds 5] [--threads 2]
        [--embed-window-ms 10] [--embed-max-batch 16] [--torch-max-batch 16]
        [--vllm-modes compiled,eager]

Writes perf/results/second_pass.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perf.bench_args import REAL_SPEECH_TOKENS_PER_S
from perf.metrics import percentile
from twopass_asr import REPO_ROOT
from twopass_asr.audio import SAMPLE_RATE, pcm16_to_float
from twopass_asr.kernels.bf16_linear import CompiledBf16Linear
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.kernels.int8_recipe import INT8_PRECISIONS
from twopass_asr.kernels.layer_replacement import SharedInputSlice
from twopass_asr.kernels.prepacked_linear import PrepackedLinear
from twopass_asr.kernels.tokenwise_int8 import TokenwiseInt8Linear
from twopass_asr.second_pass.batcher import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS, PassWorker, SegmentBatcher
from twopass_asr.second_pass.native_decode import NativeDecoder
from twopass_asr.second_pass.precision import PRECISIONS, TORCH_DTYPES, resolve_precision
from twopass_asr.second_pass.recognizer import DEFAULT_MAX_NEW_TOKENS, NanoRecognizer, NanoRequest, generation_cap

DEFAULT_MODEL_DIR = REPO_ROOT / ".model_store-full" / "funasr_nano"
DEFAULT_OUT = REPO_ROOT / "perf" / "results"
# Issue 4's latency target is stated for 5 s segments.
DEFAULT_SEGMENT_SECONDS = 5.0


@dataclass
class Row:
    engine: str
    concurrency: int
    segments: int
    wall_s: float
    latencies_ms: list[float]

    @property
    def segments_per_s(self) -> float:
        return self.segments / self.wall_s


def make_segments(count: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    # Band-limited noise with a speech-like envelope: the random model's text is meaningless
    # anyway; what matters is the segment length (audio tokens in the prompt).
    rng = np.random.default_rng(seed)
    samples = int(seconds * 16000)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi, samples)) ** 2
    return [(rng.standard_normal(samples) * 4000 * envelope).astype(np.int16) for _ in range(count)]


@dataclass
class Setup:
    recognizer: NanoRecognizer
    embedder: SegmentBatcher
    generator: SegmentBatcher
    segment_seconds: float


async def run_level(engine_name, concurrency, per_client, setup: Setup, engine=None) -> Row:
    segments = make_segments(concurrency * per_client, setup.segment_seconds, seed=concurrency)
    latencies: list[float] = []

    async def one(pcm):
        start = time.perf_counter()
        embeds = await setup.embedder.submit(NanoRequest(pcm))
        if engine is not None:
            async with aclosing(engine.stream(embeds)) as deltas:
                async for _delta, _is_last in deltas:
                    pass
        else:
            await setup.generator.submit(embeds)
        latencies.append((time.perf_counter() - start) * 1000)

    async def client(index):
        for pcm in segments[index * per_client:(index + 1) * per_client]:
            await one(pcm)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return Row(engine_name, concurrency, len(segments), time.perf_counter() - start, latencies)


def at_least_one(text: str) -> int:
    """An argparse type: a count of segments, 1 or more (the baseline and the agreement
    figures are ratios over them)."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def run_funasr(recognizer, count: int, seconds: float, precision: str) -> Row:
    """FunASRNano.inference, the call AutoModel.generate makes, one segment at a time."""
    # FunASR casts the LLM to kwargs' llm_dtype (named as our precisions) on every call: the
    # same precision as the others.
    kwargs = dict(recognizer.kwargs, max_length=recognizer.max_new_tokens, llm_dtype=precision)
    latencies = []
    start = time.perf_counter()
    for index, pcm in enumerate(make_segments(count, seconds, seed=99)):
        begin = time.perf_counter()
        with torch.no_grad():
            recognizer.model.inference([pcm16_to_float(pcm)], key=[f"seg{index}"], **kwargs)
        latencies.append((time.perf_counter() - begin) * 1000)
    return Row("funasr", 1, count, time.perf_counter() - start, latencies)


def encoder_batching(recognizer: NanoRecognizer, plain: NanoRecognizer, batches: list[int],
                     seconds: float) -> list[str]:
    """Markdown lines: one audio encoder + adaptor pass over B segments against B passes of one
    (embed_prepared, what the model's SegmentBatcher calls), after one warm-up pass; and the
    one pass as FunASR runs it (`plain`: float32, torch's own linear layers)."""
    rows = [f"\nAudio encoder + adaptor alone ({recognizer.encoder_description}), {seconds:g} s segments:\n",
            "| segments | one pass ms | one by one ms | ratio | one pass as FunASR runs it ms | speed-up |",
            "|---|---|---|---|---|---|"]
    prepared = [recognizer.prepare(NanoRequest(pcm)) for pcm in make_segments(max(batches), seconds, seed=7)]
    recognizer.embed_prepared(prepared[:1])
    plain.embed_prepared(prepared[:1])

    def timed(recognizer, segments):
        begin = time.perf_counter()
        recognizer.embed_prepared(segments)
        return time.perf_counter() - begin

    for batch in batches:
        together = timed(recognizer, prepared[:batch])
        alone = sum(timed(recognizer, [segment]) for segment in prepared[:batch])
        together_plain = timed(plain, prepared[:batch])
        rows.append(f"| {batch} | {together * 1000:.0f} | {alone * 1000:.0f} | {alone / together:.2f}x "
                    f"| {together_plain * 1000:.0f} | {together_plain / together:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def prompt_opening_lines(recognizer: NanoRecognizer, precision: str, batches: list[int], seconds: float,
                         repeats: int = 3) -> list[str]:
    """Markdown lines: torch generation of B segments in one call continuing from the cached
    keys and values of the chat text the prompts open with (as served), against prefilling
    the whole prompts (the cache set aside), alternating, median of `repeats`."""
    from twopass_asr.second_pass.prompt_prefix import PromptPrefixCache

    rows = [f"\nTorch generation, LLM in {precision}, {seconds:g} s segments: the prompts' cached opening "
            f"against the whole prompt prefilled:\n",
            "| segments | prompt rows | opening rows | cached opening ms | whole prompt ms | saved ms | speed-up |",
            "|---|---|---|---|---|---|---|"]
    held = recognizer.prompt_prefixes
    for batch in batches:
        prompts = recognizer.embed_prepared([recognizer.prepare(NanoRequest(pcm))
                                             for pcm in make_segments(batch, seconds, seed=17)])
        opening = held.prefix_of(prompts)
        recognizer.generate_tokens(prompts)  # computes the opening's cache
        timings: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for cached in (True, False):
                recognizer.prompt_prefixes = held if cached else PromptPrefixCache(held.compute)
                begin = time.perf_counter()
                recognizer.generate_tokens(prompts)
                timings[cached].append((time.perf_counter() - begin) * 1000)
        recognizer.prompt_prefixes = held
        with_cache, whole = percentile(timings[True], 50), percentile(timings[False], 50)
        rows.append(f"| {batch} | {max(len(prompt) for prompt in prompts)} | {opening.rows if opening else 0} "
                    f"| {with_cache:.0f} | {whole:.0f} | {whole - with_cache:.0f} | {whole / with_cache:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 3) -> float:
    """This machine's memory read rate with torch's threads: the best of `repeats` sums over
    `gib` GiB of float32, far more than any cache holds."""
    values = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        values.sum()
        best = min(best, time.perf_counter() - begin)
    return values.numel() * 4 / best / 1e9


def decode_step_weight_bytes(llm: torch.nn.Module) -> int:
    """The bytes of weights a decode step reads: every linear layer's, in the precision it runs
    in (int8: one byte a weight; compiled bf16: two; the slices of a shared product together
    making it up; prepacked: float32), the output head included; the input embeddings give one
    row a step and are not counted."""
    total = 0
    for module in linear_layers_of(llm):
        layer = module.shared_layer if isinstance(module, SharedInputSlice) else module
        if isinstance(layer, (TokenwiseInt8Linear, CompiledBf16Linear)):
            per_weight = 1 if isinstance(layer, TokenwiseInt8Linear) else 2
            total += per_weight * module.in_features * module.out_features
        elif isinstance(module, PrepackedLinear):
            total += 4 * module.in_features * module.out_features
        else:
            total += module.weight.numel() * module.weight.element_size()
    return total


def linear_layers_of(llm: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's linear layers as decode_step_weight_bytes counts them: calling each once is
    calling every product once (a shared product runs in the first of its slices called)."""
    return [module for module in llm.modules() if isinstance(module, (TokenwiseInt8Linear, CompiledBf16Linear,
                                                                      SharedInputSlice, PrepackedLinear,
                                                                      torch.nn.Linear))]


def time_in_products(recognizer: NanoRecognizer, prompt: torch.Tensor, cap: int) -> float:
    """Seconds that generating `cap` tokens from `prompt` spends inside the LLM's linear layers
    (timed by hooks around each call)."""
    spent = [0.0]
    started: dict[int, float] = {}

    def before(module, _inputs):
        started[id(module)] = time.perf_counter()

    def after(module, _inputs, _output):
        spent[0] += time.perf_counter() - started.pop(id(module))

    hooks = [hook for layer in linear_layers_of(recognizer.model.llm)
             for hook in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))]
    try:
        recognizer.generate_tokens([prompt], [cap])
    finally:
        for hook in hooks:
            hook.remove()
    return spent[0]


def step_engines(recognizer: NanoRecognizer) -> list[tuple[str, object]]:
    """The decode-step engines segment_time_lines times, as (name, the recognizer's
    native_decoder for it): the C step where the recognizer has one (and where it reads a bf16
    head through its int8 screen, the C step reading the whole bf16 head), and HF's generate."""
    native = recognizer.native_decoder
    engines = [("C step", native)] if native is not None else []
    if native is not None and native.head_screen is not None:
        engines.append(("C step, whole bf16 head", NativeDecoder(recognizer.model.llm, screen_head=False)))
    return engines + [("HF generate", None)]


def segment_time_lines(recognizer: NanoRecognizer, precision: str, seconds: float, tokens: int,
                       repeats: int = 3) -> list[str]:
    """Markdown lines: where one segment's time goes alone on torch, as served (the prompt's
    opening cached): preparing the audio, the audio encoder + adaptor, the prefill with the
    first token, and each further token, medians of `repeats`, for each decode-step engine
    (step_engines: the C step, HF's generate over the same layers); of each further token in
    HF's steps, the time inside the LLM's linear layers (a separate run, timed by hooks; the C
    step has no hooks to time), and the time its weights take to read at this machine's
    measured memory read rate, the floor of a step that reads them all once."""
    pcm = make_segments(1, seconds, seed=23)[0]
    weight_bytes = decode_step_weight_bytes(recognizer.model.llm)
    bandwidth = read_bandwidth_gb_s()
    floor_ms = weight_bytes / bandwidth / 1e6
    rows = [f"\nOne {seconds:g} s segment alone on torch (LLM in {precision}, audio encoder in "
            f"{recognizer.encoder_description}, {tokens} tokens, the prompt's opening cached), medians of {repeats}; "
            f"a decode step reads {weight_bytes / 1e6:.0f} MB of weights, {floor_ms:.0f} ms at this machine's "
            f"measured read rate of {bandwidth:.1f} GB/s:\n",
            "| decode steps | prepare ms | audio encoder + adaptor ms | prefill + first token ms "
            "| each further token ms | of which in linear layers ms | weight-read floor per token ms | total ms |",
            "|---|---|---|---|---|---|---|---|"]
    served = recognizer.native_decoder
    try:
        for name, engine in step_engines(recognizer):
            recognizer.native_decoder = engine
            recognizer.generate_tokens([recognizer.prompt_embeds(pcm)], [tokens])  # warm-up; caches the opening
            timings: dict[str, list[float]] = {"prepare": [], "encode": [], "first": [], "all": []}
            for _ in range(repeats):
                begin = time.perf_counter()
                prepared = recognizer.prepare(NanoRequest(pcm))
                timings["prepare"].append(time.perf_counter() - begin)
                begin = time.perf_counter()
                prompt = recognizer.embed_prepared([prepared])[0]
                timings["encode"].append(time.perf_counter() - begin)
                for part, cap in (("first", 1), ("all", tokens)):
                    begin = time.perf_counter()
                    recognizer.generate_tokens([prompt], [cap])
                    timings[part].append(time.perf_counter() - begin)
            ms = {part: percentile(values, 50) * 1000 for part, values in timings.items()}
            per_token = (ms["all"] - ms["first"]) / max(1, tokens - 1)
            in_products = "-"
            if engine is None:
                spent = [time_in_products(recognizer, prompt, cap) for cap in (1, tokens)]
                in_products = f"{(spent[1] - spent[0]) * 1000 / max(1, tokens - 1):.1f}"
            rows.append(f"| {name} | {ms['prepare']:.0f} | {ms['encode']:.0f} | {ms['first']:.0f} | {per_token:.1f} "
                        f"| {in_products} | {floor_ms:.1f} | {ms['prepare'] + ms['encode'] + ms['all']:.0f} |")
    finally:
        recognizer.native_decoder = served
    print("\n".join(rows), flush=True)
    return rows


def agreement_lines(what: str, same_text: int, count: int, pairs: list[tuple[int, int]]) -> list[str]:
    same_token = sum(got == want for got, want in pairs)
    lines = [f"\nAgreement of {what}:\n",
             "| greedy texts equal | teacher-forced top-1 tokens equal |", "|---|---|",
             f"| {same_text}/{count} ({same_text / count:.0%}) | {same_token}/{len(pairs)} "
             f"({same_token / len(pairs):.1%}) |"]
    print("\n".join(lines), flush=True)
    return lines


def encoder_agreement(reference: NanoRecognizer, other: NanoRecognizer, count: int, seconds: float) -> list[str]:
    """Markdown lines: prompts from `other`'s audio encoder (int8) against `reference`'s (float32),
    both decoded by `reference`'s LLM: greedy texts equal, and the reference's greedy tokens
    ranked first when fed `other`'s prompt and the reference's tokens before each position."""
    pcms = make_segments(count, seconds, seed=13)
    prompts = [reference.prompt_embeds(pcm) for pcm in pcms]
    others = [other.prompt_embeds(pcm) for pcm in pcms]
    rows = reference.generate_tokens(prompts)
    same_text = sum(a == b for a, b in zip(reference.generate_batch(prompts), reference.generate_batch(others)))
    pairs = [(got, want) for prompt, row in zip(others, rows)
             for got, want in zip(reference.teacher_forced_tokens(prompt, row), row)]
    return agreement_lines(f"the {other.encoder_description} audio encoder with the fp32 one ({count} segments of "
                           f"{seconds:g} s, the same LLM)", same_text, count, pairs)


def teacher_forced_pairs(reference: NanoRecognizer, engine, run, prompts: list[torch.Tensor]
                         ) -> list[tuple[int, int]]:
    """(engine's top token, reference's greedy token) at every position of the reference's
    greedy rows, the engine fed the reference's tokens before it (VllmNanoEngine.next_tokens,
    awaited by `run`, on the engine's event loop)."""
    embed = reference.model.llm.model.get_input_embeddings()
    forced = [(torch.cat([prompt, embed(torch.tensor(row[:i], dtype=torch.long)).to(prompt.dtype)]), row[i])
              for prompt, row in zip(prompts, reference.generate_tokens(prompts)) for i in range(len(row))]
    chosen = run(engine.next_tokens([prompt for prompt, _ in forced]))
    return [(got, want) for got, (_, want) in zip(chosen, forced)]


async def engine_text(engine, embeds: torch.Tensor) -> str:
    async with aclosing(engine.stream(embeds)) as deltas:
        return "".join([delta async for delta, _is_last in deltas])


def precision_agreement(reference: NanoRecognizer, other, precision: str, count: int, seconds: float,
                        loop: asyncio.AbstractEventLoop | None = None, where: str = "torch") -> list[str]:
    """Markdown lines: `other` in `precision` (a NanoRecognizer, or with `loop` a vLLM engine)
    against `reference` (float32 torch) on the same segments: how many greedy texts are
    equal, and how many of the reference's greedy tokens `other` also ranks first when fed the
    reference's tokens (teacher forcing), which counts every position rather than stopping at
    the first difference. The random weights make both a lower bound of what trained ones give.
    where: how `other` runs, for the heading (vLLM with `loop`)."""
    prompts = [reference.prompt_embeds(pcm) for pcm in make_segments(count, seconds, seed=11)]
    texts = reference.generate_batch(prompts)
    if loop is None:
        rows = reference.generate_tokens(prompts)
        same_text = sum(other.generate(prompt) == text for prompt, text in zip(prompts, texts))
        pairs = [(got, want) for prompt, row in zip(prompts, rows)
                 for got, want in zip(other.teacher_forced_tokens(prompt, row), row)]
    else:
        same_text = sum(loop.run_until_complete(engine_text(other, prompt)) == text
                        for prompt, text in zip(prompts, texts))
        pairs = teacher_forced_pairs(reference, other, loop.run_until_complete, prompts)
        where = "vLLM"
    return agreement_lines(f"{precision} ({where}) with fp32 (torch, {count} segments of {seconds:g} s)", same_text,
                           count, pairs)


def write_results(rows: list[Row], out: Path, note: str, sections: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = ["engine", "concurrency", "segments", "segments_per_s", "p50_ms", "p95_ms"]
    table = [[r.engine, r.concurrency, r.segments, f"{r.segments_per_s:.3f}", f"{percentile(r.latencies_ms, 50):.0f}",
              f"{percentile(r.latencies_ms, 95):.0f}"] for r in rows]
    with open(out / "second_pass.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header] + table)
    lines = [f"# Second pass (Fun-ASR-Nano full-size random weights)\n\n{note}\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table]
    lines += sections
    (out / "second_pass.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r.engine for r in rows):
        mine = [r for r in rows if r.engine == name]
        xs = [r.concurrency for r in mine]
        left.plot(xs, [r.segments_per_s for r in mine], "o-", label=name)
        right.plot(xs, [percentile(r.latencies_ms, 50) for r in mine], "o-", label=f"{name} p50")
        right.plot(xs, [percentile(r.latencies_ms, 95) for r in mine], "x--", label=f"{name} p95")
    left.set(xlabel="concurrent clients", ylabel="segments / s", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="latency (ms)", title="segment latency")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "second_pass.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--torch-concurrency", default=None,
                        help="levels for the torch fallback (default: same as --concurrency; empty: skip it)")
    # Several per client: the clients fall out of step as a service's would; with one each,
    # the C segments arrive, encode and decode as one burst (perf/RESULTS.md, 2026-11-29 evening,
    # second pass in steady state).
    parser.add_argument("--segments-per-client", type=int, default=3)
    parser.add_argument("--segment-seconds", type=float, default=DEFAULT_SEGMENT_SECONDS)
    parser.add_argument("--funasr-segments", type=at_least_one, default=3)
    parser.add_argument("--agreement-segments", type=at_least_one, default=16,
                        help="segments on which a precision other than fp32 is compared with fp32")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per segment (default: a real transcript's for --segment-seconds, "
                             f"{REAL_SPEECH_TOKENS_PER_S} per second of audio)")
    parser.add_argument("--precision", choices=[p for p in PRECISIONS if p != "fp16"], default="auto")
    parser.add_argument("--encoder-precision", choices=INT8_PRECISIONS, default="auto",
                        help="the audio encoder and adaptor (auto: as funasr_nano_vllm resolves it on this CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embed-window-ms", type=float, default=DEFAULT_WINDOW_MS)
    parser.add_argument("--embed-max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--torch-max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--vllm-modes", default="compiled,eager",
                        help="vLLM engines to run, one after the other: compiled (the preset), eager "
                             "(vllm_enforce_eager=true: faster start, slower decoding)")
    parser.add_argument("--encoder-batches", default="1,8,16",
                        help="segment counts for the encoder-alone table (one pass vs one by one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (args.model_dir / "model.pt").is_file():
        sys.exit(f"{args.model_dir} has no model.pt; build it with: python -m twopass_asr.store.prepare "
                 "--store .model_store-full --random full")
    args.vllm_modes = [mode for mode in args.vllm_modes.split(",") if mode]
    if not set(args.vllm_modes) <= {"compiled", "eager"}:
        parser.error(f"--vllm-modes takes compiled and/or eager (none: '', torch only), got {args.vllm_modes!r}")
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.max_new_tokens is None:
        args.max_new_tokens = generation_cap(int(args.segment_seconds * SAMPLE_RATE), DEFAULT_MAX_NEW_TOKENS,
                                             REAL_SPEECH_TOKENS_PER_S)
    torch_levels = [int(x) for x in (args.concurrency if args.torch_concurrency is None
                                     else args.torch_concurrency).split(",") if x]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO_ROOT / ".cache" / "vllm"))

    from twopass_asr.second_pass.vllm_engine import EngineSettings, VllmNanoEngine

    precision = resolve_precision(args.precision, "cpu")
    # FunASR has no int8: with int8 it runs in its default, fp32.
    funasr_precision = "fp32" if precision == "int8" else precision
    recognizer = NanoRecognizer(args.model_dir, max_new_tokens=args.max_new_tokens,
                                encoder_precision=args.encoder_precision)
    funasr_model = NanoRecognizer(args.model_dir, max_new_tokens=args.max_new_tokens, prepack=False)
    if recognizer.encoder_precision != "fp32":
        # Both LLMs float32 still: the encoders' difference alone.
        encoder_sections = encoder_agreement(funasr_model, recognizer, args.agreement_segments, args.segment_seconds)
    else:
        encoder_sections = []
    funasr_model.use_dtype(TORCH_DTYPES[funasr_precision])
    worker = PassWorker(thread_name_prefix="nano")
    embedder = SegmentBatcher(recognizer.embed_prepared, worker, prepare=recognizer.prepare,
                              window_ms=args.embed_window_ms, max_batch=args.embed_max_batch)
    generator = SegmentBatcher(recognizer.generate_batch, worker, max_batch=args.torch_max_batch, priority=1)
    sections = encoder_sections + encoder_batching(recognizer, funasr_model,
                                                  [int(x) for x in args.encoder_batches.split(",")],
                                                  args.segment_seconds)
    rows: list[Row] = []
    setup = Setup(recognizer, embedder, generator, args.segment_seconds)
    if funasr_precision != "fp32":
        # The served recognizer is still float32 here (FunASR's runtime default).
        sections += precision_agreement(recognizer, funasr_model, funasr_precision, args.agreement_segments,
                                        args.segment_seconds, where="FunASR's model on torch")
    rows.append(run_funasr(funasr_model, args.funasr_segments, args.segment_seconds, funasr_precision))
    del funasr_model  # its memory, before vLLM starts its own copy of the LLM
    print(f"funasr: {rows[-1].segments_per_s:.3f} seg/s", flush=True)
    # int8 and bf16 on torch run on the compiled products (llm_on_torch), not FunASR's model.
    compiled_on_torch = bool(torch_levels) and precision in ("int8", "bf16")
    if precision == "int8" or compiled_on_torch:
        # The float32 reference for the agreements below, before the recognizer changes.
        reference = NanoRecognizer(args.model_dir, max_new_tokens=args.max_new_tokens)
    if torch_levels:
        # As served on torch; vLLM after it gets the prompts in float32 where the LLM was
        # replaced, cast to its dtype.
        recognizer.use_torch_generation(precision)
        if compiled_on_torch:
            sections += precision_agreement(reference, recognizer, precision, args.agreement_segments,
                                            args.segment_seconds, where="torch, as served")
    else:
        # As served: vLLM's int8 takes prompts built in bf16.
        recognizer.use_dtype(TORCH_DTYPES[precision])
    loop = asyncio.new_event_loop()
    for level in torch_levels:
        level_run = run_level("torch", level, args.segments_per_client, setup)
        rows.append(loop.run_until_complete(level_run))
        print(f"torch c={level}: {rows[-1].segments_per_s:.3f} seg/s", flush=True)
    if torch_levels:
        sections += segment_time_lines(recognizer, precision, args.segment_seconds, args.max_new_tokens)
        sections += prompt_opening_lines(recognizer, precision, torch_levels, args.segment_seconds)
    # The engine runs in a subprocess of its own; one engine at a time, one after another.
    for mode in args.vllm_modes:
        name = "vllm" if mode == "compiled" else f"vllm-{mode}"
        started = time.perf_counter()
        engine = VllmNanoEngine(recognizer, EngineSettings.from_parameters(
            "cpu", {"vllm_max_num_seqs": str(max(levels)), "vllm_enforce_eager": str(mode == "eager").lower()},
            precision))
        print(f"{name} engine started in {time.perf_counter() - started:.1f} s", flush=True)
        try:
            # Warm-up: the first request pays for lazy initialisation.
            loop.run_until_complete(run_level(name, 1, 1, setup, engine))
            if precision == "int8" and mode == "compiled":
                sections += precision_agreement(reference, engine, precision, args.agreement_segments,
                                                args.segment_seconds, loop)
            for level in levels:
                level_run = run_level(name, level, args.segments_per_client, setup, engine)
                rows.append(loop.run_until_complete(level_run))
                print(f"{name} c={level}: {rows[-1].segments_per_s:.3f} seg/s", flush=True)
        finally:
            engine.shutdown()
    note = (f"{cpu_summary()}. {args.segment_seconds:g} s segments, {args.max_new_tokens} new tokens each, "
            f"LLM in {precision} (precision {args.precision}; FunASR in {funasr_precision}), "
            f"audio encoder in {recognizer.encoder_description} (encoder precision {args.encoder_precision}; "
            f"FunASR's in fp32) "
            f"(vllm = compiled, vllm-eager = "
            f"vllm_enforce_eager; torch batches of up to "
            f"{args.torch_max_batch}: {dict(sorted(generator.batch_sizes.items()))}), "
            f"{args.segments_per_client} segment(s) per client, torch threads {args.threads}, "
            f"audio encoder batched over up to {args.embed_max_batch} waiting segments "
            f"({args.embed_window_ms:g} ms window; encoder passes by batch size: "
            f"{dict(sorted(embedder.batch_sizes.items()))}), "
            f"{os.cpu_count()} CPUs shared with other jobs. In-process (no tritonserver).")
    write_results(rows, args.out, note, sections)
    # The batchers' serving tasks wait for more segments: end them before the loop goes.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


if __name__ == "__main__":
    main()
