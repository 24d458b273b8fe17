"""The check before any step: the configured batching mode against unbatched eager forwards on real pairs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dpo_ray.compute.attention import UnsupportedAttention
from dpo_ray.compute.batching import PairTokens, completion_logps
from dpo_ray.train.step import StepBatch, TrainSettings, micro_batch_logps

__all__ = ["batching_mismatch"]


def batching_mismatch(
    model: Any, pairs: list[PairTokens], settings: TrainSettings, tolerance: float = 1e-3
) -> str | None:
    """The train forward in `settings.batching` against unbatched forwards with eager attention, on `pairs`.

    Run before training, in float32 without autocast: any model feature the batching mode gets wrong (a
    sliding window it ignores, a softcap, an attention variant nobody listed) shows up as a difference.
    Returns a message naming the largest difference (nats per sequence), or None when within `tolerance`.
    """
    implementation = model.config._attn_implementation
    s = dataclasses.replace(settings, autocast_dtype=None)
    # Both heads a run can take: the fused head on long rows only (fused_head_from) is checked on these rows too.
    variants = [s, dataclasses.replace(s, fused_head=True)] if s.fused_head_from and not s.fused_head else [s]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            zero = torch.zeros(len(pairs), dtype=torch.float64)
            try:
                runs = [micro_batch_logps(model, StepBatch(pairs, zero, zero), v) for v in variants]
            except UnsupportedAttention as e:
                return f"batching {settings.batching!r}: {e}"
        model.set_attn_implementation("eager")
        # token_budget 1: every sequence is a forward of its own (no padding, no neighbours).
        unbatched = completion_logps(
            model,
            [p.prompt_ids for p in pairs] * 2,
            [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
            settings.pad_token_id,
            token_budget=1,
        )
    finally:
        model.set_attn_implementation(implementation)
        model.train(was_training)
    want = torch.tensor([sum(lp) for lp in unbatched], dtype=torch.float64)
    worst = max(float((torch.cat([b.chosen, b.rejected]).double().cpu() - want).abs().max()) for b in runs)
    if worst <= tolerance:
        return None
    paths = f"batching {settings.batching!r}" + (" (unfused and fused head)" if len(runs) > 1 else "")
    return (
        f"{paths} is not exact for this model ({model.config.model_type}): completion log-probs differ from "
        f"unbatched eager forwards by up to {worst:.4g} nats (tolerance {tolerance:g}) on {len(pairs)} of the "
        "longest train pairs. Use train.batching.mode: padded."
    )
