"""dpo_ray.compute.fused_head against the unfused path: the same per-token log-probs (float32) and the same gradients
for every model family (tied and untied heads, Gemma's final soft-capping, sliding windows), for a
LoRA-adapted head, with chunks smaller than the row; a model that scales its logits is refused."""

from __future__ import annotations

import pytest
import torch

from dpo_ray.compute.batching import PairTokens
from dpo_ray.testing.families import FAMILIES
from tests.numerics import GRADS, LOGPS, assert_close_to_scale

PAIRS = [
    PairTokens([1, 5, 6, 7, 9], [7, 8, 10, 11, 2], [9, 12, 2]),
    PairTokens([1, 4], [6, 13, 14, 15, 16, 17, 2], [5, 5, 5, 2]),
    PairTokens([1, 9, 9, 9, 3, 4, 5], [3, 2], [4, 18, 19, 2]),
]


def _run(model, mode: str, fused: bool):
    from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_logps

    collate = collate_packed if mode == "packed" else collate_prefix_shared
    model.zero_grad(set_to_none=True)
    lp = segment_logps(model, collate(PAIRS), chunk_tokens=3, fused=fused)  # chunks smaller than the row
    (lp.chosen.sum() - 0.5 * lp.rejected.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([lp.chosen, lp.rejected]).detach(), grads


def _compare(model, mode: str) -> None:
    from dpo_ray.compute.fused_head import enable_fused_head

    want, want_grads = _run(model, mode, fused=False)
    enable_fused_head(model)
    got, got_grads = _run(model, mode, fused=True)
    assert_close_to_scale(got, want, LOGPS, "log-probs")
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert_close_to_scale(got_grads[name], g, GRADS, name)


@pytest.mark.parametrize("mode", ["packed", "prefix_shared"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_head_gives_the_unfused_logps_and_gradients(family_dirs, family, mode):
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.models.loading import disable_dropout, load_causal_lm

    model = enable_segment_attention(disable_dropout(load_causal_lm(str(family_dirs[family]))))
    model.train()  # as in training, dropout off (the train loop's disable_dropout)
    _compare(model, mode)


def test_a_lora_head_and_tied_embeddings(family_dirs):
    from peft import LoraConfig, get_peft_model

    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.models.loading import load_causal_lm

    model = enable_segment_attention(load_causal_lm(str(family_dirs["llama3"])))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    from dpo_ray.compute.fused_head import enable_fused_head

    want, want_grads = _run(model, "packed", fused=False)
    enable_fused_head(model)
    got, got_grads = _run(model, "packed", fused=True)
    assert_close_to_scale(got, want, LOGPS, "log-probs")
    for name, g in want_grads.items():
        assert_close_to_scale(got_grads[name], g, GRADS, name)

    lora = enable_segment_attention(load_causal_lm(str(family_dirs["llama3"])))
    enable_fused_head(lora)  # before peft wraps it, as the train loop does
    peft = get_peft_model(lora, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide a head the fused path skipped
    got, got_grads = _run(peft, "packed", fused=True)
    assert any("lm_head" in n for n in got_grads)
    base = enable_segment_attention(load_causal_lm(str(family_dirs["llama3"])))
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    plain.load_state_dict(peft.state_dict())
    want, want_grads = _run(plain, "packed", fused=False)
    assert_close_to_scale(got, want, LOGPS, "log-probs")
    for name, g in want_grads.items():
        assert_close_to_scale(got_grads[name], g, GRADS, name)


def test_a_model_that_scales_its_logits_is_refused(family_dirs):
    from dpo_ray.compute.fused_head import UnsupportedHeadError, enable_fused_head
    from dpo_ray.models.loading import load_causal_lm

    model = load_causal_lm(str(family_dirs["llama3"]))
    model.config.logit_scale = 0.25
    with pytest.raises(UnsupportedHeadError, match="llama scales its logits \\(logit_scale\\).*fused_head: false"):
        enable_fused_head(model)


@pytest.mark.parametrize("family", ["llama3", "gemma2"])
def test_under_bf16_autocast(family_dirs, family):
    """Under bf16 autocast (as training on a GPU runs): the head's matmul in bf16, gather − logsumexp in float32,
    float32 log-probs out. Fused and unfused round differently (the fused head's weight gradient is summed
    chunk by chunk), so both are held to the float32 path: the fused head's error is no larger than the
    unfused path's (within 1.5x, plus float32 noise), for the log-probs and every gradient."""
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.fused_head import enable_fused_head
    from dpo_ray.models.loading import disable_dropout, load_causal_lm

    model = enable_segment_attention(disable_dropout(load_causal_lm(str(family_dirs[family]))))
    exact, exact_grads = _run(model, "packed", fused=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused, unfused_grads = _run(model, "packed", fused=False)
    enable_fused_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads = _run(model, "packed", fused=True)
    assert fused.dtype == torch.float32
    assert not torch.equal(unfused, exact)  # autocast was in effect

    def err(a, b):
        return float((a - b).abs().max())

    assert err(fused, exact) <= 1.5 * err(unfused, exact) + 1e-5
    for name, g in exact_grads.items():
        assert err(fused_grads[name], g) <= 1.5 * err(unfused_grads[name], g) + 1e-5 * float(g.abs().max()), name


def _long_rows_setup(family_dirs):
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.fused_head import enable_fused_head
    from dpo_ray.models.loading import disable_dropout, load_causal_lm

    return enable_fused_head(enable_segment_attention(disable_dropout(load_causal_lm(str(family_dirs["gemma2"])))))


@pytest.mark.parametrize("mode", ["packed", "prefix_shared"])
def test_rows_from_fused_head_from_tokens_take_the_fused_head(family_dirs, monkeypatch, mode):
    """TrainSettings.fused_head_from (train.batching.fused_head_from): a micro-batch whose row has at least that
    many tokens goes through the fused head, a shorter one through the unfused head, with the same log-probs
    (Gemma-2: the fused head applies the final softcap itself)."""
    from dpo_ray.compute import fused_head
    from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared
    from dpo_ray.train.step import StepBatch, TrainSettings, micro_batch_logps, uses_fused_head

    model = _long_rows_setup(family_dirs)
    row = (collate_packed if mode == "packed" else collate_prefix_shared)(PAIRS).num_tokens
    calls = []
    real = fused_head._chunk_logps
    monkeypatch.setattr(fused_head, "_chunk_logps", lambda *a: calls.append(1) or real(*a))
    zero = torch.zeros(len(PAIRS), dtype=torch.float64)
    results = {}
    for start in (0, row + 1, row):  # 0: never; one token past the row: unfused; the row's length: fused
        calls.clear()
        s = TrainSettings(batching=mode, fused_head_from=start)
        assert uses_fused_head(s, row) == (start == row)
        with torch.no_grad():
            lp = micro_batch_logps(model, StepBatch(PAIRS, zero, zero), s)
        assert bool(calls) == (start == row), start
        results[start] = torch.cat([lp.chosen, lp.rejected])
    assert_close_to_scale(results[row], results[0], LOGPS, "fused long row")
    assert torch.equal(results[row + 1], results[0])


def test_the_pre_training_check_covers_the_fused_head_of_long_rows(family_dirs, monkeypatch):
    """With fused_head_from set, the check before training runs its pairs through both heads: a fused head that
    is wrong is caught even though the check's pairs are short."""
    from dpo_ray.compute import fused_head
    from dpo_ray.train.preflight import batching_mismatch
    from dpo_ray.train.step import TrainSettings

    model = _long_rows_setup(family_dirs)
    settings = TrainSettings(batching="packed", fused_head_from=8192)
    assert batching_mismatch(model, PAIRS, settings) is None
    real = fused_head._chunk_logps
    monkeypatch.setattr(fused_head, "_chunk_logps", lambda *a: real(*a) + 0.01)
    message = batching_mismatch(model, PAIRS, settings)
    assert message is not None and "(unfused and fused head) is not exact" in message
    assert batching_mismatch(model, PAIRS, TrainSettings(batching="packed")) is None  # no fused head: not run
