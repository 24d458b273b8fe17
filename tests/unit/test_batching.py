"""Padded batching and the micro-batch planner: batched log-probs equal unbatched forwards."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_ray.compute.batching import (
    PairTokens,
    collate_padded,
    padded_token_count,
    plan_micro_batches,
    policy_logps,
)
from dpo_ray.compute.logps import token_logps


def _random_pairs(n: int, vocab: int, seed: int) -> list[PairTokens]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(0 if i == 0 else rng.randint(0, 20))]
        chosen = [rng.randrange(3, vocab) for _ in range(1 if i == 1 else rng.randint(1, 15))] + [2]
        rejected = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 25))] + [2]
        pairs.append(PairTokens(prompt, chosen, rejected))
    return pairs


def _single_sequence_logp(model, prompt, completion) -> float:
    """Log-prob of `completion` after `prompt` from a forward of that one sequence, no padding."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    per_token = token_logps(logits, ids)
    return float(per_token[0, len(prompt) :].double().sum())


def test_padded_batch_matches_unbatched_forwards(tiny_model):
    pairs = _random_pairs(7, tiny_model.config.vocab_size, seed=0)
    batch = collate_padded(pairs, pad_token_id=0, pad_to_multiple_of=8)
    assert batch.input_ids.shape[1] % 8 == 0
    with torch.no_grad():
        out = policy_logps(tiny_model, batch, chunk_tokens=50)
    for i, p in enumerate(pairs):
        assert out.chosen[i].item() == pytest.approx(
            _single_sequence_logp(tiny_model, p.prompt_ids, p.chosen_ids), abs=1e-5
        )
        assert out.rejected[i].item() == pytest.approx(
            _single_sequence_logp(tiny_model, p.prompt_ids, p.rejected_ids), abs=1e-5
        )
        assert out.chosen_lengths[i] == len(p.chosen_ids)
        assert out.rejected_lengths[i] == len(p.rejected_ids)


@pytest.mark.parametrize("shortest_prompt", [1, 6])
def test_completion_logps_keep_only_the_logits_they_read(tiny_model, monkeypatch, shortest_prompt):
    """completion_logps (the reference's transformers backend, the parity gate's and the pre-training check's
    independent forward) asks for the logits from the shortest prompt's last position on: each completion
    token's log-prob still equals a forward of its sequence alone with every logit, and the model was asked for
    no logits before that position."""
    from dpo_ray.compute.batching import completion_logps

    rng = random.Random(3)
    vocab = tiny_model.config.vocab_size
    lengths = [shortest_prompt, 9, 14, 20]
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in lengths]
    completions = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))] for _ in lengths]
    kept = []
    forward = tiny_model.forward

    def spy(*args, **kwargs):
        kept.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", spy)
    got = completion_logps(tiny_model, prompts, completions, pad_token_id=0, token_budget=10_000)
    monkeypatch.undo()
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    assert kept == [None if shortest_prompt == 1 else width - shortest_prompt + 1]
    for p, c, lp in zip(prompts, completions, got, strict=True):
        assert len(lp) == len(c)
        assert sum(lp) == pytest.approx(_single_sequence_logp(tiny_model, p, c), abs=1e-5)


def test_collate_layout():
    pairs = [PairTokens([1, 5], [6, 2], [7, 8, 2]), PairTokens([1], [9, 2], [2])]
    b = collate_padded(pairs, pad_token_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 2, 0], [1, 9, 2, 0, 0], [1, 5, 7, 8, 2], [1, 2, 0, 0, 0]]
    assert b.attention_mask.sum(1).tolist() == [4, 3, 5, 2]
    assert b.completion_mask.int().tolist() == [
        [0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
    ]
    assert b.num_pairs == 2


def test_planner_respects_budget_and_keeps_every_pair():
    pairs = _random_pairs(40, 100, seed=3)
    for budget in (1, 64, 200, 1000, 100_000):
        groups = plan_micro_batches(pairs, budget)
        assert sorted(i for g in groups for i in g) == list(range(40))
        for g in groups:
            members = [pairs[i] for i in g]
            assert len(g) == 1 or padded_token_count(members) <= budget
    assert len(plan_micro_batches(pairs, 100_000)) == 1
    assert len(plan_micro_batches(pairs, 1)) == 40


def test_bad_pairs_and_budget():
    with pytest.raises(ValueError, match="prompt_ids"):
        PairTokens([], [2], [2])
    with pytest.raises(ValueError, match="chosen_ids"):
        PairTokens([1], [], [2])
    with pytest.raises(ValueError, match="token_budget"):
        plan_micro_batches([], 0)
    with pytest.raises(ValueError, match="no pairs"):
        collate_padded([], 0)


def test_longest_first_keeps_each_padded_group_within_the_budget():
    from dpo_ray.compute.batching import longest_first

    widths = [5, 40, 12, 12, 3, 100, 7]
    groups = longest_first(widths, token_budget=48, rows_per_item=2)
    assert sorted(i for g in groups for i in g) == list(range(len(widths)))
    for g in groups:
        assert len(g) == 1 or 2 * len(g) * max(widths[i] for i in g) <= 48
        assert [widths[i] for i in g] == sorted((widths[i] for i in g), reverse=True)
    assert groups[0] == [5]  # wider than the budget: alone
