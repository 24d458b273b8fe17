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


def test_split_partners_stay_within_their_split():
    """Partners by split: each row's partner is a row of its split with another prompt; a split of one prompt
    gets none, whatever the other split holds."""
    from dpo_ray.data.unpaired import split_partners

    rng = random.Random(3)
    prompts = [f"p{rng.randrange(12)}" for _ in range(60)] + ["lonely", "lonely"]
    splits = ["train" if int(p[1:]) % 3 else "eval" for p in prompts[:60]] + ["other", "other"]
    ids = [row_id(p, f"c{i}", bool(i % 2)) for i, p in enumerate(prompts)]
    partners = split_partners(ids, splits, prompts, seed=5)
    for i, j in enumerate(partners[:60]):
        assert j is not None and splits[j] == splits[i] and prompts[j] != prompts[i]
    assert partners[60:] == [None, None]
    # the same rows in another order: the same partner (by row id) for each row
    order = list(range(len(ids)))
    rng.shuffle(order)
    again = split_partners([ids[k] for k in order], [splits[k] for k in order], [prompts[k] for k in order], seed=5)
    assert {ids[order[a]]: ids[order[b]] for a, b in enumerate(again) if b is not None} == {
        ids[i]: ids[j] for i, j in enumerate(partners) if j is not None
    }


def test_a_kl_completion_is_cut_to_fit_after_its_prompt():
    from dpo_ray.data.unpaired import kl_completion

    assert kl_completion([5, 6, 7, 2], prompt_length=3, max_length=5) == [5, 6]
    assert kl_completion([5, 6, 7, 2], prompt_length=3, max_length=10) == [5, 6, 7, 2]
    assert kl_completion([5, 6, 7, 2], prompt_length=3, max_length=None) == [5, 6, 7, 2]


def _gens(rewards: dict[str, list[float]]) -> list[dict]:
    """generate's samples: per prompt, one completion per reward; samples 2 and 3 of a prompt are one text (and
    prompts share texts)."""
    out = []
    for p, rs in rewards.items():
        for i, r in enumerate(rs):
            out.append(
                {
                    "prompt_id": f"id-{p}",
                    "prompt": p,
                    "prompt_ids": [1, 2],
                    "completion_ids": [10 + min(i, 2), 2],
                    "completion": f"c{min(i, 2)}",
                    "sample_index": i,
                    "reward": r,
                }
            )
    return out


def test_generate_labels_pairs_and_thresholds_with_a_partner_of_another_prompt():
    """generate.unpaired: pairs → the pairs' chosen desirable, rejected undesirable; threshold → every sample by
    its reward; a completion rated twice the same way for a prompt is one row; each row's KL completion is
    another prompt's completion of the unit and split, cut to fit max_model_len - 1 after the row's prompt; a
    row without one is dropped and counted."""
    from dpo_ray.data.tokenization import split_of
    from pipeline.config import GenerateConfig
    from pipeline.stages.generate import _label, _pair

    rewards = {f"prompt {k}": [0.1 * k, -0.2, 0.5, 0.5] for k in range(12)}
    gens = _gens(rewards)
    splits = {p: split_of(p, 0.5, salt="generate") for p in rewards}
    assert sorted(set(splits.values())) == ["eval", "train"]  # both splits hold prompts
    base = {"policy": "m", "n": 4, "eval_fraction": 0.5}
    c = GenerateConfig(**base, unpaired="pairs")
    pairs, _ = _pair(c, gens)
    rows, counts = _label(c, gens, pairs)
    kept = {(r["prompt"], r["completion"], r["label"]) for r in rows}
    want = {(p["prompt"], p["chosen"], True) for p in pairs} | {(p["prompt"], p["rejected"], False) for p in pairs}
    assert kept == want and len(rows) == 2 * len(pairs) and counts["no_kl_partner"] == 0
    by_id = {r["row_id"]: r for r in rows}
    for r in rows:
        other = by_id[r["kl_row_id"]]
        assert other["prompt"] != r["prompt"] and r["kl_completion_ids"] == other["completion_ids"]
        assert r["split"] == other["split"] == splits[r["prompt"]]
    t = GenerateConfig(**base, unpaired="threshold", desirable_threshold=0.3)
    rows, counts = _label(t, gens, [])
    assert sorted(r["label"] for r in rows) == sorted(g["reward"] >= 0.3 for g in gens if g["sample_index"] != 3)
    assert counts["repeated_rows"] == 12 and counts["no_kl_partner"] == 0  # samples 2 and 3 are one text
    short = GenerateConfig(**base, unpaired="threshold", max_model_len=4)  # prompts of 2 tokens: room for 1
    assert {len(r["kl_completion_ids"]) for r in _label(short, gens, [])[0]} == {1}
    lone, counts = _label(t, _gens({"only": [0.9, 0.1]}), [])
    assert lone == [] and counts["no_kl_partner"] == 2


def test_generate_refuses_settings_that_would_mislabel_or_strand_rows():
    from pydantic import ValidationError

    from pipeline.config import GenerateConfig

    with pytest.raises(ValidationError, match="one completion labelled both ways"):
        GenerateConfig(policy="m", unpaired="pairs", strategy="all_pairs", max_pairs_per_prompt=3)
    with pytest.raises(ValidationError, match="prompts_per_unit >= 2"):
        GenerateConfig(policy="m", unpaired="threshold", prompts_per_unit=1)
