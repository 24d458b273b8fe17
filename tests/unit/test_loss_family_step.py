"""The loss variants through the real train step (packed batching, one pair per micro-batch): the step's
loss equals the loss of dpo_ray.objective.losses applied to log-probs from a separate padded forward of the same
model, with each loss's own parameters carried from TrainSettings (τ, λ, ε)."""

from __future__ import annotations

import pytest
import torch

from tests.loss_calls import loss as _loss
from tests.unit.test_distributed_alignment import PAIRS, _batch, _model

NEW = [
    "sigmoid_norm", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "dpop", "f-js",
    "simpo", "orpo", "mpo", "bco_pair", "aot", "aot_unpaired",
]  # fmt: skip


def _own(loss: str | tuple[str, ...], params: dict) -> dict:
    """The parameters of `params` that the loss (or a combination's members) reads: the spec refuses others."""
    from dpo_ray.objective.spec import ENTRIES

    names = [loss] if isinstance(loss, str) else list(loss)
    entries = [ENTRIES[n] for n in names if n != "sft"]
    keep = {p for e in entries for p in e.params} | (
        {"label_smoothing"} if any(e.smoothing for e in entries) else set()
    )
    return {k: v for k, v in params.items() if k in keep}


@pytest.mark.parametrize("name", NEW)
def test_train_step_loss_is_the_variant_with_its_parameters(name):
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.batching import completion_logps
    from dpo_ray.objective.losses import LossState
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    params = {"label_smoothing": 1e-3 if name == "exo_pair" else 0.0, "discopop_tau": 0.2, "dpop_lambda": 3.0}
    params |= {"simpo_gamma": 0.3, "orpo_lambda": 0.4}
    delta = 0.25  # BCO's δ: batch state, beside the spec
    if name == "f-js":  # f-DPO with the Jensen-Shannon divergence
        name, params = "sigmoid", params | {"f_divergence": "js_divergence"}
    loss: str | tuple[str, ...] = name
    weights: tuple[float, ...] | None = None
    if name == "mpo":  # a weighted combination, TRL's MPO form
        loss, weights = ("sigmoid", "dpop", "sft"), (0.8, 0.3, 1.5)
    beta = 0.7
    model = enable_segment_attention(_model())
    with torch.no_grad():
        prompts = [list(p) for p, _, _ in PAIRS]
        chosen, rejected = [list(c) for _, c, _ in PAIRS], [list(r) for _, _, r in PAIRS]
        logps = completion_logps(model, prompts * 2, chosen + rejected, 0)
    sums = torch.tensor([sum(x) for x in logps], dtype=torch.float64)
    lengths = torch.tensor([len(x) for x in chosen + rejected], dtype=torch.float64)
    n = len(PAIRS)
    # references above the policy on chosen (dpop's penalty is on) and below it on rejected
    shift = torch.tensor([0.5, 1.5, 0.25, 2.0], dtype=torch.float64)
    batch = StepBatch(_batch(PAIRS).pairs, sums[:n] + shift, sums[n:] - shift)

    def single(member: str) -> torch.Tensor:  # one loss, unweighted ("sft": the chosen's per-token NLL)
        if member == "sft":
            return -sums[:n] / lengths[:n]
        args = (sums[:n], sums[n:], batch.ref_chosen, batch.ref_rejected, lengths[:n], lengths[n:])
        return _loss(member, *args, beta=beta, bco_delta=delta, **_own(member, params)).losses

    members = [loss] if isinstance(loss, str) else list(loss)
    expected = sum(w * single(m) for m, w in zip(members, weights or (1.0,) * len(members), strict=True)).mean()  # type: ignore[union-attr]
    spec = LossSpec(
        name=loss if isinstance(loss, str) else list(loss), weights=weights, beta=beta, **_own(loss, params)
    )
    settings = TrainSettings(loss=spec, token_budget=1, batching="packed", max_grad_norm=None)
    opt = make_optimizer(model, "adamw", 1e-3, 0.0)
    step = train_step(
        model, opt, make_scheduler(opt, 0, 1, "constant"), batch, settings, n, loss_state=LossState(delta)
    )
    metrics = step.metrics
    assert abs(metrics["loss"] - float(expected)) < 1e-5, (metrics["loss"], float(expected))
    # The parameter reaches the step: with it dropped on the way, the step would compute the loss at the loss's
    # default (EXO's ε has none: 0 is refused), and that loss is far from `expected` (> 1e-4, the bound is 1e-5).
    # The defaults here used to differ from the losses' own for simpo (1.0) and bco_pair (-0.5): a dropped γ or δ
    # would have passed.
    if name in ("discopop", "dpop", "exo_pair", "simpo", "orpo", "bco_pair"):
        other = {
            "discopop": {"discopop_tau": 0.05},
            "dpop": {"dpop_lambda": 50.0},
            "exo_pair": {"label_smoothing": 0.2},
            "simpo": {"simpo_gamma": 0.5},
            "orpo": {"orpo_lambda": 0.1},
            "bco_pair": {"bco_delta": 0.0},
        }
        for key, value in other[name].items():  # each the loss's default (the spec's, or the loop's first δ)
            default = LossState().bco_delta if key == "bco_delta" else LossSpec.model_fields[key].default
            assert key == "label_smoothing" or default == value, (key, value)
        state = {"bco_delta": other[name].get("bco_delta", delta)}
        moved = _loss(
            name, sums[:n], sums[n:], batch.ref_chosen, batch.ref_rejected, lengths[:n], lengths[n:], beta=beta,
            **state, **(_own(name, params) | {k: v for k, v in other[name].items() if k != "bco_delta"}),
        ).losses.mean()  # fmt: skip
        assert abs(float(moved) - float(expected)) > 1e-4
