"""Float32 bounds for the numeric suites, relative to the scale of what is compared, and why they are what they are.

Two float32 computations of one function that differ only in the order of their sums (another batch layout,
another kernel path: ATEN_CPU_CAPABILITY=default|avx2|avx512, MKL_ENABLE_INSTRUCTIONS=AVX2, compiled or eager,
another CPU) differ by rounding, and rounding is relative to the size of the sums: a sum of K terms computed in
another order differs by about sqrt(K)·u of its terms' magnitude (u = 2^-24 ≈ 6e-8, float32's unit roundoff), K·u
at worst. An element of a gradient that is near zero because large terms cancelled carries the error of those terms,
not of itself: element-wise tolerances near zero (atol) fail on another kernel path while the tensor is exact to a
few u of its norm (an AMD EPYC failed `atol=2e-5, rtol=1e-4` on one of 2,048 gradient elements, 1.3e-3 relative to
itself). So whole tensors are compared: ‖got − want‖₂ / ‖want‖₂.

LOGPS: the forward of the tiny models (hidden size ≤ 128, vocab ≤ 1024, ≤ 64 positions) is a chain of about six
reductions per layer (norm, q/k/v, attention over the keys, o and MLP projections), 2 layers, then the head over
the vocabulary and its log-softmax: each contributes ~sqrt(K)·u ≈ 2e-6 at K = 1024, and the ~14 of them add to
~3e-5 if they all aligned, ~7e-6 as independent errors do (sqrt(14)·2e-6). Bound: 1e-5. Measured on this
machine (AMD EPYC, AVX-512; every family, batching mode and sequence, eager and compiled, natively and under
ATEN_CPU_CAPABILITY=default|avx2|avx512 and MKL_ENABLE_INSTRUCTIONS=AVX2): at most 3.0e-7.

GRADS: backward runs the chain again in reverse and adds the sums over the tokens (≤ 300 per micro-batch) of each
weight gradient: about twice the chain, and a longer sum, so 5e-5. Measured on the same runs: at most 3.3e-6
(a k_proj bias, compiled, under ATEN_CPU_CAPABILITY=default).

A wrong computation is far outside both: a dropped sliding window or softcap moves the log-probs by more than
10 x LOGPS relative (test_families.test_the_features_matter asserts it for every windowed or softcapped family).
"""

from __future__ import annotations

import torch

__all__ = ["GRADS", "LOGPS", "assert_close_to_scale", "relative_error"]

LOGPS = 1e-5
GRADS = 5e-5


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖₂ / ‖want‖₂ in float64 (‖got‖₂ when want is all zeros)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(want.norm()) or float(got.norm()) or 1.0
    return float((got - want).norm()) / scale


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, bound: float, what: str = "") -> None:
    """got equals want within `bound` relative to want's norm (see the module docstring), with the same shape."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = relative_error(got, want)
    assert err <= bound, f"{what}: ‖got − want‖/‖want‖ = {err:.2e} > {bound:.0e}"
