"""Preference-optimization losses as pure functions of log-probabilities.

Every variant maps the summed (or per-token averaged) log-probabilities of the chosen and rejected
completions under the policy and the frozen reference to one loss per pair. Notation, following
Rafailov et al. 2023 ("DPO", arXiv:2305.18290):

    h = (log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x))

and the implicit reward of a completion is r(x, y) = β·(log πθ(y|x) − log πref(y|x))  (DPO eq. 5).

Only torch is imported here: this module must stay importable without Ray, vLLM or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "InitialLoss",
    "initial_loss",
    "LossOutput",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "robust_loss",
    "sigmoid_loss",
]


@dataclass(frozen=True)
class LossOutput:
    """Per-pair losses and implicit rewards.

    losses: (B,) the loss of each pair (the optimiser's objective is their mean).
    chosen_rewards, rejected_rewards: (B,) β·(log πθ − log πref), detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def sigmoid_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (eq. 7 of Rafailov et al.), with conservative label smoothing (cDPO, Mitchell 2023).

    h: (B,) log-ratio difference. Returns (B,)
        −(1−ε)·log σ(β·h) − ε·log σ(−β·h);   ε = 0 is the paper's loss.
    """
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """rDPO (Chowdhury et al. 2024, eq. 8): an unbiased loss under preference-label flip rate ε.

    h: (B,). Returns (B,)  (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε).
    """
    numerator = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
    return numerator / (1.0 - 2.0 * label_smoothing)


def ipo_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): regress the log-ratio difference onto 1/(2β).

    h: (B,). Returns (B,) (h − 1/(2β))². `label_smoothing` does not apply (pipeline.config rejects it).
    The IPO paper sums token log-probs; TRL averages them per token: choose with `average_logps`.
    """
    del label_smoothing
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SLiC-HF style hinge (Zhao et al. 2023, eq. 2 with margin 1 on the scaled log-ratio).

    h: (B,). Returns (B,) relu(1 − β·h).
    """
    del label_smoothing
    return torch.relu(1.0 - beta * h)


LossFn = Callable[[Tensor, float, float], Tensor]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}


@dataclass(frozen=True)
class InitialLoss:
    """A loss variant at policy == reference (h = 0): its value and |dL/dm|, the slope with respect to the
    reward margin m = β·h (the `rewards/margins` metric). Near h = 0 a mean margin m moves the mean loss by
    about slope·m, so a check of the loss at step 0 tolerates slope × (the margin tolerance)."""

    value: float
    slope: float


def initial_loss(name: str, beta: float, label_smoothing: float = 0.0) -> InitialLoss:
    """The value and margin slope of LOSSES[name] at h = 0, from the loss function itself (float64 autograd).

    sigmoid: ln 2 and (1 − 2ε)/2; robust: ln 2 and 1/(2(1 − 2ε)); ipo: 1/(4β²) and 1/β²; hinge: 1 and 1.
    """
    _validate(name, {"h": torch.zeros(1)}, beta, label_smoothing, 0.0)
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    value = LOSSES[name](h, beta, label_smoothing)
    (grad,) = torch.autograd.grad(value.sum(), h)
    return InitialLoss(float(value.item()), abs(float(grad.item())) / beta)


def _validate(
    name: str,
    tensors: dict[str, Tensor],
    beta: float,
    label_smoothing: float,
    sft_weight: float,
) -> None:
    if name not in LOSSES:
        raise ValueError(f"loss: unknown variant {name!r}; expected one of {sorted(LOSSES)}")
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: must be a finite number > 0, found {beta!r}")
    if not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing: must be in [0, 0.5), found {label_smoothing!r}")
    if not (math.isfinite(sft_weight) and sft_weight >= 0):
        raise ValueError(f"sft_weight: must be a finite number >= 0, found {sft_weight!r}")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"shapes: every log-prob and length tensor must be (B,) with the same B; found {shapes}")


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    average_logps: bool = False,
) -> LossOutput:
    """Loss variant `name` of LOSSES, plus an optional NLL term on the chosen completion.

    policy_*_logps, ref_*_logps: (B,) summed log-probs of the completion tokens.
    *_lengths: (B,) completion token counts (>= 1), used for `average_logps` and the NLL term.
    average_logps: use per-token mean log-probs (length-normalised, as in IPO-as-in-TRL and SimPO)
        instead of sums, for both the log-ratios and the rewards.
    sft_weight: λ of RPO (Pang et al. 2024, eq. 3): adds λ·(−log πθ(y_w|x) / |y_w|) to each pair's loss.
    Returns LossOutput with (B,) tensors; rewards use the same (summed or averaged) log-probs as the loss.
    """
    _validate(
        name,
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
        },
        beta,
        label_smoothing,
        sft_weight,
    )
    dtype = policy_chosen_logps.dtype
    ref_chosen = ref_chosen_logps.to(dtype)
    ref_rejected = ref_rejected_logps.to(dtype)
    chosen_len = chosen_lengths.to(dtype)
    rejected_len = rejected_lengths.to(dtype)
    pol_chosen, pol_rejected = policy_chosen_logps, policy_rejected_logps
    if average_logps:
        pol_chosen, ref_chosen = pol_chosen / chosen_len, ref_chosen / chosen_len
        pol_rejected, ref_rejected = pol_rejected / rejected_len, ref_rejected / rejected_len
    chosen_logratios = pol_chosen - ref_chosen
    rejected_logratios = pol_rejected - ref_rejected
    losses = LOSSES[name](chosen_logratios - rejected_logratios, beta, label_smoothing)
    if sft_weight > 0:
        losses = losses + sft_weight * (-policy_chosen_logps / chosen_len)
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )
