"""Canonical metric names (the field's, as TRL logs them) and their computation.

Per-pair metrics are accumulated as float64 sums plus a pair count, so micro-batches and workers can
be combined by adding (an all-reduce of one small tensor) before taking means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpo_ray.objective.losses import LossOutput

__all__ = [
    "GRAD_NORM",
    "LOGPS_CHOSEN",
    "LOGPS_REJECTED",
    "LOSS",
    "LR",
    "PAIRS_PER_SEC",
    "PAIR_METRICS",
    "REWARDS_ACCURACIES",
    "REWARDS_CHOSEN",
    "REWARDS_MARGINS",
    "REWARDS_REJECTED",
    "TOKENS_PER_SEC",
    "metric_means",
    "pair_metric_sums",
    "throughput",
]

LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
GRAD_NORM = "grad_norm"
LR = "lr"
TOKENS_PER_SEC = "tokens_per_sec"
PAIRS_PER_SEC = "pairs_per_sec"

# Order of the entries of pair_metric_sums' tensor; the last entry is the pair count.
PAIR_METRICS = (
    LOSS,
    REWARDS_CHOSEN,
    REWARDS_REJECTED,
    REWARDS_ACCURACIES,
    REWARDS_MARGINS,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
)


def pair_metric_sums(out: LossOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> Tensor:
    """Sums over the batch of every PAIR_METRICS entry, then the pair count: a (len(PAIR_METRICS)+1,) float64.

    A pair counts as accurate when its chosen reward is strictly above its rejected reward.
    """
    chosen, rejected = out.chosen_rewards.double(), out.rejected_rewards.double()
    columns = (
        out.losses.detach().double(),
        chosen,
        rejected,
        (chosen > rejected).double(),
        chosen - rejected,
        policy_chosen_logps.detach().double(),
        policy_rejected_logps.detach().double(),
    )
    sums = torch.stack([c.sum() for c in columns])
    count = torch.tensor([float(out.losses.shape[0])], dtype=torch.float64, device=sums.device)
    return torch.cat([sums, count])


def metric_means(sums: Tensor, prefix: str = "") -> dict[str, float]:
    """Means from (possibly added-up) pair_metric_sums; `prefix` e.g. "eval/" names eval metrics."""
    values = sums.detach().cpu().double().tolist()
    count = values[-1]
    if count <= 0:
        raise ValueError("metric_means: no pairs were accumulated")
    return {prefix + name: total / count for name, total in zip(PAIR_METRICS, values[:-1], strict=True)}


def throughput(tokens: int, pairs: int, seconds: float) -> dict[str, float]:
    """Tokens and pairs per second of wall time."""
    if seconds <= 0:
        raise ValueError(f"throughput: seconds must be > 0, found {seconds}")
    return {TOKENS_PER_SEC: tokens / seconds, PAIRS_PER_SEC: pairs / seconds}
