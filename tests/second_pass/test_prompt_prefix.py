"""twopass_asr.second_pass.prompt_prefix: which held prefix a batch of prompts continues from,
computed once, copied per use, bounded by rows. The recognizer's use of it, on the real LLM,
is in test_nano."""

from __future__ import annotations

import pytest
import torch

from twopass_asr.second_pass.prompt_prefix import PromptPrefixCache

HIDDEN = 4


class RecordedCache:
    """What the cache is given back: the rows it was computed from, and what was done to it."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds
        self.extended: list[str] = []
        self.repeats = 1

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeats *= repeats


def rows(*values: float) -> torch.Tensor:
    return torch.tensor(values).repeat_interleave(HIDDEN).view(-1, HIDDEN)


@pytest.fixture
def computed():
    return []


@pytest.fixture
def prefixes(computed):
    def compute(embeds):
        computed.append(embeds)
        return RecordedCache(embeds)

    return PromptPrefixCache(compute, max_rows=8)


def test_prompts_continue_from_the_longest_prefix_they_all_open_with(prefixes):
    prefixes.remember([1, 2], rows(1, 2))
    prefixes.remember([1, 2, 3], rows(1, 2, 3))
    prefixes.remember([1, 5], rows(1, 5))
    longer = prefixes.prefix_of([rows(1, 2, 3, 9), rows(1, 2, 3, 7, 7)])
    assert longer is not None and torch.equal(longer.embeds, rows(1, 2, 3))
    shorter = prefixes.prefix_of([rows(1, 2, 3, 9), rows(1, 2, 4, 7)])
    assert shorter is not None and torch.equal(shorter.embeds, rows(1, 2))
    assert prefixes.prefix_of([rows(1, 2, 3, 9), rows(1, 5, 7)]) is None, "no prefix opens both"
    assert prefixes.prefix_of([rows(1, 2)]) is None, "a prompt must go on past the prefix"
    assert prefixes.prefix_of([rows(2, 1, 3)]) is None


def test_a_prefix_is_computed_once_and_each_use_gets_its_own_copy(prefixes, computed):
    prefixes.remember([1, 2], rows(1, 2))
    prefix = prefixes.prefix_of([rows(1, 2, 3)])
    first = prefixes.cache_for(prefix, 1)
    first.extended.append("a generation's tokens")
    second = prefixes.cache_for(prefix, 3)
    assert len(computed) == 1 and torch.equal(computed[0], rows(1, 2))
    assert second is not first and second.extended == [], "a use must not see another's tokens"
    assert second.repeats == 3 and first.repeats == 1 and prefix.cache.repeats == 1


def test_the_held_rows_are_bounded_and_the_least_recently_used_go_first(prefixes):
    prefixes.remember([1, 2, 3], rows(1, 2, 3))
    prefixes.remember([4, 5, 6], rows(4, 5, 6))
    assert prefixes.prefix_of([rows(1, 2, 3, 0)]) is not None  # now the more recently used
    prefixes.remember([7, 8, 9], rows(7, 8, 9))  # 9 rows: one prefix must go
    assert len(prefixes) == 2
    assert prefixes.prefix_of([rows(4, 5, 6, 0)]) is None
    assert prefixes.prefix_of([rows(1, 2, 3, 0)]) is not None and prefixes.prefix_of([rows(7, 8, 9, 0)]) is not None
    prefixes.remember(range(9), torch.zeros(9, HIDDEN))  # longer than all it may hold: not held
    assert len(prefixes) == 2
    prefixes.clear()
    assert len(prefixes) == 0 and prefixes.prefix_of([rows(7, 8, 9, 0)]) is None


def test_remembering_needs_one_row_per_token_and_a_positive_bound(prefixes):
    with pytest.raises(ValueError, match="3 token ids for 2 embedding rows"):
        prefixes.remember([1, 2, 3], rows(1, 2))
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        PromptPrefixCache(RecordedCache, max_rows=0)
