"""DraftFollower (twopass_asr/second_pass/drafts.py): where the first pass's tokens resume."""

import pytest

from twopass_asr.second_pass.drafts import (DRAFT_ROWS_ENV, DraftFollower, default_draft_rows, draft_rows_setting,
                                            share_draft_rows)


def test_a_draft_is_followed_from_the_last_tokens_generated():
    follower = DraftFollower([10, 11, 12, 13, 14, 15])
    assert follower.left == 6
    assert follower.propose([10], limit=3) == [11, 12, 13]
    assert follower.left == 5
    assert follower.propose([10, 11, 12, 13], limit=8) == [14, 15]
    assert follower.propose([10, 11, 12, 13, 14, 15], limit=8) == []  # the draft is used up


def test_after_a_token_the_draft_lacks_nothing_is_proposed_until_it_is_found_again():
    follower = DraftFollower([10, 11, 12, 13, 14])
    # The LLM wrote punctuation (99) the first pass does not have, then went on with its words.
    assert follower.propose([10, 11, 99], limit=4) == []
    assert follower.propose([10, 11, 99, 12], limit=4) == [13, 14]
    # A word the first pass got wrong (the draft's 12 is the LLM's 42): found again after it.
    follower = DraftFollower([10, 11, 12, 13, 14])
    assert follower.propose([10, 11, 42], limit=4) == []
    assert follower.propose([10, 11, 42, 13], limit=4) == [14]


def test_the_longest_match_decides_and_earlier_repeats_are_passed_over():
    follower = DraftFollower([5, 1, 2, 5, 3, 4, 5, 6])
    # 5 occurs three times: the two tokens before it say which.
    assert follower.propose([3, 4, 5], limit=1) == [6]
    follower = DraftFollower([7, 1, 7, 2, 7, 3])
    assert follower.propose([7], limit=1) == [1]
    assert follower.propose([7, 1, 7], limit=1) == [2]
    assert follower.propose([7, 1, 7, 2, 7], limit=1) == [3]


def test_no_draft_or_no_room_proposes_nothing():
    assert DraftFollower([]).propose([1, 2], limit=4) == []
    assert DraftFollower([1, 2, 3]).propose([1], limit=0) == []
    assert DraftFollower([1, 2, 3]).propose([], limit=4) == []


def test_a_pass_shares_its_rows_left_among_the_sequences_a_token_at_a_time():
    assert share_draft_rows([8], 16, [20]) == [8]
    assert share_draft_rows([8], 4, [20]) == [3]
    assert share_draft_rows([5, 0, 5, 1], 8, [9, 9, 9, 9]) == [2, 0, 1, 1]
    # The sequences with the most draft left first.
    assert share_draft_rows([5, 0, 5, 1], 8, [3, 9, 12, 1]) == [1, 0, 2, 1]
    assert share_draft_rows([5, 5, 5], 5, [1, 7, 4]) == [0, 1, 1]
    assert share_draft_rows([3, 3], 2, [5, 5]) == [0, 0]  # no row left beyond the next tokens
    assert share_draft_rows([], 4, []) == []


def test_the_draft_rows_setting(monkeypatch):
    monkeypatch.delenv(DRAFT_ROWS_ENV, raising=False)
    assert draft_rows_setting("") is None and draft_rows_setting("1") == 1 and draft_rows_setting("12") == 12
    monkeypatch.setenv(DRAFT_ROWS_ENV, "5")
    assert draft_rows_setting("3") == 5
    for wrong in ("0", "many", "65"):
        monkeypatch.setenv(DRAFT_ROWS_ENV, wrong)
        with pytest.raises(ValueError, match=DRAFT_ROWS_ENV):
            draft_rows_setting("")
    assert all(default_draft_rows(precision) in (2, 4, 8, 16) for precision in ("int8", "bf16"))
