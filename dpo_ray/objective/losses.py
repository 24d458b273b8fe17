"""Preference-optimization losses as pure functions of log-probabilities.

Every variant maps the summed (or per-token averaged) log-probabilities of the chosen and rejected
completions under the policy and the frozen reference to one loss per pair. Notation, following
Rafailov et al. 2023 ("DPO", arXiv:2305.18290):

    h = (log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x))

and the implicit reward of a completion is r(x, y) = β·(log πθ(y|x) − log πref(y|x))  (DPO eq. 5).

Each loss reads β and its own parameters from a dpo_ray.objective.spec.LossSpec (whose ENTRIES say what each
needs), and batch-level state (BCO's δ, AOT's partners) from a BatchState beside it.

Only torch (and the torch-free spec) is imported here: this module must stay importable without Ray, vLLM or
transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_ray.objective.spec import ENTRIES, F_DIVERGENCES, SFT, LossSpec
from dpo_ray.objective.unpaired import UNPAIRED_LOSSES

__all__ = [
    "LOSSES",
    "BatchState",
    "LossState",
    "StepZero",
    "aot_partners",
    "aot_values",
    "bco_update",
    "smoothed_logistic",
    "step_zero",
    "InitialLoss",
    "f_scores",
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
    shift_rewards: (2, B) the rewards BCO's δ averages (its chosen and rejected β·log-ratios), detached, when a
        member reads δ (LossState); None otherwise.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    shift_rewards: Tensor | None = None


def smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss with label smoothing ε that sigmoid (cDPO), simpo and
    the aot losses apply to their own z."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (eq. 7 of Rafailov et al.), with conservative label smoothing (cDPO, Mitchell 2023).

    h: (B,) log-ratio difference. Returns (B,)
        −(1−ε)·log σ(β·h) − ε·log σ(−β·h);   ε = 0 is the paper's loss.
    """
    return smoothed_logistic(beta * h, label_smoothing)


def robust_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """rDPO (Chowdhury et al. 2024, eq. 8): an unbiased loss under preference-label flip rate ε.

    h: (B,). Returns (B,)  (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε).
    """
    numerator = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
    return numerator / (1.0 - 2.0 * label_smoothing)


def ipo_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): regress the log-ratio difference onto 1/(2β).

    h: (B,). Returns (B,) (h − 1/(2β))². `label_smoothing` does not apply (LossSpec refuses it).
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


@dataclass(frozen=True)
class BatchState:
    """What a loss reads besides its spec that is not configuration: BCO's reward shift δ (LossState, kept by
    the loop) and AOT's partners, (B, 2) in the sorted order of the global batch (aot_partners; None: sorted
    over the pairs given)."""

    bco_delta: float = 0.0
    aot_partners: Tensor | None = None


_EXP_CAP = 80.0  # exponents are capped here (as TRL does), so exp() stays finite in float32


def f_scores(logratio: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f′(πθ/πref) of the f-divergence regulariser (Wang et al. 2023, "Beyond Reverse KL", Table 1 / Thm 1),
    in TRL's convention (additive constants dropped: they cancel in chosen − rejected), of t = e^logratio:

    reverse_kl: log t (DPO);  forward_kl: 1 − 1/t;  js_divergence: log 2 + log σ(log t) = log(2t/(1+t));
    alpha_divergence: (t^(α−1) − 1)/(α − 1)  (TRL's α; the paper's α is 1 − this one).
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return 1.0 - torch.exp(torch.clamp(-logratio, max=_EXP_CAP))
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        return (torch.exp(torch.clamp((alpha - 1.0) * logratio, max=_EXP_CAP)) - 1.0) / (alpha - 1.0)
    raise ValueError(f"f_divergence: unknown {divergence!r}; expected one of {F_DIVERGENCES}")


def exo_pair_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16, K = 2): KL(p_θ ‖ p_ε) between the policy's softmax over
    {chosen, rejected} of β·log-ratios and the smoothed label distribution (1 − ε, ε); needs ε > 0.

    With z = β·(c − r): σ(z)·(log σ(z) − log(1 − ε)) + σ(−z)·(log σ(−z) − log ε).
    """
    eps = p.label_smoothing
    z = p.beta * (c - r)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """NCA (Chen et al. 2024, pairwise form as in TRL): per-completion rewards rθ = β·log-ratio,
    −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)."""
    rw, rl = p.beta * c, p.beta * r
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def sppo_hard_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7 with hard win probabilities 1 and 0):
    (log-ratio_w − 1/(2β))² + (log-ratio_l + 1/(2β))²."""
    return (c - 0.5 / p.beta) ** 2 + (r + 0.5 / p.beta) ** 2


def apo_zero_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise the chosen likelihood, lower the rejected one:
    (1 − σ(β·c)) + σ(β·r)."""
    return 1.0 - torch.sigmoid(p.beta * c) + torch.sigmoid(p.beta * r)


def apo_down_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, the rejected more: σ(β·c) + (1 − σ(β·(c − r)))."""
    return torch.sigmoid(p.beta * c) + 1.0 - torch.sigmoid(p.beta * (c - r))


def discopop_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, eq. 5), with z = β·(c − r), m = σ(z/τ):
    (1 − m)·(−log σ(z)) + m·e^(−z); m·e^(−z) is computed as e^(−z + log σ(z/τ)), finite for any z."""
    z = p.beta * (c - r)
    tau = p.discopop_tau
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(-z + F.logsigmoid(z / tau))


def dpop_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """DPO-Positive (Pal et al. 2024, eq. 3): −log σ(β·(c − r − λ·max(0, −c))); the penalty keeps the chosen
    completion's likelihood from falling below the reference's."""
    return -F.logsigmoid(p.beta * (c - r - p.dpop_lambda * torch.relu(-c)))


def simpo_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: c, r are the policy's per-token mean log-probs,
    z = β·(c − r) − γ, loss −(1 − ε)·log σ(z) − ε·log σ(−z) (ε: label smoothing as TRL's CPO trainer; the
    paper's loss is ε = 0)."""
    return smoothed_logistic(p.beta * (c - r) - p.simpo_gamma, p.label_smoothing)


ORPO_MAX_MEAN_LOGP = -1e-6  # ORPO's odds need P < 1: per-token means are capped here (odds <= ~1e6)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0, accurate near 0 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 2-7), reference-free: c, r are the policy's per-token mean log-probs (the
    paper's length-normalised P(y|x) = e^c); odds(y) = P/(1 − P); loss = NLL of the chosen (−c, eq. 2)
    + λ·(−log σ(log odds(y_w) − log odds(y_l))). c and r are capped at ORPO_MAX_MEAN_LOGP (a completion of
    probability 1 has infinite odds); below it the loss is the paper's."""
    c = torch.clamp(c, max=ORPO_MAX_MEAN_LOGP)
    r = torch.clamp(r, max=ORPO_MAX_MEAN_LOGP)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -c - p.orpo_lambda * F.logsigmoid(log_odds)


def bco_pair_loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """BCO (Jung et al. 2024, eq. 10, paired data as in TRL): −log σ(β·c − δ) − log σ(−(β·r − δ)), δ the
    reward shift: a running mean of the rewards β·log-ratio (bco_update, LossState), passed in as batch state."""
    return -F.logsigmoid(p.beta * c - state.bco_delta) - F.logsigmoid(-(p.beta * r - state.bco_delta))


def aot_values(name: str, c: Tensor, r: Tensor, ref_margin: Tensor) -> tuple[Tensor, Tensor]:
    """The two quantities AOT sorts (Melnyk et al. 2024, as in TRL): `aot`, the policy's margins
    log πθ(y_w) − log πθ(y_l) (= c − r + the reference's margin) and the reference's margins; `aot_unpaired`,
    the chosen and the rejected log-ratios c and r."""
    return (c - r + ref_margin, ref_margin) if name == "aot" else (c, r)


def aot_partners(x: Tensor, y: Tensor) -> Tensor:
    """(B, 2) float64, detached: for each pair i, the y at x_i's rank among the x (sorted ascending) and the
    x at y_i's rank among the y. Over a whole global batch (dpo_ray.train.step gathers it first), these make AOT's
    loss Σ_k ℓ(β·(x_(k) − y_(k))) a sum of per-pair terms that any micro-batching reproduces. Ties are
    broken by position (a stable sort)."""
    x, y = x.detach().double(), y.detach().double()
    order_x, order_y = torch.sort(x, stable=True).indices, torch.sort(y, stable=True).indices
    rank_x, rank_y = torch.empty_like(order_x), torch.empty_like(order_y)
    rank_x[order_x] = torch.arange(len(x), device=x.device)
    rank_y[order_y] = torch.arange(len(y), device=y.device)
    return torch.stack([y[order_y][rank_x], x[order_x][rank_y]], dim=1)


def aot_loss(x: Tensor, y: Tensor, partners: Tensor, p: LossSpec) -> Tensor:
    """AOT per pair (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    the sorted-quantile loss; ε label smoothing as TRL): the batch's loss Σ_k ℓ(β·(x_(k) − y_(k))),
    ℓ(z) = −(1 − ε)·log σ(z) − ε·log σ(−z), written per pair as ℓ(β·(x_i − y*)) (y* = the y of x_i's rank) plus,
    when y also depends on the policy (aot_unpaired), a term with the value 0 and y_i's gradient."""
    eps = p.label_smoothing
    px, py = partners[:, 0].to(x.dtype), partners[:, 1].to(x.dtype)
    loss = smoothed_logistic(p.beta * (x - px), eps)
    if y.requires_grad:
        term = smoothed_logistic(p.beta * (py - y), eps)
        loss = loss + term - term.detach()
    return loss


def bco_update(delta: float, steps: int, chosen_reward_mean: float, rejected_reward_mean: float) -> tuple[float, int]:
    """BCO's δ after one more optimizer step: the mean over steps of each step's mean reward over its global
    batch ((mean chosen + mean rejected)/2, both all-reduced), so it is the same for any number of workers or
    micro-batches. TRL updates its running mean with the current batch before the loss (per micro-batch);
    here the step uses δ of the steps before it (equal at step 1 from the reference, where rewards are 0)."""
    batch = 0.5 * (chosen_reward_mean + rejected_reward_mean)
    return delta + (batch - delta) / (steps + 1), steps + 1


@dataclass(frozen=True)
class LossState:
    """State a loss carries from one optimizer step to the next, kept by the loop and checkpointed: BCO's δ and
    the number of steps it averages (bco_update). Each step reads `batch` and returns the state after it."""

    bco_delta: float = 0.0
    bco_steps: int = 0

    @property
    def batch(self) -> BatchState:
        return BatchState(bco_delta=self.bco_delta)

    def after(self, chosen_reward_mean: float, rejected_reward_mean: float) -> LossState:
        """The state after a step whose global batch had these mean shift rewards (LossOutput.shift_rewards)."""
        return LossState(*bco_update(self.bco_delta, self.bco_steps, chosen_reward_mean, rejected_reward_mean))


def sigmoid_norm_loss(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """TRL's length-normalised DPO: the sigmoid loss −log σ(β·h) of h from per-token mean log-ratios
    (preference_loss divides each side by its length, with or without average_logps)."""
    return sigmoid_loss(h, beta, label_smoothing)


PairLossFn = Callable[[Tensor, Tensor, LossSpec, BatchState], Tensor]


def _of_margin(fn: Callable[[Tensor, float, float], Tensor]) -> PairLossFn:
    def loss(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
        return fn(c - r, p.beta, p.label_smoothing)

    loss.__doc__ = fn.__doc__
    return loss


# name -> loss of the (B,) chosen and rejected log-ratios log πθ − log πref (summed, or per-token means with
# average_logps; sigmoid_norm always averages).
LOSSES: dict[str, PairLossFn] = {
    "sigmoid": _of_margin(sigmoid_loss),
    "robust": _of_margin(robust_loss),
    "ipo": _of_margin(ipo_loss),
    "hinge": _of_margin(hinge_loss),
    "sigmoid_norm": _of_margin(sigmoid_norm_loss),
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "dpop": dpop_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "bco_pair": bco_pair_loss,
}


def _aot_of_logratios(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, as TRL's `aot`): the policy's margins log πθ(y_w) − log πθ(y_l) and the
    reference's margins, each sorted over the global batch, pushed apart rank by rank with the (ε-smoothed)
    logistic loss of β·(difference) (aot_values, aot_partners, aot_loss). Called on log-ratios alone, as here,
    the reference's margins are taken as 0 (initial_loss's case); preference_loss has the reference's."""
    x, y = c - r, torch.zeros_like(r)
    return aot_loss(x, y, aot_partners(x, y), p)


def _aot_unpaired_of_logratios(c: Tensor, r: Tensor, p: LossSpec, state: BatchState) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, as TRL's `aot_unpaired`; `aot_pair` is older TRL's name): the chosen
    log-ratios and the rejected log-ratios, each sorted over the global batch, pushed apart rank by rank with
    the (ε-smoothed) logistic loss of β·(difference) (aot_values, aot_partners, aot_loss)."""
    return aot_loss(c, r, aot_partners(c, r), p)


LOSSES["aot"] = _aot_of_logratios
LOSSES["aot_unpaired"] = LOSSES["aot_pair"] = _aot_unpaired_of_logratios
_PAIRED = {n for n, e in ENTRIES.items() if not e.unpaired}
if set(LOSSES) != _PAIRED:  # one function per paired spec entry (dpo_ray.objective.spec.ENTRIES), and no other
    raise ImportError(f"dpo_ray.objective.losses: functions {sorted(LOSSES)} but spec entries {sorted(_PAIRED)}")
if set(UNPAIRED_LOSSES) != set(ENTRIES) - _PAIRED:  # the unpaired ones: dpo_ray.objective.unpaired
    raise ImportError(
        f"dpo_ray.objective.unpaired: losses {UNPAIRED_LOSSES} but spec entries {sorted(set(ENTRIES) - _PAIRED)}"
    )


@dataclass(frozen=True)
class InitialLoss:
    """A loss variant at policy == reference (h = 0): its value and |dL/dm|, the slope with respect to the
    reward margin m = β·h (the `rewards/margins` metric). Near h = 0 a mean margin m moves the mean loss by
    about slope·m, so a check of the loss at step 0 tolerates slope × (the margin tolerance)."""

    value: float
    slope: float


def initial_loss(name: str, spec: LossSpec) -> InitialLoss:
    """The value and margin slope of LOSSES[name] when policy == reference (both log-ratios 0), with the
    parameters of `spec`, from the loss function itself (float64 autograd). The slope is the largest
    |dL/d(β·log-ratio)| of the two sides.

    sigmoid: ln 2 and (1 − 2ε)/2; robust: ln 2 and 1/(2(1 − 2ε)); ipo: 1/(4β²) and 1/β²; hinge: 1 and 1.
    """
    if name not in LOSSES:
        raise ValueError(f"loss: unknown variant {name!r}; expected one of {sorted(LOSSES)}")
    if ENTRIES[name].reference_free:
        raise ValueError(f"loss {name!r} is reference-free: it has no value at policy == reference")
    c = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    r = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    f, alpha = spec.f_divergence, spec.f_alpha
    value = LOSSES[name](f_scores(c, f, alpha), f_scores(r, f, alpha), spec, BatchState())
    grads = torch.autograd.grad(value.sum(), (c, r))
    return InitialLoss(float(value.item()), max(abs(float(g.item())) for g in grads) / spec.beta)


@dataclass(frozen=True)
class StepZero:
    """What step 0 of a policy that starts at its reference must show for a loss (or a combination): margins
    0 (when the rewards are log-ratios), the loss `value` (None when it depends on the log-probs: an "sft"
    member, a reference-free member or an RPO term) and `slope`, the combination's |dL/dm| at h = 0."""

    value: float | None
    slope: float
    margins_zero: bool


def step_zero(spec: LossSpec) -> StepZero:
    """StepZero of preference_loss(spec, ...): Σ weights·initial_loss over the members. An unpaired loss's
    value depends on the batch's labels (dpo_ray.objective.unpaired.unpaired_step_zero): None here, and its
    rewards (not margins) are 0 at step 0."""
    if spec.unpaired:
        return StepZero(value=None, slope=0.25 * max(spec.desirable_weight, spec.undesirable_weight), margins_zero=True)
    names = spec.names
    w = [1.0] * len(names) if spec.weights is None else list(spec.weights)
    known = [(n, x) for n, x in zip(names, w, strict=True) if n != SFT and not ENTRIES[n].reference_free]
    inits = [(initial_loss(n, spec), x) for n, x in known]
    exact = len(known) == len(names) and not spec.sft_weight
    first = spec.rewards_from
    return StepZero(
        value=sum(i.value * x for i, x in inits) if exact else None,
        slope=sum(i.slope * x for i, x in inits),
        margins_zero=first is not None and not ENTRIES[first].reference_free,
    )


def preference_loss(
    spec: LossSpec,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    state: BatchState | None = None,
) -> LossOutput:
    """The loss of `spec` per pair: one loss of LOSSES or a weighted combination, plus an optional NLL term.

    policy_*_logps, ref_*_logps: (B,) summed log-probs of the completion tokens.
    *_lengths: (B,) completion token counts (>= 1), used for `average_logps` and the NLL term.
    spec.average_logps: use per-token mean log-probs (length-normalised, as in IPO-as-in-TRL and SimPO)
        instead of sums, for both the log-ratios and the rewards.
    spec.sft_weight: λ of RPO (Pang et al. 2024, eq. 3): adds λ·(−log πθ(y_w|x) / |y_w|) to each pair's loss.
    state: BCO's δ and AOT's global-batch partners (BatchState; default δ = 0, partners from these pairs).
    Returns LossOutput with (B,) tensors; rewards use the same (summed or averaged) log-probs as the loss.
    A reference-free loss gets the policy's per-token mean log-probs whatever `average_logps` (the reference's
    are ignored: pass zeros); its rewards are β·(per-token mean log-prob), as in TRL's CPO and ORPO trainers.

    A list of names is a weighted combination (TRL's MPO form): Σ weights[i]·loss_i per pair (weights default
    to 1), where the member "sft" is the NLL of the chosen, −log πθ(y_w|x)/|y_w|; the rewards are those of
    the first member that is not "sft".
    """
    if spec.unpaired:
        raise ValueError(f"loss {spec.label} trains on unpaired rows: dpo_ray.objective.unpaired.unpaired_losses")
    state = state or BatchState()
    names = spec.names
    w = [1.0] * len(names) if spec.weights is None else [float(x) for x in spec.weights]
    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"shapes: every log-prob and length tensor must be (B,) with the same B; found {shapes}")
    nll = -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
    total: Tensor | None = None
    rewards: tuple[Tensor, Tensor] | None = None
    shift: Tensor | None = None
    for n, weight in zip(names, w, strict=True):
        if n == SFT:
            part = nll
        else:
            part, chosen_rewards, rejected_rewards = _member(n, tensors, spec, state)
            rewards = rewards or (chosen_rewards, rejected_rewards)
            if ENTRIES[n].shift:
                shift = torch.stack([chosen_rewards, rejected_rewards]).detach()
        total = weight * part if total is None else total + weight * part
    assert total is not None
    if rewards is None:  # ["sft"] alone: the DPO rewards of the same log-probs, for the metrics
        _, *both = _member("sigmoid", tensors, spec, state)
        rewards = (both[0], both[1])
    if spec.sft_weight > 0:
        total = total + spec.sft_weight * nll
    return LossOutput(total, rewards[0].detach(), rewards[1].detach(), shift)


def _member(name: str, t: dict[str, Tensor], spec: LossSpec, state: BatchState) -> tuple[Tensor, Tensor, Tensor]:
    """One loss of LOSSES per pair, and its chosen and rejected rewards (see preference_loss)."""
    policy_chosen_logps, policy_rejected_logps = t["policy_chosen_logps"], t["policy_rejected_logps"]
    dtype = policy_chosen_logps.dtype
    ref_chosen = t["ref_chosen_logps"].to(dtype)
    ref_rejected = t["ref_rejected_logps"].to(dtype)
    chosen_len = t["chosen_lengths"].to(dtype)
    rejected_len = t["rejected_lengths"].to(dtype)
    beta = spec.beta
    if ENTRIES[name].reference_free:
        c, r = policy_chosen_logps / chosen_len, policy_rejected_logps / rejected_len
        return LOSSES[name](c, r, spec, state), beta * c, beta * r
    pol_chosen, pol_rejected = policy_chosen_logps, policy_rejected_logps
    if spec.average_logps:
        pol_chosen, ref_chosen = pol_chosen / chosen_len, ref_chosen / chosen_len
        pol_rejected, ref_rejected = pol_rejected / rejected_len, ref_rejected / rejected_len
    chosen_logratios = pol_chosen - ref_chosen
    rejected_logratios = pol_rejected - ref_rejected
    if ENTRIES[name].sorts_batch:  # partners of the global batch from the caller, else of this batch
        x, y = aot_values(name, chosen_logratios, rejected_logratios, ref_chosen - ref_rejected)
        partners = state.aot_partners if state.aot_partners is not None else aot_partners(x, y)
        return aot_loss(x, y, partners, spec), beta * chosen_logratios, beta * rejected_logratios
    if name == "sigmoid_norm" and not spec.average_logps:  # TRL's length-normalised DPO: the loss on per-token means
        c, r = chosen_logratios / chosen_len, rejected_logratios / rejected_len
    else:
        c, r = chosen_logratios, rejected_logratios
    f, alpha = spec.f_divergence, spec.f_alpha
    losses = LOSSES[name](f_scores(c, f, alpha), f_scores(r, f, alpha), spec, state)
    return losses, beta * chosen_logratios, beta * rejected_logratios
