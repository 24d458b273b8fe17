"""On a CUDA device: every batching mode with the CUDA attention kernels training uses (flash / memory-
efficient SDPA, not cuDNN) against unbatched eager forwards, and a bf16-autocast train step per mode.

Skipped without CUDA (this project's CI has none); run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dpo_ray.compute.attention import enable_segment_attention
from dpo_ray.compute.batching import BATCHING
from tests.unit.test_families import _assert_same_grads, _batched, _pairs, _perturbed, _unbatched, _weighted_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("mode", BATCHING)
@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma2", "qwen2_swa"])
def test_modes_on_cuda_equal_unbatched_eager(family_dirs, family: str, mode: str) -> None:
    from torch.nn.attention import sdpa_kernel

    from dpo_ray.compute.attention import SDPA_BACKENDS

    base = _perturbed(family_dirs[family]).cuda()
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    model = base if mode == "padded" else enable_segment_attention(copy.deepcopy(base))
    pairs = _pairs(base.config.vocab_size, long=True, seed=5)
    with torch.no_grad(), sdpa_kernel(SDPA_BACKENDS):
        want = [t.cpu() for t in _unbatched(eager, pairs)]
        got = [t.cpu() for t in _batched(model, pairs, mode, pad=0)]
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_bf16_train_step_agrees_across_modes(family_dirs) -> None:
    """One bf16-autocast optimizer step from the same weights: the modes' losses agree to bf16 precision."""
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    pairs = _pairs(400, long=True, seed=9)
    ref = torch.zeros(len(pairs), dtype=torch.float64)
    losses = {}
    for mode in BATCHING:
        model = _perturbed(family_dirs["llama3"]).cuda()
        if mode != "padded":
            enable_segment_attention(model)
        opt = make_optimizer(model, "adamw", 1e-5, 0.0)
        settings = TrainSettings(batching=mode, autocast_dtype=torch.bfloat16)
        step = train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), StepBatch(pairs, ref, ref), settings, 4)
        metrics = step.metrics
        losses[mode] = metrics["loss"]
    assert max(losses.values()) - min(losses.values()) < 2e-2, losses


@pytest.mark.parametrize("mode", ["packed", "prefix_shared"])
@pytest.mark.parametrize("family", ["llama3", "gemma2", "qwen2_swa"])
def test_flex_on_cuda_equals_unbatched_eager(family_dirs, family: str, mode: str) -> None:
    """attention: flex with the compiled kernel, forward and backward, over rows of three lengths (static,
    then dynamic shapes): per-token log-probs and every gradient against unbatched eager forwards."""
    from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_token_logps

    base = _perturbed(family_dirs[family]).cuda()
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    model = enable_segment_attention(copy.deepcopy(base))
    collate = collate_packed if mode == "packed" else collate_prefix_shared
    for seed in (3, 4, 5):
        pairs = _pairs(base.config.vocab_size, long=True, seed=seed)
        want = _unbatched(eager, pairs)
        batch = collate(pairs).to("cuda")
        per_token = segment_token_logps(model, batch, kernel="flex")
        got = [per_token[batch.seq == s] for s in range(2 * len(pairs))]
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g.detach().cpu(), w.detach().cpu(), atol=1e-4, rtol=0)
        want_grads = _weighted_grads(eager, want)
        _assert_same_grads(_weighted_grads(model, got), want_grads, f"{family}/{mode}", atol=1e-4, rtol=1e-3)
