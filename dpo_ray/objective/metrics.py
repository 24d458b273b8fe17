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
    "COUNT_DESIRABLE",
    "COUNT_UNDESIRABLE",
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
    "unpaired_metric_means",
    "unpaired_metric_sums",
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


def health_means(sums: Tensor, sequences: int) -> dict[str, float]:
    """The health signals from (added-up) health_sums over `sequences` completions (2 per pair; 1 per unpaired
    row): the per-token mean log-prob shift of the chosen (desirable) and of the rejected (undesirable)
    completions, and the mean over all of them of log πref − log π per sequence."""
    c, n_c, r, n_r = (float(x) for x in sums.detach().cpu().double().tolist())
    return {
        CHOSEN_SHIFT: c / n_c if n_c else float("nan"),
        REJECTED_SHIFT: r / n_r if n_r else float("nan"),
        KL: -(c + r) / sequences if sequences else float("nan"),
    }


COUNT_DESIRABLE = "count/desirable"
COUNT_UNDESIRABLE = "count/undesirable"


def unpaired_metric_sums(
    losses: Tensor, rewards: Tensor, policy_logps: Tensor, desirable: Tensor, lengths: Tensor, ref_logps: Tensor
) -> tuple[Tensor, Tensor]:
    """The sums of unpaired rows, in the width of pair_metric_sums, and their health sums (as health_sums: the
    desirable completions in the chosen slots, the undesirable in the rejected ones), both float64:
    (Σ loss, Σ reward_D, Σ reward_U, n_D, n_U, Σ logp_D, Σ logp_U, rows); unpaired_metric_means reads them."""
    good = desirable.to(torch.bool)
    bad = ~good
    r, lp = rewards.detach().double(), policy_logps.detach().double()
    shift = lp - ref_logps.double()
    n = lengths.double()
    sums = torch.stack(
        [
            losses.detach().double().sum(),
            r[good].sum(),
            r[bad].sum(),
            good.double().sum(),
            bad.double().sum(),
            lp[good].sum(),
            lp[bad].sum(),
            torch.tensor(float(len(r)), dtype=torch.float64, device=r.device),
        ]
    )
    health = torch.stack([shift[good].sum(), n[good].sum(), shift[bad].sum(), n[bad].sum()])
    return sums, health


def unpaired_metric_means(sums: Tensor, prefix: str = "") -> dict[str, float]:
    """Means from (added-up) unpaired_metric_sums, under TRL's KTO names: the loss per row, rewards/chosen and
    logps/chosen over the desirable rows, rewards/rejected and logps/rejected over the undesirable ones (NaN for
    a side with no row), rewards/margins their difference, and the two counts."""
    loss, r_d, r_u, n_d, n_u, lp_d, lp_u, rows = sums.detach().cpu().double().tolist()
    if rows <= 0:
        raise ValueError("unpaired_metric_means: no rows were accumulated")
    nan = float("nan")
    chosen, rejected = (r_d / n_d if n_d else nan), (r_u / n_u if n_u else nan)
    out = {
        LOSS: loss / rows,
        REWARDS_CHOSEN: chosen,
        REWARDS_REJECTED: rejected,
        REWARDS_MARGINS: chosen - rejected,
        LOGPS_CHOSEN: lp_d / n_d if n_d else nan,
        LOGPS_REJECTED: lp_u / n_u if n_u else nan,
        COUNT_DESIRABLE: n_d,
        COUNT_UNDESIRABLE: n_u,
    }
    return {prefix + k: v for k, v in out.items()}


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
