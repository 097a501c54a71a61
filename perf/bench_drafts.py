"""The second pass with drafts from the first pass (twopass_asr/second_pass/drafts.py), in-process:
how much of a segment's generation the C steps save when they check the first pass's tokens,
by how far the draft strays from the LLM's own text.

A random Nano's text has nothing to do with a random Paraformer's, so the drafts here are made
from each segment's own greedy tokens (generated first, without a draft), edited at a token
error rate: each token, at that rate, replaced by another, dropped, or followed by an extra one
(a third each), as a first pass's errors and the punctuation it lacks would. Rate 0 is the
bound (the draft is the text); "none" is generation without a draft. Every run's tokens are
checked against the run without a draft (they must be the same: the drafts change the passes,
not the tokens).

The LLM runs as served on a CPU (`--precision auto` resolved as funasr_nano_vllm does, on
torch's C steps); each segment is cut where a real transcript of its length would end
(perf.bench_args.REAL_SPEECH_TOKENS_PER_S). A pass holds up to --draft-rows rows (default: as
served on this CPU, drafts.default_draft_rows). Timed: the generation of each of --batch
segments alone from its prompt embeddings (the prompt's opening cached, as served), the mean
over them of the median of --repeats; and the generation of the --batch segments in one call,
median of --repeats.

    .venv/bin/python -m perf.bench_drafts [--seconds 3,5,10] [--error-rates 0,0.1,0.25,0.5]
        [--draft-rows N] [--batch 8] [--repeats 3]

Writes perf/results/drafts.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perf.bench_args import REAL_SPEECH_TOKENS_PER_S
from perf.bench_second_pass import DEFAULT_MODEL_DIR, DEFAULT_OUT, make_segments
from perf.metrics import percentile
from perf.plots import save_log_log_lines
from twopass_asr.audio import SAMPLE_RATE
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.second_pass.drafts import DraftTally
from twopass_asr.second_pass.precision import resolve_precision
from twopass_asr.second_pass.recognizer import DEFAULT_MAX_NEW_TOKENS, NanoRecognizer, NanoRequest, generation_cap

NO_DRAFT = "none"


def edited(tokens: list[int], rate: float, vocabulary: int, rng: np.random.Generator) -> list[int]:
    """`tokens` with each token, at `rate`, replaced, dropped or followed by another (a third each)."""
    draft = []
    for token in tokens:
        if rng.random() >= rate:
            draft.append(token)
            continue
        edit = rng.integers(3)
        if edit == 0:
            draft.append(int(rng.integers(vocabulary)))
        elif edit == 2:
            draft += [token, int(rng.integers(vocabulary))]
    return draft


@dataclass
class Row:
    seconds: float
    draft: str  # NO_DRAFT or the error rate
    tokens: int  # a segment's, the cap
    alone_ms: float
    batch_ms: float
    batch: int
    batch_passes: int
    accepted_share: float  # of the tokens after the prefill's
    same_tokens: bool

    def cells(self) -> list[str]:
        return [f"{self.seconds:g}", self.draft, str(self.tokens), f"{self.alone_ms:.0f}", f"{self.batch_ms:.0f}",
                f"{self.batch * 1000 / self.batch_ms:.2f}", str(self.batch_passes),
                f"{self.accepted_share:.2f}", "yes" if self.same_tokens else "NO"]


HEADER = ["segment s", "draft error rate", "tokens", "alone ms", "batch ms", "batch segments/s", "passes of the batch",
          "tokens from the draft", "same tokens"]


def measure(recognizer: NanoRecognizer, seconds: float, rates: list[float], batch: int, repeats: int,
            seed: int) -> list[Row]:
    samples = int(seconds * SAMPLE_RATE)
    cap = generation_cap(samples, DEFAULT_MAX_NEW_TOKENS, REAL_SPEECH_TOKENS_PER_S)
    segments = make_segments(batch, seconds, seed=seed)
    prompts = recognizer.embed_prepared([recognizer.prepare(NanoRequest(pcm)) for pcm in segments])
    caps = [cap] * batch
    plain = recognizer.generate_tokens(prompts, caps)  # also caches the prompts' opening
    vocabulary = recognizer.native_decoder.vocabulary
    rng = np.random.default_rng(seed)
    rows = []
    for draft_name in [NO_DRAFT] + [f"{rate:g}" for rate in rates]:
        drafts = None if draft_name == NO_DRAFT else [edited(row, float(draft_name), vocabulary, rng) for row in plain]
        alone_ms, tally, same = [], DraftTally(), True
        for index in range(batch):
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                tokens = recognizer.generate_tokens([prompts[index]], [cap],
                                                    None if drafts is None else [drafts[index]])
                times.append(time.perf_counter() - begin)
                same &= tokens == [plain[index]]
            alone_ms.append(percentile(times, 50) * 1000)
        batch_times = []
        for repeat in range(repeats):
            begin = time.perf_counter()
            tokens = recognizer.generate_tokens(prompts, caps, drafts, tally if repeat == 0 else None)
            batch_times.append(time.perf_counter() - begin)
            same &= tokens == plain
        batch_ms = percentile(batch_times, 50) * 1000
        after_prefill = sum(len(row) - 1 for row in plain)
        rows.append(Row(seconds, draft_name, cap, float(np.mean(alone_ms)), batch_ms, batch, tally.passes,
                        tally.accepted / max(1, after_prefill), same))
        print("| " + " | ".join(rows[-1].cells()) + " |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--precision", default="auto", help="the LLM's, on torch's C steps: int8, bf16 or auto")
    parser.add_argument("--seconds", default="3,5,10", help="segment lengths, comma-separated")
    parser.add_argument("--error-rates", default="0,0.1,0.25,0.5", help="draft token error rates, comma-separated")
    parser.add_argument("--draft-rows", type=int, default=None,
                        help="rows a pass may hold (default: as served on this CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (args.model_dir / "model.pt").is_file():
        sys.exit(f"{args.model_dir} has no model.pt; build it with: python -m twopass_asr.store.prepare "
                 "--store .model_store-full --random full")
    try:
        seconds = [float(x) for x in args.seconds.split(",")]
        rates = [float(x) for x in args.error_rates.split(",")]
    except ValueError:
        parser.error("--seconds and --error-rates take comma-separated numbers")
    if min(seconds) <= 0 or not all(0 <= rate <= 1 for rate in rates) or args.batch < 1 or args.repeats < 1 or (
            args.draft_rows is not None and args.draft_rows < 1):
        parser.error("--seconds must be positive, --error-rates within 0-1, --batch, --repeats and --draft-rows at "
                     "least 1")
    torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, "cpu")
    if precision not in ("int8", "bf16"):
        parser.error(f"drafts are checked by torch's C steps, in int8 or bf16; --precision {args.precision} is "
                     f"{precision}")
    recognizer = NanoRecognizer(args.model_dir, encoder_precision="auto", draft_rows=args.draft_rows)
    recognizer.use_torch_generation(precision)
    if recognizer.native_decoder is None:
        sys.exit("the C decode steps did not load (no C compiler?): drafts need them")
    context = (f"{cpu_summary()}; LLM in {precision} on torch's C steps, passes of up to "
               f"{recognizer.draft_pass_rows} rows, "
               f"{REAL_SPEECH_TOKENS_PER_S} tokens a second of audio, {args.threads} threads")
    print(context + "\n\n| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    rows = [row for index, length in enumerate(seconds)
            for row in measure(recognizer, length, rates, args.batch, args.repeats, seed=31 + index)]
    write_results(rows, args.out, context, seconds, rates)


def write_results(rows: list[Row], out: Path, context: str, seconds: list[float], rates: list[float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "drafts.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([HEADER] + [row.cells() for row in rows])
    lines = ["# The second pass with drafts from the first pass\n", context + "\n",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    (out / "drafts.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out / 'drafts.md'}")
    # x: the drafts' error rate (no draft drawn at 1, where a draft tells nothing); one line per
    # segment length, the time of a segment alone.
    positions = [max(rate, 0.01) for rate in rates]
    series = {}
    for length in seconds:
        mine = {row.draft: row.alone_ms for row in rows if row.seconds == length}
        series[f"{length:g} s, draft"] = [mine[f"{rate:g}"] for rate in rates]
        series[f"{length:g} s, none"] = [mine[NO_DRAFT]] * len(rates)
    save_log_log_lines(out / "drafts.png", positions, series, xlabel="draft token error rate (0 drawn at 0.01)",
                       ylabel="generation ms, one segment alone", title="second pass with first-pass drafts",
                       context=context)


if __name__ == "__main__":
    main()
