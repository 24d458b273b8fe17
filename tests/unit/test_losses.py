"""Loss variants against independent float64 NumPy implementations of the papers' formulas."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from dpo_ray.objective.losses import LOSSES
from dpo_ray.objective.spec import ENTRIES
from tests.loss_calls import initial, loss, zero_step


def _logsig(x: np.ndarray) -> np.ndarray:
    # log σ(x) = −log(1 + e^{−x}), written stably for both signs.
    return np.where(x >= 0, -np.log1p(np.exp(-x)), x - np.log1p(np.exp(x)))


def _reference(name, pc, pr, rc, rr, lc, lr, beta, eps, sft, average):
    """Float64 re-derivation of each variant (not calling the code under test)."""
    if name in ("simpo", "orpo"):  # reference-free, on per-token means (both papers)
        c, r = pc / lc, pr / lr
        if name == "simpo":
            z = beta * (c - r) - 0.5  # γ = 0.5
            loss = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
        else:
            log_odds = (c - np.log1p(-np.exp(c))) - (r - np.log1p(-np.exp(r)))  # log(P/(1 − P)), P = e^mean
            loss = -c - 0.1 * _logsig(log_odds)  # NLL of the chosen + λ·odds-ratio term, λ = 0.1
        return loss + sft * (-pc / lc), beta * c, beta * r
    if average:
        pcs, prs, rcs, rrs = pc / lc, pr / lr, rc / lc, rr / lr
    else:
        pcs, prs, rcs, rrs = pc, pr, rc, rr
    h = (pcs - rcs) - (prs - rrs)
    if name == "sigmoid":
        loss = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
    elif name == "robust":
        loss = (-(1 - eps) * _logsig(beta * h) + eps * _logsig(-beta * h)) / (1 - 2 * eps)
    elif name == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif name == "hinge":
        loss = np.maximum(0.0, 1 - beta * h)
    elif name == "sigmoid_norm":  # TRL: DPO on per-token mean log-ratios (whatever `average`)
        hn = (pc - rc) / lc - (pr - rr) / lr
        loss = -(1 - eps) * _logsig(beta * hn) - eps * _logsig(-beta * hn)
    elif name == "exo_pair":
        z = beta * h
        qw, ql = np.exp(_logsig(z)), np.exp(_logsig(-z))
        loss = qw * (_logsig(z) - np.log(1 - eps)) + ql * (_logsig(-z) - np.log(eps))
    else:
        cw, cl = pcs - rcs, prs - rrs  # per-side log-ratios
        if name == "nca_pair":
            loss = -_logsig(beta * cw) - 0.5 * _logsig(-beta * cw) - 0.5 * _logsig(-beta * cl)
        elif name == "sppo_hard":
            loss = (cw - 1 / (2 * beta)) ** 2 + (cl + 1 / (2 * beta)) ** 2
        elif name == "apo_zero":
            loss = (1 - 1 / (1 + np.exp(-beta * cw))) + 1 / (1 + np.exp(-beta * cl))
        elif name == "apo_down":
            loss = 1 / (1 + np.exp(-beta * cw)) + (1 - 1 / (1 + np.exp(-beta * h)))
        elif name == "discopop":
            z, tau = beta * h, 0.05
            m = 1 / (1 + np.exp(-z / tau))
            loss = (1 - m) * -_logsig(z) + m * np.exp(-z)
        elif name == "dpop":
            loss = -_logsig(beta * (h - 50.0 * np.maximum(0.0, -cw)))
        elif name == "bco_pair":  # δ = 0 here (the default); test_bco_shift sets it
            loss = -_logsig(beta * cw) - _logsig(-beta * cl)
        elif name in ("aot", "aot_unpaired", "aot_pair"):  # sorted over the batch: the k-th smallest against the k-th
            # aot: the policy's margins against the reference's; aot_unpaired: chosen against rejected log-ratios.
            x, y = (pcs - prs, rcs - rrs) if name == "aot" else (cw, cl)
            # Σ_k ℓ(β·(x_(k) − y_(k))), written per pair: pair i carries the term of its x's rank k.
            rank = np.argsort(np.argsort(x, kind="stable"), kind="stable")
            z = beta * (x - np.sort(y)[rank])
            loss = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    loss = loss + sft * (-pc / lc)
    return loss, beta * (pcs - rcs), beta * (prs - rrs)


def _random_inputs(seed: int, batch: int = 16):
    g = np.random.default_rng(seed)
    lc = g.integers(1, 60, batch).astype(np.float64)
    lr = g.integers(1, 60, batch).astype(np.float64)
    pc, pr = -g.uniform(0.5, 4, batch) * lc, -g.uniform(0.5, 4, batch) * lr
    rc, rr = pc + g.normal(0, 3, batch), pr + g.normal(0, 3, batch)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize(("eps", "sft"), [(0.0, 0.0), (0.1, 0.0), (0.3, 0.5)])
def test_variants_match_float64_reference(name, average, eps, sft):
    seed = zlib.crc32(repr((name, average, eps)).encode()) % 1000  # the same every run (hash() is salted)
    pc, pr, rc, rr, lc, lr = _random_inputs(seed)
    beta = 0.1 if name != "ipo" else 0.5
    if name == "exo_pair" and eps == 0:
        eps = 1e-3  # EXO needs ε > 0
    eps = eps if ENTRIES[name].smoothing else 0.0  # the spec refuses ε for a loss that does not take it
    expected = _reference(name, pc, pr, rc, rr, lc, lr, beta, eps, sft, average)
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, lc, lr)]
    out = loss(name, *t, beta=beta, label_smoothing=eps, sft_weight=sft, average_logps=average)
    got_losses = out.losses.numpy()
    # Every loss pair by pair, AOT's too (with an sft term its per-pair losses used to be checked only through
    # their sum, which a wrong pairing of the NLL terms keeps).
    for got, want in zip((got_losses, out.chosen_rewards.numpy(), out.rejected_rewards.numpy()), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_float32_inputs_close_to_float64_reference():
    pc, pr, rc, rr, lc, lr = _random_inputs(7)
    expected, _, _ = _reference("sigmoid", pc, pr, rc, rr, lc, lr, 0.1, 0.0, 0.0, False)
    t = [torch.tensor(x, dtype=torch.float32) for x in (pc, pr)] + [
        torch.tensor(x, dtype=torch.float64) for x in (rc, rr, lc, lr)
    ]
    out = loss("sigmoid", *t, beta=0.1)
    assert out.losses.dtype == torch.float32
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-5)


def test_policy_equals_reference_gives_ln2_and_zero_rewards():
    pc, pr, _, _, lc, lr = _random_inputs(3)
    t = [torch.tensor(x) for x in (pc, pr, pc, pr, lc, lr)]
    out = loss("sigmoid", *t, beta=0.3)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)), atol=1e-6, rtol=0)
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_sigmoid_gradient_matches_closed_form():
    """d mean_b[−log σ(β h_b)] / d πθ_w,b = −β σ(−β h_b) / B (chain rule: d h / d πθ_w = 1)."""
    pc, pr, rc, rr, lc, lr = _random_inputs(11, batch=9)
    beta = 0.2
    policy_chosen = torch.tensor(pc, requires_grad=True)
    t = [torch.tensor(x) for x in (pr, rc, rr, lc, lr)]
    out = loss("sigmoid", policy_chosen, *t, beta=beta)
    out.losses.mean().backward()
    h = (pc - rc) - (pr - rr)
    closed = -beta * (1 / (1 + np.exp(beta * h))) / len(h)
    np.testing.assert_allclose(policy_chosen.grad.numpy(), closed, rtol=1e-9)
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("name", ["robust", "sigmoid"])
def test_zero_smoothing_reduces_to_dpo(name):
    """rDPO and cDPO at ε = 0 are the paper's DPO, −log σ(β·h), written here in float64 (h from the inputs).

    The cDPO line used to compare sigmoid at ε = 0 with sigmoid itself (the same call: it could not fail); each
    line now fails when the loss at ε = 0 is not DPO's (checked: sigmoid_loss with its ε fixed at 0.1)."""
    pc, pr, rc, rr, lc, lr = _random_inputs(5)
    t = [torch.tensor(x) for x in (pc, pr, rc, rr, lc, lr)]
    dpo = -_logsig(0.1 * ((pc - rc) - (pr - rr)))
    smoothed = loss(name, *t, beta=0.1, label_smoothing=0.0)
    np.testing.assert_allclose(smoothed.losses.numpy(), dpo, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
        ({"beta": 0.1, "sft_weight": -1.0}, "sft_weight"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    t = [torch.tensor(x) for x in _random_inputs(1)]
    with pytest.raises(ValueError, match=argument):
        loss("sigmoid", *t, **kwargs)


def test_mismatched_shapes_and_unknown_variant():
    t = [torch.tensor(x) for x in _random_inputs(1)]
    with pytest.raises(ValueError, match="shapes"):
        loss("sigmoid", t[0][:3], *t[1:], beta=0.1)
    with pytest.raises(ValueError, match="shapes"):
        loss("sigmoid", t[0].reshape(4, 4), *[x.reshape(4, 4) for x in t[1:]], beta=0.1)
    with pytest.raises(ValueError, match="unknown loss 'xpo'"):
        loss("xpo", *t, beta=0.1)
    with pytest.raises(ValueError, match="trains on unpaired rows"):  # kto has its own function and batches
        loss("kto", *t, beta=0.1)


def test_initial_loss_and_slope_match_hand_derivations():
    """At h = 0: sigmoid ln 2, slope (1 − 2ε)/2 per unit of margin β·h; robust ln 2, 1/(2(1 − 2ε));
    IPO 1/(4β²), 1/β²; hinge 1, 1."""

    beta, eps = 0.2, 0.1
    cases = {
        ("sigmoid", 0.0): (math.log(2), 0.5),
        ("sigmoid", eps): (math.log(2), (1 - 2 * eps) / 2),
        ("robust", eps): (math.log(2), 1 / (2 * (1 - 2 * eps))),
        ("ipo", 0.0): (1 / (4 * beta**2), 1 / beta**2),
        ("hinge", 0.0): (1.0, 1.0),
        ("sigmoid_norm", 0.0): (math.log(2), 0.5),
        ("nca_pair", 0.0): (2 * math.log(2), 0.25),  # d/d(βc): −σ(0) + ½σ(0); d/d(βr): ½σ(0)
        ("sppo_hard", 0.0): (1 / (2 * beta**2), 1 / beta**2),  # d/d(βc) of (c − 1/(2β))²: 2·(−1/(2β))/β
        ("apo_zero", 0.0): (1.0, 0.25),
        ("apo_down", 0.0): (1.0, 0.25),  # chosen side: σ'(0) − σ'(0) = 0; rejected side: σ'(0)
        # dL/dz at 0 with m' = 1/(4τ): −m'·ln 2 − ½·½ + m'·1 − ½
        ("discopop", 0.0): ((math.log(2) + 1) / 2, (1 - math.log(2)) / (4 * 0.05) - 0.75),
        ("dpop", 0.0): (math.log(2), 0.5),  # relu'(0) = 0: the penalty is off at c = 0
        ("bco_pair", 0.0): (2 * math.log(2), 0.5),  # −log σ(0) twice; each side's slope σ(0)
        ("aot", 0.0): (math.log(2), 0.5),  # one pair: ℓ(β·h), as sigmoid
        ("aot_unpaired", 0.0): (math.log(2), 0.5),
        ("exo_pair", eps): (
            0.5 * (math.log(0.5) - math.log(1 - eps)) + 0.5 * (math.log(0.5) - math.log(eps)),
            abs(0.25 * (math.log(1 - eps) - math.log(eps)) * -1),
        ),
    }
    for (name, ls), (value, slope) in cases.items():
        got = initial(name, beta, ls)
        assert math.isclose(got.value, value, rel_tol=1e-12), name
        assert math.isclose(got.slope, slope, rel_tol=1e-12), name
    for name in ("simpo", "orpo"):
        with pytest.raises(ValueError, match=f"loss '{name}' is reference-free"):
            initial(name, beta)


def test_reference_free_losses_ignore_the_reference_and_always_average():
    pc, pr, rc, rr, lc, lr = (torch.tensor(x) for x in _random_inputs(11))
    for name in ("simpo", "orpo"):
        base = loss(name, pc, pr, rc, rr, lc, lr, beta=2.0)
        other = loss(name, pc, pr, rc + 5.0, rr - 3.0, lc, lr, beta=2.0, average_logps=True)
        assert torch.equal(base.losses, other.losses) and torch.equal(base.chosen_rewards, other.chosen_rewards)


def test_simpo_and_orpo_parameters_and_the_orpo_cap():
    """SimPO's γ shifts the margin (γ = β·Δ gives ln 2); ORPO's λ scales the odds-ratio term, which is 0 at
    λ = 0 (the NLL alone); a completion of mean log-prob 0 (P = 1, infinite odds) stays finite."""
    lc = lr = torch.tensor([4.0], dtype=torch.float64)
    pc, pr = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-6.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    simpo = loss("simpo", pc, pr, zero, zero, lc, lr, beta=2.0, simpo_gamma=2.0)  # β·(−0.5 + 1.5) = 2
    assert math.isclose(simpo.losses.item(), math.log(2), rel_tol=1e-12)
    nll = loss("orpo", pc, pr, zero, zero, lc, lr, beta=0.1, orpo_lambda=0.0)
    assert math.isclose(nll.losses.item(), 0.5, rel_tol=1e-12)  # −mean log-prob of the chosen
    sure = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    capped = loss("orpo", sure, pr, zero, zero, lc, lr, beta=0.1, orpo_lambda=1.0)
    capped.losses.sum().backward()
    assert torch.isfinite(capped.losses).all() and sure.grad is not None and torch.isfinite(sure.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_extreme_margins_give_finite_losses_and_gradients(name):
    """|β·h| up to 1e4 (a policy far from its reference): no inf or NaN in the loss or its gradient."""
    beta = 0.1
    pc = torch.tensor([-1e5, 1e5, -1e5, 0.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([1e5, -1e5, -1e5, 1e5], dtype=torch.float64)
    zeros, ones = torch.zeros(4, dtype=torch.float64), torch.full((4,), 7.0, dtype=torch.float64)
    ls = 1e-3 if name == "exo_pair" else 0.0
    out = loss(name, pc, pr, zeros, zeros, ones, ones, beta=beta, label_smoothing=ls)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all(), out.losses
    assert pc.grad is not None and torch.isfinite(pc.grad).all(), pc.grad


@pytest.mark.parametrize(
    ("divergence", "alpha"),
    [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
     ("alpha_divergence", 1.7), ("alpha_divergence", 1.0)],
)  # fmt: skip
def test_f_divergence_sigmoid_matches_float64_reference(divergence, alpha):
    """f-DPO: −log σ(β·(f′(t_w) − f′(t_l))), t = πθ/πref, f′ in TRL's convention (Wang et al. 2023, Thm 1)."""
    pc, pr, rc, rr, lc, lr = _random_inputs(zlib.crc32(divergence.encode()) % 1000)
    beta = 0.1
    u_w, u_l = pc - rc, pr - rr  # log t

    def fprime(u):
        if divergence == "reverse_kl" or (divergence == "alpha_divergence" and alpha == 1.0):
            return u
        if divergence == "forward_kl":
            return 1 - np.exp(-u)
        if divergence == "js_divergence":
            t = np.exp(u)
            return np.log(2 * t / (1 + t))
        return (np.exp((alpha - 1) * u) - 1) / (alpha - 1)

    want = -_logsig(beta * (fprime(u_w) - fprime(u_l)))
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, lc, lr)]
    out = loss("sigmoid", *t, beta=beta, f_divergence=divergence, f_alpha=alpha)
    np.testing.assert_allclose(out.losses.numpy(), want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out.chosen_rewards.numpy(), beta * u_w, rtol=1e-12)  # rewards stay log-ratios


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_at_extremes_and_at_the_start(divergence):

    pc = torch.tensor([-1e5, 1e5, 0.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([1e5, -1e5, 1e5], dtype=torch.float64)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = loss("sigmoid", pc, pr, zeros, zeros, ones, ones, beta=0.1, f_divergence=divergence)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and pc.grad is not None and torch.isfinite(pc.grad).all()
    got = initial("sigmoid", 0.1, f_divergence=divergence)
    # f′ is 0 at t = 1 for all of them; its slope there is 1, except JS: ½
    assert math.isclose(got.value, math.log(2), rel_tol=1e-12)
    assert math.isclose(got.slope, 0.25 if divergence == "js_divergence" else 0.5, rel_tol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences_of_the_float64_reference(name):
    """d(loss)/d(policy log-probs) by autograd equals central differences of the NumPy re-derivation."""
    pc, pr, rc, rr, lc, lr = _random_inputs(zlib.crc32(name.encode()) % 1000, batch=6)
    beta, eps = (0.5 if name == "ipo" else 0.1), (1e-3 if name == "exo_pair" else 0.0)
    t = [torch.tensor(x, dtype=torch.float64, requires_grad=i < 2) for i, x in enumerate((pc, pr, rc, rr, lc, lr))]
    loss(name, *t, beta=beta, label_smoothing=eps).losses.sum().backward()
    step = 1e-6
    for k, (got, x) in enumerate(((t[0].grad, pc), (t[1].grad, pr))):
        want = np.zeros_like(x)
        for i in range(len(x)):
            up, down = x.copy(), x.copy()
            up[i] += step
            down[i] -= step
            args = (
                [(up if k == 0 else pc), (up if k == 1 else pr)],
                [(down if k == 0 else pc), (down if k == 1 else pr)],
            )
            hi = _reference(name, *args[0], rc, rr, lc, lr, beta, eps, 0.0, False)[0].sum()
            lo = _reference(name, *args[1], rc, rr, lc, lr, beta, eps, 0.0, False)[0].sum()
            want[i] = (hi - lo) / (2 * step)
        assert got is not None
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7, err_msg=f"{name} side {k}")


@pytest.mark.parametrize(
    ("names", "weights"),
    [(["sigmoid", "sft"], [0.8, 1.0]), (["ipo", "nca_pair", "sft"], None), (["simpo", "sft"], [1.0, 0.5])],
)
def test_a_combination_is_the_weighted_sum_of_its_members(names, weights):
    """TRL's MPO form: Σ w_i·loss_i per pair, "sft" the chosen's per-token NLL; rewards of the first member."""
    pc, pr, rc, rr, lc, lr = _random_inputs(21)
    beta = 0.5
    w = weights or [1.0] * len(names)
    parts = [
        (-pc / lc) if n == "sft" else _reference(n, pc, pr, rc, rr, lc, lr, beta, 0.0, 0.0, False)[0] for n in names
    ]
    want = sum(x * p for x, p in zip(w, parts, strict=True))
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, lc, lr)]
    out = loss(names, *t, beta=beta, weights=weights)
    np.testing.assert_allclose(out.losses.numpy(), want, rtol=1e-9)
    _, chosen_rewards, _ = _reference(names[0], pc, pr, rc, rr, lc, lr, beta, 0.0, 0.0, False)
    np.testing.assert_allclose(out.chosen_rewards.numpy(), chosen_rewards, rtol=1e-9)


def test_bad_combinations_name_the_problem():
    t = [torch.tensor(x) for x in _random_inputs(5)]
    with pytest.raises(ValueError, match="names each loss once"):
        loss(["sigmoid", "sigmoid"], *t, beta=0.1)
    with pytest.raises(ValueError, match="2 weights for 3 losses"):
        loss(["sigmoid", "ipo", "sft"], *t, beta=0.1, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        loss(["sigmoid", "sft"], *t, beta=0.1, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="unknown loss 'xpo'"):
        loss(["sigmoid", "xpo"], *t, beta=0.1)
    with pytest.raises(ValueError, match="is trained alone"):
        loss(["sigmoid", "kto"], *t, beta=0.1)


def test_step_zero_of_combinations():
    """Σ w·value and Σ w·slope over reference-based members; value unknown with an NLL or reference-free
    member; margins 0 only when the rewards come from a reference-based member."""

    beta = 0.2
    both = zero_step(["sigmoid", "ipo"], [0.5, 2.0], beta)
    assert math.isclose(both.value, 0.5 * math.log(2) + 2.0 / (4 * beta**2), rel_tol=1e-12)
    assert math.isclose(both.slope, 0.5 * 0.5 + 2.0 / beta**2, rel_tol=1e-12) and both.margins_zero
    with_sft = zero_step(["sigmoid", "sft"], None, beta)
    assert with_sft.value is None and with_sft.margins_zero and with_sft.slope == initial("sigmoid", beta).slope
    assert zero_step(["sigmoid"], None, beta, sft_weight=0.1).value is None
    free = zero_step(["simpo", "sft"], None, beta)
    assert free.value is None and not free.margins_zero
    assert not zero_step(["sft"], None, beta).margins_zero


def test_bco_shift_and_its_running_mean():
    """BCO with δ: −log σ(β·c − δ) − log σ(−(β·r − δ)); δ after k steps is the mean of the steps' mean rewards."""
    from dpo_ray.objective.losses import bco_update

    pc, pr, rc, rr, lc, lr = _random_inputs(31)
    beta, delta = 0.3, 0.7
    cw, cl = pc - rc, pr - rr
    want = -_logsig(beta * cw - delta) - _logsig(-(beta * cl - delta))
    t = [torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr, lc, lr)]
    got = loss("bco_pair", *t, beta=beta, bco_delta=delta).losses.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    state = (0.0, 0)
    steps = [(0.5, -0.1), (1.5, 0.3), (-0.2, -0.6)]
    for chosen, rejected in steps:
        state = bco_update(*state, chosen, rejected)
    assert state[1] == 3 and math.isclose(state[0], np.mean([(c + r) / 2 for c, r in steps]), rel_tol=1e-12)
