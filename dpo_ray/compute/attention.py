"""Exact attention for the padding-free layouts (dpo_ray.compute.layouts): a transformers attention function.

The function ("dpo_segments", registered by `enable_segment_attention`) has two kernels for the same blocks
(a causal block over one sequence, packed, or prompt + chosen; the rejected block whose keys are the
prompt's plus its own, causal within):
    blocks: one scaled-dot-product attention per block. Work is proportional to Σ block² instead of
        row², and no mask over the whole row is materialised.
    flex: one FlexAttention call over the whole row (torch.nn.attention.flex_attention, compiled) with a
        block mask built once per micro-batch and window from the blocks: 128 x 128 tiles that no block
        touches are skipped, tiles inside one block's causal region run unmasked. torch has no FlexAttention
        backward on CPU, so training with it needs a GPU (refused otherwise, before any work).
Without the `dpo_blocks` argument the function is transformers' SDPA attention, so padded batches and
generation work unchanged on the same model. The function is opaque to torch.compile (a compiled decoder
layer calls it eagerly), so a new layout per micro-batch does not recompile the layers.

torch only at import; transformers is imported when segment attention is enabled.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpo_ray.compute.layouts import Block
from dpo_ray.errors import UserError

__all__ = [
    "ATTENTION_KERNELS",
    "ATTENTION_NAME",
    "SDPA_BACKENDS",
    "UnsupportedAttention",
    "enable_segment_attention",
    "flex_block_mask",
    "segment_attention",
    "unsupported_features",
]

ATTENTION_NAME = "dpo_segments"
ATTENTION_KERNELS = ("blocks", "flex")

# SDPA kernels used in training (every mode): not cuDNN attention, which builds a plan per distinct shape.
# Every micro-batch (padded) and every block (packed, prefix_shared) has its own length; on an H100 with
# torch 2.11 cuDNN made the padded train step 3.8x slower (benchmarks/gpu_train_step.py). Flash (causal,
# GQA native) and memory-efficient attention (masks) take any length without planning.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class UnsupportedAttention(UserError, ValueError):
    """The model's attention uses a feature the padding-free modes cannot compute exactly."""


# Attention keyword arguments that carry no attention semantics (bookkeeping passed through by decoder
# layers; seen: Llama-3, Qwen2/3, Mistral, Gemma-2/3, Phi-3, GPT-2). Anything else that is not handled below
# (attention sinks, chunked attention, ...) makes the padding-free modes refuse the model.
_INERT_KWARGS = frozenset({"position_ids", "cache_position", "output_attentions", "use_cache", "past_key_values"})

# Config features that change attention in ways the per-block layout cannot reproduce.
_UNSUPPORTED_CONFIG = {
    "use_bidirectional_attention": "bidirectional attention",
    "attention_chunk_size": "chunked local attention",
    "alibi": "ALiBi position biases",
    "use_alibi": "ALiBi position biases",
}


def unsupported_features(config: Any) -> list[str]:
    """Why the padding-free modes cannot be exact for a model with this config ([] when they can).

    Sliding windows (per layer type) and attention-logit softcapping are supported; this lists the known
    features that are not. Unknown attention arguments are refused when the model first runs
    (UnsupportedAttention), and the train stage compares each mode with unbatched forwards before any step.
    """
    found = [f"{what} ({key})" for key, what in _UNSUPPORTED_CONFIG.items() if getattr(config, key, None)]
    return sorted(set(found))


def segment_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: per-block attention when `dpo_blocks` is given, else the whole row;
    with `dpo_sp` (a dpo_ray.compute.sequence_parallel.SequenceGroup) the inputs are this rank's shard of the
    row, gathered per head group around the same attention (Ulysses).

    query (1, H, L, D), key/value (1, H_kv, L, D); returns (1, L, H, D) like transformers' SDPA function.
    Honours the layer's `sliding_window` (a key at distance >= window from the query, in positions, is
    masked, as transformers' sliding_window_overlay) and `softcap` (scores → softcap·tanh(scores/softcap)
    before the mask, as Gemma-2's eager attention). Any other attention argument is refused.
    """
    sp = kwargs.pop("dpo_sp", None)
    if sp is not None:  # sequence parallel: this rank's tokens in, the whole row for its heads attended, back
        from dpo_ray.compute.sequence_parallel import heads_to_row, replicate_kv, row_to_heads

        q = heads_to_row(query, sp)
        k, v = (heads_to_row(replicate_kv(x, sp.size), sp) for x in (key, value))
        out, _ = segment_attention(module, q, k, v, attention_mask, scaling, dropout, **kwargs)
        return row_to_heads(out, sp), None
    blocks: tuple[Block, ...] | None = kwargs.pop("dpo_blocks", None)
    kernel: str = kwargs.pop("dpo_kernel", "blocks")
    window: int | None = kwargs.pop("sliding_window", None)
    softcap: float | None = kwargs.pop("softcap", None)
    if kwargs.pop("is_causal", None) is False:
        raise UnsupportedAttention(f"{type(module).__name__} asks for non-causal attention; use train.batching: padded")
    unknown = sorted(k for k, v in kwargs.items() if k not in _INERT_KWARGS and v is not None)
    if unknown:
        raise UnsupportedAttention(
            f"{type(module).__name__} passes attention argument(s) {unknown} that the padding-free batching "
            "modes do not implement; use train.batching: padded"
        )
    p = dropout if module.training else 0.0
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if blocks is None:
        if softcap is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(  # type: ignore[no-any-return]
                module, query, key, value, attention_mask, scaling=scaling, dropout=p, **kwargs
            )
        n = query.shape[2]
        if attention_mask is None:
            mask = _band(n, 0, window, query.device)
        else:
            mask = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
        return _dense(query, key, value, mask, scaling, softcap, p).transpose(1, 2).contiguous(), None
    if kernel == "flex":
        if p > 0:
            raise UnsupportedAttention("FlexAttention has no attention dropout; use train.attention: blocks")
        return _flex(query, key, value, blocks, window, softcap, scaling), None
    if kernel != "blocks":
        raise ValueError(f"attention kernel: unknown {kernel!r}; expected one of {', '.join(ATTENTION_KERNELS)}")
    groups = query.shape[1] // key.shape[1]
    sizes, index = _pieces(blocks, query.shape[2])
    # One split per tensor (its backward is one concatenation), not a slice per block (whose backward
    # writes each block's gradient into a zero tensor of the full row: on an H100 that dominated).
    qs, ks, vs = query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)

    def take(pieces: tuple[Tensor, ...], start: int, end: int) -> Tensor:
        run = pieces[index[start] : index[end]]
        return run[0] if len(run) == 1 else torch.cat(run, dim=2)

    outs = []
    with sdpa_kernel(SDPA_BACKENDS):
        for blk in blocks:
            q, k, v = take(qs, blk.start, blk.end), take(ks, blk.start, blk.end), take(vs, blk.start, blk.end)
            n, n_prefix = blk.end - blk.start, 0
            if blk.prefix is not None:
                ps, pe = blk.prefix
                n_prefix = pe - ps
                k = torch.cat([take(ks, ps, pe), k], dim=2)
                v = torch.cat([take(vs, ps, pe), v], dim=2)
            if softcap is not None:
                outs.append(_dense(q, k, v, _band(n, n_prefix, window, q.device), scaling, softcap, p))
            elif n_prefix == 0 and (window is None or n <= window):
                outs.append(
                    F.scaled_dot_product_attention(
                        q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=groups > 1
                    )
                )
            else:
                if groups > 1:
                    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                mask = _band(n, n_prefix, window, q.device)
                outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


# FlexAttention's tile: the block mask says, per 128 queries x 128 keys, whether the tile is skipped, computed
# without a mask (full) or computed with mask_mod (partial).
FLEX_TILE = 128


@functools.lru_cache(maxsize=2)
def _flex_kernel(device_type: str) -> Any:
    """flex_attention compiled (its eager form materialises every score and is for debugging only). On CPU
    with static shapes: torch 2.13's CPU FlexAttention template emits C++ that does not compile once the
    row length is dynamic (seen on the second row length); there it serves forwards only (no backward)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


@functools.lru_cache(maxsize=8)
def _softcap_mod(softcap: float) -> Any:
    def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _flex(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    blocks: tuple[Block, ...],
    window: int | None,
    softcap: float | None,
    scaling: float,
) -> Tensor:
    """The blocks' attention as one FlexAttention call: q (1, H, L, D), k/v (1, H_kv, L, D) → (1, L, H, D)."""
    mask = flex_block_mask(blocks, query.shape[2], window, query.device)
    out = _flex_kernel(query.device.type)(
        query,
        key,
        value,
        score_mod=None if softcap is None else _softcap_mod(softcap),
        block_mask=mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()  # type: ignore[no-any-return]


def _token_tables(blocks: tuple[Block, ...], length: int, device: torch.device) -> dict[str, Tensor]:
    """Per token of the row (padded with inert entries to whole tiles plus one): its block, its block's prefix
    range [ps, pe) and its position within its sequence, as _band counts positions (a block's tokens follow
    its prefix's)."""
    n = (length + FLEX_TILE - 1) // FLEX_TILE * FLEX_TILE + FLEX_TILE
    blk = torch.full((n,), -1, dtype=torch.int64)
    ps = torch.zeros(n, dtype=torch.int64)
    pe = torch.zeros(n, dtype=torch.int64)
    pos = torch.zeros(n, dtype=torch.int64)
    for i, b in enumerate(blocks):
        blk[b.start : b.end] = i
        n_prefix = 0
        if b.prefix is not None:
            ps[b.start : b.end], pe[b.start : b.end] = b.prefix
            n_prefix = b.prefix[1] - b.prefix[0]
        pos[b.start : b.end] = torch.arange(n_prefix, n_prefix + b.end - b.start)
    starts = {b.start for b in blocks}
    if int(blk[:length].min()) < 0 or any(b.prefix is not None and b.prefix[0] not in starts for b in blocks):
        # _band counts a prefix's positions from 0, so a prefix must open the block it lies in
        raise ValueError("segment blocks must tile the row, each prefix opening a block")
    return {k: v.to(device) for k, v in {"blk": blk, "ps": ps, "pe": pe, "pos": pos}.items()}


def _allowed(t: dict[str, Tensor], q: Tensor, k: Tensor, window: int | None) -> Tensor:
    """Whether query q may attend to key k (row indices, broadcastable): the Block semantics, plus the window."""
    same = (t["blk"][q] == t["blk"][k]) & (k <= q)
    prefix = (k >= t["ps"][q]) & (k < t["pe"][q])
    allowed = same | prefix
    if window is not None:
        allowed = allowed & (t["pos"][q] - t["pos"][k] < window)
    return allowed


@functools.lru_cache(maxsize=8)
def flex_block_mask(
    blocks: tuple[Block, ...], length: int, window: int | None, device: torch.device, max_entries: int = 1 << 22
) -> Any:
    """The FlexAttention BlockMask of `blocks` over a row of `length` tokens (cached: every layer of one
    micro-batch with the same window reuses it). Tiles are classified from the mask evaluated a band of
    query tiles at a time (about `max_entries` query-key pairs), so no length x length tensor exists."""
    from torch.nn.attention.flex_attention import BlockMask

    t = _token_tables(blocks, length, device)
    tiles = (length + FLEX_TILE - 1) // FLEX_TILE
    keys = torch.arange(tiles * FLEX_TILE, device=device)
    key_real = keys < length
    band = max(1, max_entries // (tiles * FLEX_TILE * FLEX_TILE))  # query tiles per band
    partial, full = [], []
    for first in range(0, tiles, band):
        rows = torch.arange(first * FLEX_TILE, min(first + band, tiles) * FLEX_TILE, device=device)
        m = _allowed(t, rows[:, None], keys[None, :], window) & key_real[None, :] & (rows < length)[:, None]
        m = m.view(-1, FLEX_TILE, tiles, FLEX_TILE)
        any_, all_ = m.any(dim=(1, 3)), m.all(dim=(1, 3))
        partial.append(any_ & ~all_)
        full.append(all_)

    def ordered(tile_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(1, 1, tiles) counts and (1, 1, tiles, tiles) indices, each row's tiles first, in order."""
        counts = tile_mask.sum(-1, dtype=torch.int32)
        order = torch.argsort((~tile_mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    kv_num, kv_idx = ordered(torch.cat(partial))
    full_num, full_idx = ordered(torch.cat(full))

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return _allowed(t, q, k, window)

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_TILE, mask_mod=mask_mod, seq_lengths=(length, length)
    )


@functools.lru_cache(maxsize=256)
def _band(n: int, n_prefix: int, window: int | None, device: torch.device) -> Tensor:
    """(n, n_prefix + n) bool mask of n queries at positions n_prefix + i over keys at positions 0..n_prefix+n−1:
    causal (key position <= query position) and, with a window, key position > query position − window.

    A block's queries and keys are one sequence's positions: the prefix (a pair's prompt) at 0..n_prefix−1,
    then the block's own tokens; the chosen tokens that sit between them in the row are not keys at all.
    """
    q = torch.arange(n_prefix, n_prefix + n, device=device).unsqueeze(1)
    k = torch.arange(n_prefix + n, device=device).unsqueeze(0)
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def _dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scaling: float, softcap: float | None, p: float) -> Tensor:
    """Attention computed as transformers' eager attention does (softcapping applied before the mask, softmax
    in float32), for features SDPA lacks. q (1, H, n, D), k/v (1, H_kv, m, D), mask broadcastable to (n, m)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=p, training=p > 0)
    return torch.matmul(weights, v)


@functools.lru_cache(maxsize=16)
def _pieces(blocks: tuple[Block, ...], length: int) -> tuple[list[int], dict[int, int]]:
    """The row cut at every block and prefix boundary: piece sizes, and boundary → piece index."""
    cuts = {0, length}
    for b in blocks:
        cuts |= {b.start, b.end, *(b.prefix or ())}
    bounds = sorted(cuts)
    return [e - s for s, e in zip(bounds, bounds[1:], strict=False)], {x: i for i, x in enumerate(bounds)}


@functools.lru_cache(maxsize=1)
def _opaque_attention() -> Any:
    """segment_attention, run eagerly inside compiled code: dynamo would otherwise guard on every block's
    bounds and recompile the decoder layers for each new micro-batch layout."""
    return torch.compiler.disable(segment_attention)


def enable_segment_attention(model: Any) -> Any:
    """Register the "dpo_segments" attention (and SDPA's mask function under that name) and switch `model`
    to it; padded inputs keep working (they take the SDPA path). Returns the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _opaque_attention())
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    return model
