"""Drafts for the second pass from the first pass's text of the same segment.

Where both passes recognise a segment well, the LLM's tokens mostly repeat the first pass's
words, so the first pass's text, tokenized with the LLM's tokenizer, proposes the tokens that
follow the ones generated so far. The C decode step checks a sequence's proposals in one pass
(its rows at consecutive positions, as a prefill's) and keeps those greedy decoding would have
produced, one step per run of agreeing tokens instead of one per token
(native_decode.NativeDecoder.generate). The tokens are greedy decoding's either way: a proposal
only decides how many rows a pass checks.

The texts differ where the LLM writes punctuation, numerals or casing the first pass does not,
or where either pass errs: the follower finds its place again by the last tokens generated
(the way prompt-lookup decoding follows its prompt), and proposes nothing while they are not
in the draft.

A pass's rows are not free: a product over a few rows costs about what one row costs (its
weights are read once for all of them) only up to a number of rows that depends on the CPU's
products. So a pass holds at most that many rows in all (default_draft_rows), each sequence's
next token first and draft tokens in the rows left: a segment decoding alone checks several,
a batch of segments one or two each, and a full batch none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from twopass_asr.kernels.cpu_features import cpu_has_amx_int8, cpu_has_int8_dot_products, cpu_has_native_bf16
from twopass_asr.parameters import whole_number

# Tokens generated last that must be found in the draft to resume it (the longest tried first).
LONGEST_MATCH = 3

# Overrides the draft_rows model parameter.
DRAFT_ROWS_ENV = "TWOPASS_ASR_NANO_DRAFT_ROWS"
# Beyond this a pass costs several one-row passes on every CPU measured (perf/RESULTS.md,
# session 41), and its logits take 0.6 MB a row.
MAX_DRAFT_ROWS = 64
# A draft's characters a token of the generation cap may take: the rest could not be checked.
DRAFT_CHARACTERS_PER_TOKEN = 16


@dataclass
class DraftTally:
    """What drafts did over some generation: tokens proposed, those kept, and passes run."""

    proposed: int = 0
    accepted: int = 0
    passes: int = 0


class DraftFollower:
    """Follows one sequence's draft (token ids) along the tokens it generates."""

    def __init__(self, draft: Sequence[int]):
        self.draft = list(draft)
        self._cursor = 0  # where the draft was last resumed: earlier repeats are passed over

    def propose(self, generated: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` draft tokens that follow the end of `generated`, where its last tokens
        (up to LONGEST_MATCH of them, the longest found) occur in the draft at or after the
        place last resumed; none where they do not."""
        if limit <= 0 or not self.draft:
            return []
        for length in range(min(LONGEST_MATCH, len(generated)), 0, -1):
            tail = list(generated[-length:])
            start = self._find(tail)
            if start is not None:
                self._cursor = start + length
                return self.draft[self._cursor:self._cursor + limit]
        return []

    @property
    def left(self) -> int:
        """Draft tokens after the place last resumed: about what the sequence has left to generate."""
        return len(self.draft) - self._cursor

    def _find(self, tail: list[int]) -> int | None:
        length = len(tail)
        for start in range(max(self._cursor - length, 0), len(self.draft) - length + 1):
            if self.draft[start:start + length] == tail:
                return start
        return None


def default_draft_rows(precision: str) -> int:
    """The rows a decode pass in `precision` (int8 or bf16, on the compiled products) may hold
    when it checks drafts: as many as cost about what one row costs on this CPU's products,
    whose weights a pass reads once for all its rows (perf/RESULTS.md, session 41)."""
    if cpu_has_amx_int8():
        return 16  # a tile's rows
    if precision == "int8":
        return 8 if cpu_has_int8_dot_products() else 4
    return 4 if cpu_has_native_bf16() else 2


def draft_rows_setting(parameter: str | None) -> int | None:
    """The rows a decode pass may hold when it checks drafts (1: drafts are left aside; None:
    default_draft_rows), from $TWOPASS_ASR_NANO_DRAFT_ROWS, else the draft_rows model parameter."""
    value = (os.environ.get(DRAFT_ROWS_ENV) or parameter or "").strip()
    if not value:
        return None
    label = f"draft_rows (parameter or ${DRAFT_ROWS_ENV})"
    rows = whole_number(value, label)
    if rows > MAX_DRAFT_ROWS:
        raise ValueError(f"{label} must be at most {MAX_DRAFT_ROWS}, got {value!r}")
    return rows


def share_draft_rows(wanted: Sequence[int], rows: int, work_left: Sequence[int]) -> list[int]:
    """How many of its wanted draft tokens each sequence of a pass checks, when the pass holds
    `rows` rows in all and one of them is each sequence's next token: one token each in turn
    while rows are left, the sequences with the most work left (tokens still to generate, as
    far as known) first, since a batch's passes last as long as its longest sequence."""
    granted = [0] * len(wanted)
    left = rows - len(wanted)
    order = sorted(range(len(wanted)), key=lambda index: -work_left[index])
    while left > 0 and any(g < w for g, w in zip(granted, wanted)):
        for index in order:
            if left > 0 and granted[index] < wanted[index]:
                granted[index] += 1
                left -= 1
    return granted


__all__ = ["DRAFT_CHARACTERS_PER_TOKEN", "DRAFT_ROWS_ENV", "DraftFollower", "DraftTally", "LONGEST_MATCH",
           "MAX_DRAFT_ROWS", "default_draft_rows", "draft_rows_setting", "share_draft_rows"]
