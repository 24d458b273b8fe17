"""Pairing strategies on hand-made rewards, and reward-function checks."""

from __future__ import annotations

import math

import pytest

from dpo_ray.data.pairing import pair_samples
from dpo_ray.models.rewards import RewardError, lexicon_sentiment, load_reward, score

C = [[1], [2], [3], [4]]


def test_best_vs_worst_ties_and_identical():
    assert pair_samples(C, [0.1, 0.9, -0.5, 0.3]).pairs == [(1, 2)]
    tie = pair_samples(C, [0.2, 0.2, 0.2, 0.2])
    assert tie.pairs == [] and tie.ties == 1
    same = pair_samples([[5], [6], [5]], [1.0, 0.5, 0.0])
    assert same.pairs == [] and same.identical == 1
    assert pair_samples([[1]], [1.0]).pairs == []
    # Equal best rewards: the earliest sample wins (deterministic).
    assert pair_samples(C, [1.0, 1.0, 0.0, 0.5]).pairs == [(0, 2)]


def test_margin_and_all_pairs_with_caps():
    r = [0.0, 1.0, 0.5, 0.5]
    # All 6 candidate pairs: gaps 1.0 (1,0), 0.5 (1,2), 0.5 (1,3), 0.5 (2,0), 0.5 (3,0), tie (2,3).
    m = pair_samples(C, r, "margin", margin=0.6, max_pairs=10)
    assert m.pairs == [(1, 0)] and m.ties == 1
    a = pair_samples(C, r, "all_pairs", max_pairs=10)
    assert a.pairs == [(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)] and a.ties == 1
    assert pair_samples(C, r, "all_pairs", max_pairs=2).pairs == [(1, 0), (1, 2)]
    with pytest.raises(ValueError, match="strategy"):
        pair_samples(C, r, "random")
    with pytest.raises(ValueError, match="rewards"):
        pair_samples(C, r[:2])


def test_lexicon_sentiment_by_hand():
    texts = [
        "The movie was great and fun.",
        "It was boring",
        "The plot",
        "great great superb fun",
        "Bad, BAD, dull.",
        "The plot was great and fun. The cast was fun. The end",  # 1, 0.5, 0 → mean 0.5
        "...",
    ]
    assert lexicon_sentiment(["p"] * 7, texts) == pytest.approx([1.0, -0.5, 0.0, 1.0, -1.0, 0.5, 0.0])


def _nan(prompts, completions):
    return [math.nan] * len(completions)


def _short(prompts, completions):
    return [1.0]


def _boom(prompts, completions):
    raise ZeroDivisionError("x")


def test_score_errors_name_the_scorer():
    with pytest.raises(RewardError, match="reward 'm:nan' returned non-finite"):
        score(_nan, "m:nan", ["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match="reward 'm:short' returned 1 values for 2 completions"):
        score(_short, "m:short", ["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match="reward 'm:boom' raised ZeroDivisionError"):
        score(_boom, "m:boom", ["p"], ["a"])
    with pytest.raises(RewardError, match="not a list of numbers"):
        score(lambda p, c: ["x"], "m:str", ["p"], ["a"])


def test_load_reward_specs():
    assert load_reward("lexicon") is lexicon_sentiment
    fn = load_reward("tests.unit.test_pairing_rewards:_nan")
    assert fn is _nan
    with pytest.raises(RewardError, match="cannot import"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(RewardError, match="expected"):
        load_reward("nonsense")


def test_reward_model_scores_batched_like_one_by_one(tiny_model_dir, tmp_path):
    """A sequence-classification reward model: padded batches give each text's unpadded score."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from dpo_ray.models.loading import load_tokenizer

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    rm.config.pad_token_id = load_tokenizer(tiny_model_dir).pad_token_id
    rm.save_pretrained(rm_dir, safe_serialization=True)
    load_tokenizer(tiny_model_dir).save_pretrained(rm_dir)
    fn = load_reward(f"model:{rm_dir}")
    prompts = ["the movie", "a film that was", "hi"]
    completions = [" was great", " very very boring and long", " there"]
    batched = score(fn, "rm", prompts, completions)
    tok = load_tokenizer(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    for p, c, b in zip(prompts, completions, batched, strict=True):
        with torch.no_grad():
            single = float(model(**tok(p + c, return_tensors="pt")).logits[0, 0])
        assert b == pytest.approx(single, abs=1e-4)
    assert len(set(batched)) == 3


def test_generated_pairs_of_one_prompt_share_a_split():
    """Prompts as generate gets them (prepare's train split), all_pairs with up to 6 pairs per prompt: every pair
    of a prompt lands in one split, and about eval_fraction of the prompts in eval.

    Failed before the split was a function of the prompt (drawn per pair_id, most prompts had pairs in both);
    and with prepare's own hash, no prompt of prepare's train split could land in generate's eval split at an
    eval_fraction ≤ prepare's (the demo's and the defaults): generate's split is salted."""
    from dpo_ray.data.tokenization import split_of
    from pipeline.config import GenerateConfig
    from pipeline.stages.generate import _pair

    prompts = [f"prompt {p}" for p in range(400) if split_of(f"prompt {p}", 0.3) == "train"]
    cfg = GenerateConfig(policy="p", prompts="x", strategy="all_pairs", max_pairs_per_prompt=6, eval_fraction=0.3)
    gens = [
        {
            "prompt_id": f"id{p}",
            "prompt": prompt,
            "prompt_ids": [p],
            "sample_index": s,
            "completion_ids": [p, s],
            "completion": f"sample {s}",
            "reward": float(s),
        }
        for p, prompt in enumerate(prompts)
        for s in range(4)
    ]
    pairs, _ = _pair(cfg, gens)
    splits: dict[str, set[str]] = {}
    for row in pairs:
        splits.setdefault(row["prompt"], set()).add(row["split"])
    assert len(pairs) == len(prompts) * 6 and len(splits) == len(prompts)
    assert all(len(s) == 1 for s in splits.values())
    assert 0.2 * len(prompts) < sum(s == {"eval"} for s in splits.values()) < 0.4 * len(prompts)


def test_a_reward_model_scores_the_end_of_a_text_longer_than_its_context(tiny_model_dir, tmp_path):
    """A long prompt is cut from the left: completions after the same long prompt get their own scores (cut from
    the right, as transformers does by default, both would score the prompt's start alone)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from dpo_ray.models.loading import load_tokenizer

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    tok = load_tokenizer(tiny_model_dir)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir, safe_serialization=True)
    tok.model_max_length = 16  # the reward model's context
    tok.save_pretrained(rm_dir)
    prompt = "the movie was great and the story was fun " * 20  # far past 16 tokens
    completions = [" really boring", " I love it", " not quite"]
    scores = score(load_reward(f"model:{rm_dir}"), "rm", [prompt] * 3, completions)
    assert len(set(scores)) == 3, scores
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    ids = tok(prompt + completions[0]).input_ids
    kept = torch.tensor([[ids[0], *ids[-15:]]])  # BOS, then the text's last 15 tokens
    with torch.no_grad():
        assert scores[0] == pytest.approx(float(model(input_ids=kept).logits[0, 0]), abs=1e-4)
