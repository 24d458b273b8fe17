"""attention: flex (one FlexAttention call per row with a block mask) against independent computations:
the block mask against the packing rules written out token by token, per-token log-probs against unbatched
eager forwards of every family (compiled FlexAttention, as training runs it), and gradients against the
same. torch has no FlexAttention backward on CPU, so the gradient test runs torch's eager FlexAttention
(its reference implementation, the one the compiled kernel is tested against) with the CPU device check
lifted; on a GPU, tests/gpu runs the compiled backward."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_ray.compute.attention import FLEX_TILE, flex_block_mask
from dpo_ray.compute.batching import PairTokens
from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_token_logps
from dpo_ray.testing.families import FAMILIES
from tests.numerics import LOGPS, assert_close_to_scale
from tests.unit.test_families import _assert_same_grads, _pairs, _unbatched, _weighted_grads, prepared  # noqa: F401

MODES = ["packed", "prefix_shared"]


def _collate(mode: str):
    return collate_packed if mode == "packed" else collate_prefix_shared


def _expected_mask(pairs: list[PairTokens], mode: str, window: int | None) -> torch.Tensor:
    """The row's query x key mask from the layout rules in dpo_ray.compute.layouts' docstring, token by token."""
    tokens = []  # (sequence id, role, position): role 0 prompt, 1 chosen, 2 rejected
    if mode == "packed":
        for side in (0, 1):
            for i, p in enumerate(pairs):
                completion = p.chosen_ids if side == 0 else p.rejected_ids
                n = len(p.prompt_ids) + len(completion)
                tokens += [(side * len(pairs) + i, 1, t) for t in range(n)]
    else:
        for i, p in enumerate(pairs):
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            tokens += [(i, 0, t) for t in range(n_p)]
            tokens += [(i, 1, n_p + t) for t in range(n_c)]
            tokens += [(i, 2, n_p + t) for t in range(n_r)]
    seq, role, pos = torch.tensor(tokens).T
    q, k = torch.arange(len(tokens))[:, None], torch.arange(len(tokens))[None, :]
    # the same sequence, not the future, and never chosen for a rejected token; within the window
    mask = (seq[:, None] == seq[None, :]) & (k <= q) & ~((role[:, None] == 2) & (role[None, :] == 1))
    if window is not None:
        mask &= pos[:, None] - pos[None, :] < window
    return mask


def _random_pairs(n: int, seed: int) -> list[PairTokens]:
    """A long first pair (so that whole tiles lie inside one sequence), then mixed lengths."""
    rng = random.Random(seed)
    rest = [PairTokens([1] * rng.randint(1, 250), [3] * rng.randint(1, 90), [4] * rng.randint(1, 90)) for _ in range(n)]
    return [PairTokens([1] * 300, [3] * 200, [4] * 150), *rest]


@pytest.mark.parametrize("window", [None, 8, 300])
@pytest.mark.parametrize("mode", MODES)
def test_block_mask_is_the_layout(mode: str, window: int | None) -> None:
    """mask_mod equals the rules everywhere; every tile the mask skips is empty, every tile it runs without
    mask_mod is full, in a row of many tiles classified a few query tiles at a time."""
    pairs = _random_pairs(6, seed=len(mode) + (window or 0))
    batch = _collate(mode)(pairs)
    n = batch.num_tokens
    assert n > 4 * FLEX_TILE
    want = _expected_mask(pairs, mode, window)
    block_mask = flex_block_mask(batch.blocks, n, window, torch.device("cpu"), max_entries=3 * FLEX_TILE * n)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(block_mask.mask_mod(0, 0, q, k), want)
    tiles = -(-n // FLEX_TILE)
    padded = torch.zeros(tiles * FLEX_TILE, tiles * FLEX_TILE, dtype=torch.bool)
    padded[:n, :n] = want
    per_tile = padded.view(tiles, FLEX_TILE, tiles, FLEX_TILE)
    real = torch.zeros_like(padded)
    real[:n, :n] = True
    real_tiles = real.view(tiles, FLEX_TILE, tiles, FLEX_TILE)

    def listed(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tiles, tiles, dtype=torch.bool)
        for row in range(tiles):
            out[row, idx[0, 0, row, : num[0, 0, row]].long()] = True
        return out

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    any_ = per_tile.any(dim=(1, 3))
    all_ = (per_tile | ~real_tiles).all(dim=(1, 3)) & real_tiles.all(dim=(1, 3))
    assert torch.equal(partial | full, any_), "a tile with allowed pairs is skipped, or an empty one is run"
    assert not (full & ~all_).any(), "a tile run without mask_mod has masked pairs"
    assert (~(partial | full)).any()  # the test sees skipped tiles, and full ones unless the window is narrow
    assert full.any() or window == 8


@pytest.fixture(scope="module")
def flex_models(prepared):  # noqa: F811 (the families fixture, imported above)
    """family → (eager reference model, the same weights with segment attention)."""
    return {name: (eager, models["packed"]) for name, (eager, models) in prepared.items()}


@pytest.fixture
def compiled_flex_where_it_exists(monkeypatch):
    """The compiled kernel, as training runs it, where inductor has one for this CPU: it needs AVX2 and refuses
    ATEN_CPU_CAPABILITY=default ("torch.compile on current platform is not supported for CPU"). There, torch's
    eager FlexAttention (the reference the compiled kernel is tested against): the block mask, windows and
    softcap are still the ones under test."""
    import torch.nn.attention.flex_attention as fa
    from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

    from dpo_ray.compute import attention

    if not check_cpu_supported():
        monkeypatch.setattr(attention, "_flex_kernel", lambda device_type: fa.flex_attention)


def _flex_per_sequence(model, pairs: list[PairTokens], mode: str) -> list[torch.Tensor]:
    batch = _collate(mode)(pairs)
    per_token = segment_token_logps(model, batch, kernel="flex")
    return [per_token[batch.seq == s] for s in range(2 * len(pairs))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_flex_log_probs_equal_unbatched_eager(
    flex_models, compiled_flex_where_it_exists, family: str, mode: str
) -> None:
    """Compiled FlexAttention (sliding windows, Gemma-2's softcap, GQA) gives each sequence's own forward."""
    eager, model = flex_models[family]
    pairs = _pairs(eager.config.vocab_size, long=True, seed=7)  # sequences past the window
    with torch.no_grad():
        want = _unbatched(eager, pairs)
        got = _flex_per_sequence(model, pairs, mode)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert_close_to_scale(g, w, LOGPS, f"{family}/{mode} sequence {i}")


def test_flex_over_many_tiles(flex_models, compiled_flex_where_it_exists) -> None:
    """A row of several 128-token tiles, some skipped, some full, some partial (llama3: no window)."""
    eager, model = flex_models["llama3"]
    pairs = [PairTokens(p.prompt_ids * 3, p.chosen_ids * 2, p.rejected_ids * 2) for p in _pairs(400, True, 3)] * 2
    with torch.no_grad():
        want = _unbatched(eager, pairs)
        got = _flex_per_sequence(model, pairs, "prefix_shared")
    assert collate_prefix_shared(pairs).num_tokens > 3 * FLEX_TILE
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert_close_to_scale(g, w, LOGPS, f"sequence {i}")


@pytest.fixture
def eager_flex_with_backward(monkeypatch):
    """torch's eager FlexAttention (it computes every score, with autograd) in place of the compiled kernel,
    and its CPU backward allowed."""
    import torch.nn.attention.flex_attention as fa

    from dpo_ray.compute import attention

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    monkeypatch.setattr(attention, "_flex_kernel", lambda device_type: fa.flex_attention)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_flex_gradients_equal_unbatched_eager(flex_models, eager_flex_with_backward, family: str, mode: str) -> None:
    eager, model = flex_models[family]
    pairs = _pairs(eager.config.vocab_size, long=True, seed=11)
    want = _weighted_grads(eager, _unbatched(eager, pairs))
    _assert_same_grads(_weighted_grads(model, _flex_per_sequence(model, pairs, mode)), want, f"{family}/{mode}")
