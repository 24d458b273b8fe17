"""The unpaired losses (dpo_ray.objective.unpaired) against a float64 re-derivation from the KTO and APO papers
written here with the math module, row by row; their gradients against central finite differences; z₀ over any
split of the batch; the step-0 value; the weight guidance against the paper's eq. 8 bounds."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dpo_ray.objective.unpaired import (
    reference_point,
    unpaired_losses,
    unpaired_step_zero,
    weight_guidance,
)


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _by_hand(name, pol, ref, labels, z0, beta, wd, wu):
    """KTO eq. 7-8 (Ethayarajh et al. 2024) and APO-zero unpaired, one row at a time in float64."""
    out = []
    for p, q, good in zip(pol, ref, labels, strict=True):
        r = p - q
        if name == "kto":
            out.append(wd * (1 - _sig(beta * (r - z0))) if good else wu * (1 - _sig(beta * (z0 - r))))
        else:
            out.append(wd * (1 - _sig(beta * r)) if good else wu * _sig(beta * r))
    return out


def _rows(n=12, seed=0):
    rng = random.Random(seed)
    pol = [rng.uniform(-60, -5) for _ in range(n)]
    ref = [p + rng.uniform(-8, 8) for p in pol]
    labels = [rng.random() < 0.6 for _ in range(n)]
    labels[0], labels[1] = True, False  # both labels present
    return pol, ref, labels


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("beta,wd,wu,z0", [(0.1, 1.0, 1.0, 0.0), (0.5, 1.0, 1.33, 2.7), (0.05, 0.7, 1.0, 11.0)])
def test_values_equal_the_papers_formulas_in_float64(name, beta, wd, wu, z0):
    pol, ref, labels = _rows()
    got = unpaired_losses(
        name,
        torch.tensor(pol, dtype=torch.float64),
        torch.tensor(ref, dtype=torch.float64),
        torch.tensor(labels),
        z0,
        beta,
        wd,
        wu,
    )
    want = _by_hand(name, pol, ref, labels, z0, beta, wd, wu)
    # float64 against float64: the sigmoid's rounding, ~1e-16 relative; 1e-12 leaves room for exp's ulps.
    assert got.losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert got.rewards.tolist() == pytest.approx([beta * (p - q) for p, q in zip(pol, ref, strict=True)], rel=1e-12)
    if name == "apo_zero_unpaired" and z0:  # apo_zero_unpaired has no reference point
        assert got.losses.tolist() == pytest.approx(_by_hand(name, pol, ref, labels, 0.0, beta, wd, wu), rel=1e-12)
    if name == "kto":  # z₀ matters to the implementation (a guard against a loss that ignores it)
        moved = unpaired_losses(
            name,
            torch.tensor(pol, dtype=torch.float64),
            torch.tensor(ref, dtype=torch.float64),
            torch.tensor(labels),
            z0 + 3.0,
            beta,
            wd,
            wu,
        ).losses
        assert float((moved - got.losses).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_gradients_equal_central_differences(name):
    pol, ref, labels = _rows(8, seed=3)
    x = torch.tensor(pol, dtype=torch.float64, requires_grad=True)
    r, lab = torch.tensor(ref, dtype=torch.float64), torch.tensor(labels)
    out = unpaired_losses(name, x, r, lab, 1.5, 0.3, 0.8, 1.2).losses.mean()
    (grad,) = torch.autograd.grad(out, x)
    h = 1e-6
    for i in range(len(pol)):
        up = list(pol)
        down = list(pol)
        up[i] += h
        down[i] -= h
        num = (
            sum(_by_hand(name, up, ref, labels, 1.5, 0.3, 0.8, 1.2))
            - sum(_by_hand(name, down, ref, labels, 1.5, 0.3, 0.8, 1.2))
        ) / (2 * h * len(pol))
        # central differences in float64: truncation O(h²)·f''' ~ 1e-12, rounding ~ ε·f/h ~ 1e-10.
        assert float(grad[i]) == pytest.approx(num, abs=1e-8)


def test_the_reference_point_is_the_same_for_any_split_and_clamped_at_zero():
    rng = random.Random(5)
    kl = [rng.uniform(-1.0, 3.0) for _ in range(40)]
    whole = reference_point(sum(kl), len(kl))
    assert whole == pytest.approx(max(0.0, math.fsum(kl) / 40), rel=1e-12)
    for parts in (2, 5, 8):  # workers x micro-batches: the caller all-reduces sums and counts
        chunks = [kl[i::parts] for i in range(parts)]
        s, n = sum(sum(c) for c in chunks), sum(len(c) for c in chunks)
        assert reference_point(s, n) == pytest.approx(whole, rel=1e-12)
    assert reference_point(-5.0, 10) == 0.0 and reference_point(0.0, 0) == 0.0


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_step_zero_is_half_the_mean_weight(name):
    n = 10
    labels = torch.tensor([True] * 7 + [False] * 3)
    zeros = torch.full((n,), -20.0, dtype=torch.float64)
    got = unpaired_losses(name, zeros, zeros.clone(), labels, reference_point(0.0, n), 0.1, 1.0, 2.0).losses.mean()
    assert float(got) == pytest.approx(unpaired_step_zero(7, 3, 1.0, 2.0), rel=1e-12)
    assert unpaired_step_zero(7, 3, 1.0, 2.0) == pytest.approx((7 + 6) / 20)


def test_weight_guidance_follows_the_papers_bounds():
    assert weight_guidance(50, 50, 1.0, 1.0) is None  # balanced
    assert weight_guidance(40, 30, 1.0, 1.0) is None  # 4/3 exactly
    msg = weight_guidance(10, 90, 1.0, 1.0)
    assert msg is not None and "outside [1, 4/3]" in msg and "desirable_weight in [9, 12]" in msg
    assert weight_guidance(10, 90, 10.0, 1.0) is None  # the rarer side weighed up into the range
    assert weight_guidance(90, 10, 1.0, 1.0) is not None
    assert "no undesirable" in (weight_guidance(5, 0, 1.0, 1.0) or "")


def test_a_wrong_shape_or_name_is_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown 'sigmoid'"):
        unpaired_losses("sigmoid", x, x, torch.ones(3, dtype=torch.bool), 0.0, 0.1)
    with pytest.raises(ValueError, match="shapes"):
        unpaired_losses("kto", x, torch.zeros(4), torch.ones(3, dtype=torch.bool), 0.0, 0.1)
