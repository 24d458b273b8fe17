"""Losses of unpaired feedback: one completion per row with a binary label (desirable or not), as pure
functions of log-probabilities. Notation of Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect
Theoretic Optimization", arXiv:2402.01306, eqs. 6-8):

    r(x, y) = log πθ(y|x) − log πref(y|x)                       the completion's log-ratio
    z₀ = max(0, E over mismatched pairs (x, y') of log πθ(y'|x) − log πref(y'|x))   the reference point

and per row, with λ_D, λ_U the desirable and undesirable weights,

    kto:                desirable  λ_D·(1 − σ(β·(r − z₀)))     undesirable  λ_U·(1 − σ(β·(z₀ − r)))
    apo_zero_unpaired:  desirable  λ_D·(1 − σ(β·r))            undesirable  λ_U·σ(β·r)
                        (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7 unpaired)

The optimiser's objective is the mean over the rows of the global batch. z₀ is a number of the whole global
batch, detached (no gradient flows through it, as in the paper and in TRL): the caller all-reduces the sum of
the mismatched log-ratios and their count over every worker and micro-batch (reference_point), so any split of
the batch gives the same z₀ and the same losses. TRL averages each GPU's mean instead, which equals this when
every GPU holds the same number of rows. Only torch is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "UNPAIRED_LOSSES",
    "UnpairedOutput",
    "reference_point",
    "unpaired_losses",
    "unpaired_step_zero",
    "weight_guidance",
]

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class UnpairedOutput:
    """Per-row losses (B,) and rewards β·r (B,), detached."""

    losses: Tensor
    rewards: Tensor


def reference_point(kl_logratio_sum: float, count: int) -> float:
    """KTO's z₀ from the global batch: max(0, Σ (log πθ(y'|x) − log πref(y'|x)) / count) over its mismatched
    pairs. The sum and the count are all-reduced by the caller; z₀ = 0 for a batch with no pairs."""
    if count <= 0:
        return 0.0
    return max(0.0, kl_logratio_sum / count)


def unpaired_losses(
    name: str,
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    z0: float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedOutput:
    """The loss `name` (kto or apo_zero_unpaired) of each row.

    policy_logps, ref_logps: (B,) summed log-probs of each row's completion. desirable: (B,) bool, the label.
    z0: the reference point (reference_point; apo_zero_unpaired ignores it).
    """
    if name not in UNPAIRED_LOSSES:
        raise ValueError(f"unpaired loss: unknown {name!r}; expected one of {', '.join(UNPAIRED_LOSSES)}")
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != desirable.shape or policy_logps.dim() != 1:
        raise ValueError(
            f"shapes: policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and desirable "
            f"{tuple(desirable.shape)} must be the same (B,)"
        )
    z0 = float(z0)  # a number: no gradient flows through the reference point
    r = policy_logps - ref_logps.to(policy_logps.dtype)
    good = desirable.to(torch.bool)
    if name == "kto":
        up, down = 1.0 - torch.sigmoid(beta * (r - z0)), 1.0 - torch.sigmoid(beta * (z0 - r))
    else:
        up, down = 1.0 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    losses = torch.where(good, desirable_weight * up, undesirable_weight * down)
    return UnpairedOutput(losses, (beta * r).detach())


def unpaired_step_zero(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> float:
    """The mean loss of a batch at πθ = πref (every r = 0, so z₀ = 0): each row's loss is half its weight for
    both losses, (λ_D·n_D + λ_U·n_U) / (2·(n_D + n_U))."""
    n = n_desirable + n_undesirable
    if n == 0:
        raise ValueError("unpaired_step_zero: an empty batch has no loss")
    return (desirable_weight * n_desirable + undesirable_weight * n_undesirable) / (2.0 * n)


def weight_guidance(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """None when λ_D·n_D / (λ_U·n_U) lies in [1, 4/3] (KTO paper, eq. 8: weigh the rarer label up so that the
    desirable side is at most a third heavier than the undesirable one); otherwise a message with the range of
    each weight that would satisfy it with the other kept."""
    if n_desirable == 0 or n_undesirable == 0:
        side = "desirable" if n_desirable == 0 else "undesirable"
        return f"the training rows hold no {side} completion: KTO needs both labels"
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    d_lo = undesirable_weight * n_undesirable / n_desirable
    u_hi = desirable_weight * n_desirable / n_undesirable
    return (
        f"{n_desirable} desirable and {n_undesirable} undesirable rows with weights {desirable_weight:g} and "
        f"{undesirable_weight:g} give λ_D·n_D / (λ_U·n_U) = {ratio:.2f}, outside [1, 4/3] (KTO paper, eq. 8): "
        f"set desirable_weight in [{d_lo:.3g}, {d_lo * 4 / 3:.3g}] or undesirable_weight in "
        f"[{u_hi * 3 / 4:.3g}, {u_hi:.3g}]"
    )
