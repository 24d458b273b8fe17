"""Canonical metric names (the field's, as TRL logs them) and their computation.

Per-pair metrics are accumulated as float64 sums plus a pair count, so micro-batches and workers can
be combined by adding (an all-reduce of one small tensor) before taking means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_ray.objective.health import CHOSEN_SHIFT, KL, NONFINITE, REJECTED_SHIFT
from dpo_ray.objective.losses import LossOutput

__all__ = [
    "GRAD_NORM",
    "HEALTH_SUMS",
    "NONFINITE",
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
    "health_means",
    "health_sums",
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


HEALTH_SUMS = 4  # health_sums' width


def health_sums(lp: Any, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """Sums over the batch of the policy's minus the reference's log-probs of the chosen and the rejected
    completions, and of their token counts: (Σ(c − c_ref), Σ|y_w|, Σ(r − r_ref), Σ|y_l|), float64. Additive, as
    pair_metric_sums: any split of the batch agrees once summed. `lp`: a PairLogps of the batch."""
    columns = (
        lp.chosen.detach().double() - ref_chosen.double(),
        lp.chosen_lengths.double(),
        lp.rejected.detach().double() - ref_rejected.double(),
        lp.rejected_lengths.double(),
    )
    return torch.stack([c.sum() for c in columns])


def health_means(sums: Tensor, pairs: int) -> dict[str, float]:
    """The health signals from (added-up) health_sums of `pairs` pairs: the per-token mean log-prob shift of the
    chosen and of the rejected completions, and the mean over both of log πref − log π per sequence."""
    c, n_c, r, n_r = (float(x) for x in sums.detach().cpu().double().tolist())
    return {
        CHOSEN_SHIFT: c / n_c if n_c else float("nan"),
        REJECTED_SHIFT: r / n_r if n_r else float("nan"),
        KL: -(c + r) / (2 * pairs) if pairs else float("nan"),
    }


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
