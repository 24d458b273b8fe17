"""Training health (dpo_ray.objective.health): the signals against independent computations, and the guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpo_ray.objective.health import (
    CHOSEN_SHIFT,
    GRAD_NORM_RATIO,
    KL,
    REJECTED_SHIFT,
    HealthSpec,
    alarms,
    grad_norm_ratio,
)


def test_grad_norm_ratio_is_to_the_median_of_the_steps_before():
    assert grad_norm_ratio(5.0, []) == 1.0  # nothing to compare with at the first step
    assert grad_norm_ratio(6.0, [1.0, 3.0, 2.0]) == 3.0  # median 2
    assert grad_norm_ratio(5.0, [1.0, 2.0, 3.0, 100.0]) == 2.0  # median of an even count: (2 + 3) / 2
    assert grad_norm_ratio(4.0, [float("nan"), 2.0]) == 2.0  # a non-finite norm is no baseline
    assert grad_norm_ratio(4.0, [0.0]) == 1.0


def test_guards_fire_on_their_side_of_the_limit_from_after_step_on():
    spec = HealthSpec.model_validate(
        {
            "chosen_logp_shift": {"limit": -0.5, "action": "stop"},
            "kl": {"limit": 10.0, "action": "warn"},
            "grad_norm_ratio": {"limit": None},
            "after_step": 3,
        }
    )
    bad = {CHOSEN_SHIFT: -0.6, KL: 12.0, GRAD_NORM_RATIO: 1e6, REJECTED_SHIFT: -9.0}
    assert alarms(bad, spec, step=2) == []  # before after_step
    fired = {a.signal: a for a in alarms(bad, spec, step=3)}
    assert set(fired) == {CHOSEN_SHIFT, KL}  # the ratio's guard is off; the rejected shift has none
    assert fired[CHOSEN_SHIFT].action == "stop" and fired[KL].action == "warn"
    message = fired[CHOSEN_SHIFT].message()
    assert "at step 3" in message and "below its limit -0.5" in message and "train.health.chosen_logp_shift" in message
    assert "lower train.optim.lr" in message and "dpop" in message  # the remedies
    assert "above its limit 10" in fired[KL].message() and "train.health.kl" in fired[KL].message()
    assert alarms({CHOSEN_SHIFT: -0.4, KL: 10.0}, spec, step=9) == []  # at the limit: no alarm
    assert alarms({CHOSEN_SHIFT: float("nan")}, spec, step=9) == []  # a missing or non-finite signal never fires


def test_the_config_validates_the_guards():
    from pipeline.config import ConfigError, load_config

    cfg = load_config(None, ["train.model=m", "train.health.kl.limit=30", "train.health.kl.action=stop"])
    assert cfg.train is not None and (cfg.train.health.kl.limit, cfg.train.health.kl.action) == (30.0, "stop")
    assert cfg.train.health.chosen_logp_shift.limit is not None  # on by default
    # Setting the action alone keeps the signal's own default limit (the guard is not switched off).
    only = load_config(None, ["train.model=m", "train.health.chosen_logp_shift.action=stop"]).train
    assert only is not None and only.health.chosen_logp_shift.limit == HealthSpec().chosen_logp_shift.limit
    with pytest.raises(ConfigError, match="train.health.kl.action"):
        load_config(None, ["train.model=m", "train.health.kl.action=explode"])


def test_the_steps_health_signals_match_an_unbatched_float64_computation():
    """train_step's health/... (one pair per micro-batch) against log-probs of one unbatched forward per sequence:
    the per-token shifts Σ(log π − log πref) / Σ tokens of each side, and the mean of log πref − log π over
    both sides' sequences."""
    from dpo_ray.compute.batching import completion_logps
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step
    from tests.unit.test_distributed_alignment import PAIRS, _batch, _model

    model = _model()
    prompts = [list(p) for p, _, _ in PAIRS]
    chosen, rejected = [list(c) for _, c, _ in PAIRS], [list(r) for _, _, r in PAIRS]
    with torch.no_grad():
        logps = completion_logps(model, prompts * 2, chosen + rejected, 0, token_budget=1)
    n = len(PAIRS)
    pol = np.array([sum(map(float, x)) for x in logps], dtype=np.float64)
    lengths = np.array([len(x) for x in chosen + rejected], dtype=np.float64)
    ref = pol + np.linspace(0.5, 2.0, 2 * n)  # the reference above the policy, by a different amount per sequence
    batch = StepBatch(_batch(PAIRS).pairs, torch.tensor(ref[:n]), torch.tensor(ref[n:]))
    opt = make_optimizer(model, "adamw", 1e-3, 0.0)
    settings = TrainSettings(token_budget=1, batching="padded", max_grad_norm=None)
    metrics = train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), batch, settings, n).metrics
    diff = pol - ref
    want = {
        CHOSEN_SHIFT: diff[:n].sum() / lengths[:n].sum(),
        REJECTED_SHIFT: diff[n:].sum() / lengths[n:].sum(),
        KL: -diff.mean(),
    }
    # The policy's log-probs are float32 sums of ~10 tokens of magnitude ~7: relative error ~1e-6 of the sums,
    # the differences here are 0.5-2 nats, so 1e-4 absolute is 100x the error and 1/5000 of the smallest shift.
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4), key
    assert metrics["health/nonfinite"] == 0.0


def test_a_non_finite_loss_is_flagged_by_the_step():
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step
    from tests.unit.test_distributed_alignment import PAIRS, _batch, _model

    model = _model()
    n = len(PAIRS)
    ref = torch.zeros(n, dtype=torch.float64)
    ref[1] = math.nan
    opt = make_optimizer(model, "adamw", 1e-3, 0.0)
    settings = TrainSettings(token_budget=1, batching="padded", max_grad_norm=None)
    batch = StepBatch(_batch(PAIRS).pairs, ref, torch.zeros(n, dtype=torch.float64))
    metrics = train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), batch, settings, n).metrics
    assert metrics["health/nonfinite"] == 1.0
