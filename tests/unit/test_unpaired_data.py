"""Unpaired records → tokenized rows (dpo_ray.data.unpaired), their reject reasons, paired → unpaired, and the
KL partners KTO's reference point is estimated from (no Ray)."""

from __future__ import annotations

import random

import pytest

from dpo_ray.data.tokenization import REASONS, PairTokenizer, RowRejected, record_to_pair
from dpo_ray.data.unpaired import kl_partners, pair_to_unpaired, record_to_unpaired, row_id
from tests.unit.test_tokenization import COLS as PAIR_COLS

COLS = {"prompt": "prompt", "completion": "completion", "label": "label"}


def _reason(record, pt) -> str:
    with pytest.raises(RowRejected) as e:
        record_to_unpaired(record, pt, COLS)
    return e.value.reason


def test_a_text_row_is_tokenized_by_the_pairs_rule(pt, tok):
    row = record_to_unpaired({"prompt": "Human: hi Assistant:", "completion": " good movie", "label": True}, pt, COLS)
    # The same text as the chosen side of a pair gets the same tokens (one rule for both kinds).
    pair = record_to_pair(
        {"prompt": "Human: hi Assistant:", "chosen": " good movie", "rejected": " bad"}, pt, PAIR_COLS
    )
    assert (row.prompt_ids, row.completion_ids) == (pair.prompt_ids, pair.chosen_ids)
    assert row.label is True and row.completion_ids[-1] == tok.eos_token_id
    assert tok.decode(row.completion_ids, skip_special_tokens=True) == " good movie"
    bad = record_to_unpaired({"prompt": "Human: hi Assistant:", "completion": " awful", "label": False}, pt, COLS)
    assert bad.label is False


def test_a_conversational_row_ends_with_the_turn(pt, tok):
    convo = [{"role": "user", "content": "hi"}]
    row = record_to_unpaired(
        {"prompt": convo, "completion": [{"role": "assistant", "content": "hello"}], "label": False}, pt, COLS
    )
    pair = record_to_pair(
        {
            "prompt": convo,
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go"}],
        },
        pt,
        PAIR_COLS,
    )
    assert (row.prompt, row.completion) == (pair.prompt, pair.chosen)
    assert (row.prompt_ids, row.completion_ids) == (pair.prompt_ids, pair.chosen_ids)
    user_last = {"prompt": convo, "completion": [{"role": "user", "content": "x"}], "label": True}
    assert _reason(user_last, pt) == "wrong_type"


@pytest.mark.parametrize("label", [None, 1, 0, "true", "false", 1.0, [True]])
def test_a_label_that_is_not_a_boolean_is_rejected_with_its_own_reason(pt, label):
    assert _reason({"prompt": "p", "completion": " c", "label": label}, pt) == "invalid_label"
    assert "invalid_label" in REASONS


def test_other_rejects(pt):
    assert _reason({"prompt": "p", "label": True}, pt) == "missing_field"
    assert _reason({"prompt": "p", "completion": " c"}, pt) == "invalid_label"
    assert _reason({"prompt": " ", "completion": " c", "label": True}, pt) == "empty_prompt"
    assert _reason({"prompt": "p", "completion": "  ", "label": True}, pt) == "empty_completion"
    assert _reason({"prompt": "p", "completion": 3, "label": True}, pt) == "wrong_type"
    assert _reason(["p", "c", True], pt) == "not_an_object"
    cols = {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    row = record_to_unpaired({"question": "q?", "answer": " a", "thumbs_up": True}, pt, cols)
    assert row.prompt == "q?" and row.label


def test_a_long_completion_is_cut_to_the_budget_and_flagged(pt):
    row = record_to_unpaired({"prompt": "Human: hi Assistant:", "completion": " word" * 200, "label": True}, pt, COLS)
    assert len(row.prompt_ids) + len(row.completion_ids) == 64
    assert row.truncated == {"prompt": False, "completion": True}
    dropping = PairTokenizer(pt.tok, max_length=64, max_prompt_length=32, truncation="drop")
    with pytest.raises(RowRejected) as e:
        record_to_unpaired(
            {"prompt": "Human: hi Assistant:", "completion": " word" * 200, "label": True}, dropping, COLS
        )
    assert e.value.reason == "too_long"


def test_a_pair_becomes_a_desirable_and_an_undesirable_row(pt):
    pair = record_to_pair({"prompt": "Human: hi Assistant:", "chosen": " good", "rejected": " bad"}, pt, PAIR_COLS)
    up, down = pair_to_unpaired(pair)
    assert (up.label, down.label) == (True, False)
    assert (up.completion_ids, down.completion_ids) == (pair.chosen_ids, pair.rejected_ids)
    assert up.prompt_ids == down.prompt_ids == pair.prompt_ids
    assert row_id(up.prompt, up.completion, up.label) != row_id(up.prompt, up.completion, not up.label)


def _rows(n_prompts: int, per_prompt: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [f"prompt {rng.randrange(10**9)}" for _ in range(n_prompts)]
    rows = [(p, f"completion {k}") for p in prompts for k in range(per_prompt)]
    rng.shuffle(rows)
    return [row_id(p, c, True) for p, c in rows], [p for p, _ in rows]


def test_kl_partners_have_another_prompt_and_do_not_depend_on_the_input_order():
    ids, prompts = _rows(30, 3)
    partners = kl_partners(ids, prompts, seed=0)
    assert all(j is not None and prompts[j] != prompts[i] for i, j in enumerate(partners))
    by_id = {ids[i]: ids[j] for i, j in enumerate(partners) if j is not None}
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    shuffled = kl_partners([ids[i] for i in order], [prompts[i] for i in order], seed=0)
    assert {ids[order[k]]: ids[order[j]] for k, j in enumerate(shuffled) if j is not None} == by_id
    other = kl_partners(ids, prompts, seed=1)
    assert other != partners  # the seed draws another pairing


def test_kl_partners_use_every_completion_once_when_prompts_are_distinct():
    ids, prompts = _rows(50, 1)
    partners = kl_partners(ids, prompts, seed=3)
    assert sorted(j for j in partners if j is not None) == list(range(50))  # a permutation: one cycle
    assert all(j != i for i, j in enumerate(partners))


def test_a_split_of_one_prompt_has_no_partner():
    ids, prompts = _rows(1, 4)
    assert kl_partners(ids, prompts, seed=0) == [None] * 4
    assert kl_partners([], [], seed=0) == []
    with pytest.raises(ValueError, match="row ids"):
        kl_partners(["a"], [], seed=0)
