"""A bf16 output head read through its int8 screen (decode_step.c's screened_head,
Bf16HeadScreen): the C pass finds each row's greedy token from the int8 copy and the bf16 blocks
that may hold its largest logit, and must give the token the whole bf16 head gives, with that
logit's bits, on each native build."""

from __future__ import annotations

import ctypes

import pytest
import torch

from tests.kernels.test_bf16_product import library_for
from twopass_asr.kernels.decode_step import (
    INPUT_STEP,
    Bf16HeadScreen,
    CompiledBf16Weights,
    HeadScreenStruct,
    ProjectionStruct,
    Qwen3ModelStruct,
)

NATIVE_BUILDS = ("avx512-bf16", "this-cpu")
HIDDEN, VOCABULARY, ROWS = 256, 1024, 24
# Outputs in different blocks of 16 made the largest and nearly equal for the first half of the
# rows: their logits differ by less than the screen's int8 rounding, so its approximations order
# them wrongly.
TIED = (5, 200, 201, 519, 777, 1000)


def head_only_model(head: CompiledBf16Weights, norm: torch.Tensor, screen: Bf16HeadScreen | None,
                    norm_eps: float = 1e-6):
    """decode_step.c's model without decoder layers: a pass is the final norm and the head."""
    return Qwen3ModelStruct(layers=0, hidden=HIDDEN, heads=1, kv_heads=1, head_dim=2, intermediate=HIDDEN, slots=ROWS,
                            capacity=1, norm_eps=norm_eps, input_step=INPUT_STEP, bf16_products=1,
                            inverse_frequencies=norm.data_ptr(), final_norm=norm.data_ptr(),
                            head=ProjectionStruct(bf16=head.struct),
                            screen=screen.struct if screen else HeadScreenStruct())


def tokens_and_logits(library, model, rows: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    count = len(rows)
    entries = torch.arange(count)
    hidden, logits = rows.clone(), torch.empty(count, VOCABULARY)
    tokens = torch.empty(count, dtype=torch.int64)
    scratch = torch.empty(library.step_scratch_floats(ctypes.byref(model), count))
    valid = torch.ones(count, 1, dtype=torch.uint8)
    zeros = torch.zeros(count, dtype=torch.int64)
    library.qwen3_forward(ctypes.byref(model), count, hidden.data_ptr(), entries.data_ptr(), zeros.data_ptr(),
                          zeros.data_ptr(), valid.data_ptr(), scratch.data_ptr(), count, entries.data_ptr(),
                          logits.data_ptr(), tokens.data_ptr(), 2)
    return tokens.tolist(), logits


@torch.no_grad()
@pytest.mark.parametrize("build", NATIVE_BUILDS)
def test_the_screened_head_gives_the_whole_heads_tokens_and_their_logits_bits(build, tmp_path):
    library = library_for(build, tmp_path)
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(HIDDEN, generator=generator)
    rows = direction + 0.3 * torch.randn(ROWS, HIDDEN, generator=generator)
    rows[ROWS // 2:] = torch.randn(ROWS - ROWS // 2, HIDDEN, generator=generator)  # no tie favoured
    weights = 0.02 * torch.randn(VOCABULARY, HIDDEN, generator=generator)
    for output in TIED:
        weights[output] = 0.2 * direction / direction.norm() + 1e-5 * torch.randn(HIDDEN, generator=generator)
    norm = torch.ones(HIDDEN)
    head = CompiledBf16Weights(weights, library=library)
    if not Bf16HeadScreen.suits(head):
        pytest.skip("this build's products take no head screen")
    screen = Bf16HeadScreen(head)
    whole, whole_logits = tokens_and_logits(library, head_only_model(head, norm, None), rows)
    screened, screened_logits = tokens_and_logits(library, head_only_model(head, norm, screen), rows)
    assert screened == whole
    for row, token in enumerate(whole):
        assert screened_logits[row, token].view(torch.int32) == whole_logits[row, token].view(torch.int32), row
    # The screen ran (elsewhere the logits are its approximations), and its bounds decided the tied
    # rows: without them it keeps only the blocks its approximations favour, and other tokens win.
    assert not torch.equal(screened_logits, whole_logits)
    assert {whole[row] for row in range(ROWS // 2)} <= set(TIED)
    screen.magnitudes.zero_()
    screen.rounding.zero_()
    unbounded, _ = tokens_and_logits(library, head_only_model(head, norm, screen), rows)
    assert unbounded[:ROWS // 2] != whole[:ROWS // 2]


# Two outputs whose approximations order them wrongly by an error only one part of the bound
# covers. Rows of ones with no epsilon are normed to the norm's weights exactly. "rounding": the
# winner's weights 2^-8 each (0.496 of its int8 step: all rounded to 0) beside a spike, so its
# approximation falls short by the sum of its inputs times its rounding. "input": the inputs
# 1 and 0.24698 (quantized 0.39 % and 1.6 % low), the winner weighing the second alone, the
# other output the first, so the winner's approximation falls short by its input's error.
WINNER, RUNNER_UP = 40, 3
BOUND_CASES = {
    "rounding": ([1.0] * HIDDEN, {WINNER: [1.0] + [2.0**-8] * (HIDDEN - 1), RUNNER_UP: [1.9921875]}),
    "input": ([1.0, 0.24698], {WINNER: [0.0, 1.0], RUNNER_UP: [0.24560546875]}),
}


@torch.no_grad()
@pytest.mark.parametrize("part", BOUND_CASES)
@pytest.mark.parametrize("build", NATIVE_BUILDS)
def test_each_part_of_the_screens_bound_keeps_the_winner(build, part, tmp_path):
    library = library_for(build, tmp_path)
    inputs, outputs = BOUND_CASES[part]
    norm = torch.zeros(HIDDEN)
    norm[:len(inputs)] = torch.tensor(inputs)
    weights = torch.zeros(VOCABULARY, HIDDEN)
    for output, values in outputs.items():
        weights[output, :len(values)] = torch.tensor(values)
    head = CompiledBf16Weights(weights, library=library)
    if not Bf16HeadScreen.suits(head):
        pytest.skip("this build's products take no head screen")
    screen = Bf16HeadScreen(head)
    rows = torch.ones(1, HIDDEN)
    whole, _ = tokens_and_logits(library, head_only_model(head, norm, None, norm_eps=0.0), rows)
    approximate = screen.weights.product(norm[None]).argmax(-1).tolist()
    assert whole == [WINNER] and approximate == [RUNNER_UP]
    assert tokens_and_logits(library, head_only_model(head, norm, screen, norm_eps=0.0), rows)[0] == [WINNER]
    # Without the part that covers this error, the winner's block is left out.
    (screen.rounding if part == "rounding" else screen.magnitudes).zero_()
    assert tokens_and_logits(library, head_only_model(head, norm, screen, norm_eps=0.0), rows)[0] == [RUNNER_UP]
