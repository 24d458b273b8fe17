"""Per-token log-probabilities of given tokens from a causal LM's logits.

The one-position shift lives here and nowhere else: the logits at position t predict token t+1, so the
log-prob of token t is read from the logits at position t−1, and position 0 (which nothing predicts)
gets 0. Work is done in float32 in chunks along the sequence, so the extra memory is bounded by
`chunk_tokens × vocab` floats instead of a full [tokens × vocab] float32 log-softmax; with autograd on,
each chunk is recomputed in backward (activation checkpointing) rather than kept.

torch only: importable without Ray, vLLM or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_TOKENS", "chunked_logps", "gathered_logps", "sequence_logps", "token_logps"]

DEFAULT_CHUNK_TOKENS = 4096


def gathered_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] as gather − logsumexp, in float32: the one kernel every log-prob in the
    project goes through. logits (..., V), labels (...) → (...)."""
    logits32 = logits.float()
    picked = torch.gather(logits32, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits32, dim=-1)


def chunked_logps(
    fn: Callable[..., Tensor], x: Tensor, labels: Tensor, chunk_tokens: int, *args: Any, recompute: bool
) -> Tensor:
    """fn(x[s:e], labels[s:e], *args) over chunks of `chunk_tokens` rows of x (N, ...), concatenated (N,);
    with `recompute`, each chunk is recomputed in backward (activation checkpointing) instead of kept."""
    step = max(1, chunk_tokens)
    pieces = [
        checkpoint(fn, x[s : s + step], labels[s : s + step], *args, use_reentrant=False)
        if recompute
        else fn(x[s : s + step], labels[s : s + step], *args)
        for s in range(0, x.shape[0], step)
    ]
    if pieces:
        return torch.cat(pieces)
    # No rows: fn still runs once, on none, so that the result depends on x and on fn's parameters (a fused LM
    # head's): a sequence-parallel rank holding no completion token runs its collectives' backward like the
    # others, and its head gets a zero gradient, which DDP and FSDP2 reduce with every other rank's.
    if recompute:
        empty: Tensor = checkpoint(fn, x, labels, *args, use_reentrant=False)
        return empty
    return fn(x, labels, *args)


def token_logps(
    logits: Tensor,
    input_ids: Tensor,
    mask: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Log-prob of each token of `input_ids` given the tokens before it.

    logits: (B, T, V) from a forward pass over input_ids (any float dtype).
    input_ids: (B, T) integer token ids.
    mask: optional (B, T) bool/0-1: which token positions count (completion tokens); others become 0.
        Position 0 of a row is never predicted and must not be set.
    chunk_tokens: at most about this many (row, position) pairs are upcast to float32 at once.
    Returns (B, T) float32: out[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) for t >= 1, 0 at t = 0
    and wherever mask is false.
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be (B, T, V) and input_ids (B, T) with the same B, T; "
            f"found logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    if mask is not None:
        if mask.shape != input_ids.shape:
            raise ValueError(f"mask must be {tuple(input_ids.shape)} like input_ids, found {tuple(mask.shape)}")
        if bool(mask[:, 0].any()):
            raise ValueError("mask[:, 0] is set, but position 0 has no logits predicting it")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, found {chunk_tokens}")
    batch, seq_len, _ = logits.shape
    out = logits.new_zeros((batch, seq_len), dtype=torch.float32)
    if seq_len < 2:
        return out
    step = max(1, chunk_tokens // max(batch, 1))
    use_checkpoint = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    # Logits at positions [s, e) predict tokens at positions [s+1, e+1).
    for start in range(0, seq_len - 1, step):
        end = min(start + step, seq_len - 1)
        chunk, labels = logits[:, start:end], input_ids[:, start + 1 : end + 1]
        if use_checkpoint:
            piece = checkpoint(gathered_logps, chunk, labels, use_reentrant=False)
        else:
            piece = gathered_logps(chunk, labels)
        pieces.append(piece)
    out = torch.cat([out[:, :1], *pieces], dim=1)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros_like(out))
    return out


def sequence_logps(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of per-token log-probs over masked positions, and the count of those positions.

    per_token, mask: (B, T). Returns (sums (B,) float32, counts (B,) int64).
    """
    kept = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    return kept.sum(-1), mask.to(torch.int64).sum(-1)
