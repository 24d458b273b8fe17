"""Padding-free batching (packed, prefix_shared): log-probs and gradients equal unbatched single-sequence
forwards and the padded mode; the planner's budgets and padding fractions."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_ray.compute.attention import enable_segment_attention
from dpo_ray.compute.batching import (
    PairTokens,
    collate_padded,
    computed_tokens,
    padded_token_count,
    plan,
    policy_logps,
)
from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_logps, segment_token_logps
from dpo_ray.compute.logps import token_logps
from tests.numerics import GRADS, LOGPS, assert_close_to_scale


@pytest.fixture(scope="module")
def gqa_model():
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # larger weights than the init, so that attention patterns matter
        p.data.normal_(0, 0.2)
    return enable_segment_attention(model)


def random_pairs(n: int, vocab: int, seed: int) -> list[PairTokens]:
    """Mixed lengths, including a 1-token prompt and 1-token completions."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(0 if i == 0 else rng.randint(0, 20))]
        chosen = [rng.randrange(3, vocab) for _ in range(0 if i in (1, 2) else rng.randint(1, 15))] + [2]
        rejected = [rng.randrange(3, vocab) for _ in range(0 if i == 2 else rng.randint(0, 25))] + [2]
        pairs.append(PairTokens(prompt, chosen, rejected))
    return pairs


def single_token_logps(model, prompt, completion) -> list[float]:
    """Float64 log p(completion[j] | prompt, completion[:j]) from a forward of that one sequence."""
    ids = torch.tensor([[*prompt, *completion]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[t - 1, ids[0, t]]) for t in range(len(prompt), ids.shape[1])]


def mode_token_logps(model, pairs, mode) -> list[list[float]]:
    """Per-token completion log-probs of each sequence (chosen 0..B-1, then rejected) in `mode`."""
    n = 2 * len(pairs)
    if mode == "padded":
        batch = collate_padded(pairs, pad_token_id=0)
        per_token = token_logps(
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
            batch.input_ids,
            batch.completion_mask,
            chunk_tokens=37,
        )
        return [per_token[i][batch.completion_mask[i]].tolist() for i in range(n)]
    batch = (collate_packed if mode == "packed" else collate_prefix_shared)(pairs)
    per_token = segment_token_logps(model, batch, chunk_tokens=37)
    return [per_token[batch.seq == i].tolist() for i in range(n)]


def mode_logps(model, pairs, mode):
    if mode == "padded":
        return policy_logps(model, collate_padded(pairs, pad_token_id=0), chunk_tokens=37)
    collate = collate_packed if mode == "packed" else collate_prefix_shared
    return segment_logps(model, collate(pairs), chunk_tokens=37)


@pytest.mark.parametrize("mode", ["padded", "packed", "prefix_shared"])
def test_modes_match_unbatched_forwards_per_token(gqa_model, mode):
    pairs = random_pairs(9, gqa_model.config.vocab_size, seed=1)
    with torch.no_grad():
        got = mode_token_logps(gqa_model, pairs, mode)
        sums = mode_logps(gqa_model, pairs, mode)
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompts = [p.prompt_ids for p in pairs] * 2
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        expected = torch.tensor(single_token_logps(gqa_model, prompt, completion), dtype=torch.float64)
        assert_close_to_scale(torch.tensor(got[i], dtype=torch.float64), expected, LOGPS, f"{mode} sequence {i}")
        side = sums.chosen if i < len(pairs) else sums.rejected
        assert_close_to_scale(side[i % len(pairs)], expected.sum(), LOGPS, f"{mode} sum {i}")


def test_gradients_agree_across_modes(gqa_model):
    pairs = random_pairs(6, gqa_model.config.vocab_size, seed=2)
    weights = torch.linspace(-1.0, 1.0, 12)
    grads = {}
    for mode in ("padded", "packed", "prefix_shared"):
        gqa_model.zero_grad(set_to_none=True)
        out = mode_logps(gqa_model, pairs, mode)
        (torch.cat([out.chosen, out.rejected]) * weights).sum().backward()
        grads[mode] = [p.grad.clone() for p in gqa_model.parameters()]
    gqa_model.zero_grad(set_to_none=True)
    for mode in ("packed", "prefix_shared"):
        for i, (a, b) in enumerate(zip(grads["padded"], grads[mode], strict=True)):
            assert_close_to_scale(b, a, GRADS, f"{mode} parameter {i}")


def test_layouts_by_hand():
    pairs = [PairTokens([1, 5], [6, 2], [7, 8, 2]), PairTokens([1], [9, 2], [2])]
    packed = collate_packed(pairs)
    assert packed.input_ids.tolist() == [[1, 5, 6, 2, 1, 9, 2, 1, 5, 7, 8, 2, 1, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert packed.targets.tolist() == [2, 3, 5, 6, 9, 10, 11, 13]
    assert packed.sources.tolist() == [1, 2, 4, 5, 8, 9, 10, 12]
    assert packed.seq.tolist() == [0, 0, 1, 1, 2, 2, 2, 3]
    shared = collate_prefix_shared(pairs)
    assert shared.input_ids.tolist() == [[1, 5, 6, 2, 7, 8, 2, 1, 9, 2, 2]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 1]]
    # Rejected's first token (position 4, then 10) is predicted by the last prompt token (1, then 7).
    assert shared.targets.tolist() == [2, 3, 4, 5, 6, 8, 9, 10]
    assert shared.sources.tolist() == [1, 2, 1, 4, 5, 7, 8, 7]
    assert [(b.start, b.end, b.prefix) for b in shared.blocks] == [
        (0, 4, None),
        (4, 7, (0, 2)),
        (7, 10, None),
        (10, 11, (7, 8)),
    ]


@pytest.mark.parametrize("mode", ["padded", "packed", "prefix_shared"])
def test_planner_budget_cover_and_waste(mode):
    pairs = random_pairs(60, 100, seed=3)
    for budget in (1, 64, 300, 2000, 100_000):
        p = plan(pairs, budget, mode)
        assert sorted(i for g in p.groups for i in g) == list(range(60))
        for g in p.groups:
            assert len(g) == 1 or computed_tokens([pairs[i] for i in g], mode) <= budget
    one = plan(pairs, 100_000, mode)
    assert len(one.groups) == 1
    real = sum(x.num_tokens for x in pairs)
    if mode == "padded":
        assert one.computed == padded_token_count(pairs) and one.real == real
        assert one.padding_fraction == pytest.approx(1 - real / padded_token_count(pairs))
        assert one.padding_fraction > 0.2
    else:
        assert one.padding_fraction == 0.0
        shared = sum(len(x.prompt_ids) for x in pairs)
        assert one.computed == (real if mode == "packed" else real - shared)


def test_first_fit_decreasing_fills_bins():
    pairs = [PairTokens([1] * a, [2] * b, [3] * c) for a, b, c in [(3, 2, 2), (1, 1, 1), (2, 2, 1), (1, 1, 2)]]
    # packed costs 2P + C + R: 10, 4, 7, 5 → bins of 12: FFD puts [10], [7, 5], [4] → then 4 fits? no: 7+5=12
    p = plan(pairs, 12, "packed")
    assert sorted(sorted(g) for g in p.groups) == [[0], [1], [2, 3]]
    assert p.computed == 26 and p.fill == pytest.approx(26 / 36)


def test_train_steps_agree_across_modes_and_micro_batchings(gqa_model):
    """Three AdamW steps from the same weights: each mode (and a tiny token budget, i.e. many
    micro-batches with accumulation) gives the same losses and the same updated weights."""
    import copy

    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    pairs = random_pairs(12, gqa_model.config.vocab_size, seed=4)
    gen = torch.Generator().manual_seed(0)
    ref_c, ref_r = -30 + 5 * torch.rand(12, generator=gen), -30 + 5 * torch.rand(12, generator=gen)
    batch = StepBatch(pairs, ref_c.double(), ref_r.double())
    runs, grad_norms = {}, {}
    for mode, budget in (("padded", 100_000), ("packed", 100_000), ("prefix_shared", 100_000), ("packed", 60)):
        model = copy.deepcopy(gqa_model).train()
        opt = make_optimizer(model, "adamw", 1e-3, 0.0)
        sched = make_scheduler(opt, 0, 3, "constant")
        settings = TrainSettings(token_budget=budget, batching=mode, chunk_tokens=50)
        steps = [train_step(model, opt, sched, batch, settings, global_batch_size=12).metrics for _ in range(3)]
        losses = [m["loss"] for m in steps]
        grad_norms[(mode, budget)] = [m["grad_norm"] for m in steps]
        runs[(mode, budget)] = (losses, [p.detach().clone() for p in model.parameters()])
    base_losses, base_params = runs[("padded", 100_000)]
    for key, norms in grad_norms.items():  # the accumulated gradient's scale (AdamW's update hides it)
        assert norms == pytest.approx(grad_norms[("padded", 100_000)], rel=GRADS), key
    assert base_losses[0] != pytest.approx(base_losses[2], abs=1e-3)  # the steps did change the model
    initial = [p.detach() for p in gqa_model.parameters()]
    for key, (losses, params) in runs.items():
        assert losses == pytest.approx(base_losses, abs=1e-5), key
        # The updates, relative to their size: AdamW moves an element by ~lr whatever its gradient's size, so a
        # near-zero gradient element whose sign differs by rounding moves by 2·lr more; that is a few elements of
        # thousands (~1e-2 of the update's norm at most), while a wrong gradient changes the update by O(1).
        for i, (a, b, w) in enumerate(zip(base_params, params, initial, strict=True)):
            assert_close_to_scale(b - w, a - w, 1e-2, f"{key} update of parameter {i}")


def test_lora_trains_only_adapters_and_merges_exactly(tiny_model_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dpo_ray.models.loading import load_causal_lm
    from dpo_ray.train.lora import LoraSettings, apply_lora, peft_model_from_state
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    base = load_causal_lm(tiny_model_dir)
    model = apply_lora(enable_segment_attention(load_causal_lm(tiny_model_dir)), settings)
    pairs = random_pairs(8, base.config.vocab_size, seed=5)
    with torch.no_grad():
        before, reference = mode_logps(model, pairs, "packed"), mode_logps(base, pairs, "padded")
    assert torch.allclose(before.chosen, reference.chosen, atol=1e-5)  # B = 0: the adapted model is the base
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = StepBatch(pairs, reference.chosen.double() - 1, reference.rejected.double())
    opt = make_optimizer(model, "adamw", 1e-2, 0.0)
    sched = make_scheduler(opt, 0, 2, "constant")
    for _ in range(2):
        train_step(model, opt, sched, batch, TrainSettings(batching="packed"), global_batch_size=8)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in base.parameters()
    )
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    merged = peft_model_from_state(str(tiny_model_dir), settings, full).merge_and_unload()
    with torch.no_grad():
        trained, from_merged = mode_logps(model, pairs, "packed"), mode_logps(merged, pairs, "padded")
    assert not torch.allclose(trained.chosen, before.chosen, atol=1e-3)
    assert torch.allclose(trained.chosen, from_merged.chosen, atol=1e-4)
    assert torch.allclose(trained.rejected, from_merged.rejected, atol=1e-4)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(load_causal_lm(tiny_model_dir), LoraSettings(target_modules=("nope_proj",)))


def test_auto_batching_is_decided_once_by_the_train_stage_for_the_device_and_model():
    """pipeline.stages.train._batching: the only place `auto` is resolved (the workers get TrainSettings that refuse an
    unresolved mode): the measured fastest per device, padded for a model the padding-free modes cannot do."""
    from types import SimpleNamespace

    from dpo_ray.train.step import TrainSettings
    from pipeline.config import TrainConfig
    from pipeline.stages.train import _batching

    plain, bidirectional = (
        SimpleNamespace(model_type="llama"),
        SimpleNamespace(model_type="x", use_bidirectional_attention=True),
    )

    def decided(config, **sections):
        return _batching(TrainConfig.model_validate({"model": "m", **sections}), config)

    assert decided(plain, workers={"use_gpu": True}) == ("packed", "blocks")
    assert decided(plain) == ("prefix_shared", "blocks")
    assert decided(plain, batching={"mode": "padded"}, workers={"use_gpu": True}) == ("padded", "blocks")
    # attention: blocks on both (FlexAttention has no CPU backward and is not yet measured on a GPU)
    assert decided(plain, batching={"attention": "flex"}, workers={"use_gpu": True}) == ("packed", "flex")
    assert decided(bidirectional, workers={"use_gpu": True}) == ("padded", "blocks")
    for unresolved in ({"batching": "auto"}, {"attention": "auto"}):
        with pytest.raises(ValueError, match="resolved"):
            TrainSettings(**unresolved)
