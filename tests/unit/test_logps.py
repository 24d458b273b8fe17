"""Per-token log-probs against float64 log_softmax + gather."""

from __future__ import annotations

import pytest
import torch

from dpo_ray.compute.logps import sequence_logps, token_logps


def _reference(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1)
    out = torch.zeros(ids.shape, dtype=torch.float64)
    out[:, 1:] = torch.gather(logp[:, :-1], -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return out


@pytest.mark.parametrize(("vocab", "chunk"), [(50, 4096), (50, 3), (70_000, 64), (70_000, 1)])
def test_matches_float64_log_softmax(vocab, chunk):
    g = torch.Generator().manual_seed(vocab + chunk)
    logits = torch.randn(3, 17, vocab, generator=g) * 4
    ids = torch.randint(0, vocab, (3, 17), generator=g)
    got = token_logps(logits, ids, chunk_tokens=chunk)
    torch.testing.assert_close(got.double(), _reference(logits, ids), atol=2e-5, rtol=1e-6)
    assert got.dtype == torch.float32


def test_bfloat16_logits_are_upcast():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 9, 300, generator=g) * 3).bfloat16()
    ids = torch.randint(0, 300, (2, 9), generator=g)
    got = token_logps(logits, ids, chunk_tokens=5)
    torch.testing.assert_close(got.double(), _reference(logits.float(), ids), atol=1e-5, rtol=1e-6)


def test_mask_zeroes_positions_and_sums():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 40, generator=g)
    ids = torch.randint(0, 40, (2, 8), generator=g)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 5:8] = True
    got = token_logps(logits, ids, mask)
    ref = _reference(logits, ids)
    assert torch.all(got[~mask] == 0)
    sums, counts = sequence_logps(got, mask)
    torch.testing.assert_close(sums.double(), torch.stack([ref[0, 3:6].sum(), ref[1, 5:8].sum()]), atol=1e-5, rtol=0)
    assert counts.tolist() == [3, 3]


def test_gradients_match_unchunked():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 11, 97, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[:, 0] = False
    a = base.clone().requires_grad_(True)
    token_logps(a, ids, mask, chunk_tokens=4).sum().backward()
    b = base.clone().requires_grad_(True)
    _reference(b, ids).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_shape_errors():
    logits, ids = torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must be"):
        token_logps(logits, ids[:, :4])
    with pytest.raises(ValueError, match="logits must be"):
        token_logps(logits[0], ids[0])
    with pytest.raises(ValueError, match="mask must be"):
        token_logps(logits, ids, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position 0"):
        token_logps(logits, ids, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logps(logits, ids, chunk_tokens=0)
