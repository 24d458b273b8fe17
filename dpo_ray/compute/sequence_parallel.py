"""Sequence parallelism (Ulysses): k ranks of a group share one padding-free row's tokens.

Every rank of the group holds the whole micro-batch's token ids (a SegmentBatch, dpo_ray.compute.layouts) but
runs the model on its shard of the row only: tokens [r·l, (r+1)·l) of the row padded to k·l, with their own
(global) position ids. Around attention, an all-to-all turns token shards into head shards: each rank gets the
whole row's queries, keys and values for H/k query heads and H_kv/k key-value heads, runs the same segment
attention as one process would (dpo_ray.compute.attention: its blocks, windows and softcaps over the whole
row), and an all-to-all turns the result back into its token shard with every head. Everything else in a
decoder layer is per token. The padding tokens form a block of their own and predict nothing.

Log-probs: a completion token is read where its source position (the position whose logits predict it) lies;
the label shift never crosses a shard because the target ids come from the whole row, which every rank holds.
Each rank sums its tokens per sequence and the sums are all-reduced over the group; that all-reduce passes the
gradient through unchanged, because every rank computes the same loss from the same totals. Each rank's
parameter gradient is then the part computed on that rank: their sum over the group (sum_gradients) is the
gradient of one process running the whole row.

Query heads must divide among the k ranks. Key-value heads either divide among them too, or divide k: then
each key-value head is repeated k / H_kv times before the all-to-all, so every rank receives the one its query
heads read (repeat_interleave's backward sums the copies' gradients). Anything else is refused, naming the
heads and k. With the fused head (dpo_ray.compute.fused_head) each rank projects only its own source
positions through the LM head. torch only at import; torch.distributed is used through its process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dpo_ray.compute.batching import PairLogps
from dpo_ray.compute.layouts import Block, SegmentBatch
from dpo_ray.compute.logps import DEFAULT_CHUNK_TOKENS, chunked_logps, gathered_logps

__all__ = [
    "SequenceGroup",
    "current_group",
    "join_groups",
    "sequence_parallel_logps",
    "shard_row",
    "sum_gradients",
]


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that share a row: their process group (None: the default group), this rank's index in it and
    their count k."""

    group: Any
    rank: int
    size: int


_CURRENT: SequenceGroup | None = None  # this process's group, set once by join_groups


def join_groups(size: int) -> SequenceGroup:
    """Cut the default process group's ranks into groups of `size` consecutive ranks (every rank must call this,
    in the same order: creating a group is a collective) and make this rank's group the current one. The ranks
    of a group train the same pairs; the groups are the data-parallel replicas."""
    global _CURRENT
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"sequence_parallel {size} must divide the {world} workers")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = SequenceGroup(group, rank - first, size)
    assert mine is not None
    _CURRENT = mine
    return mine


def current_group(size: int) -> SequenceGroup:
    """The group join_groups made for this process, which must have `size` ranks."""
    if _CURRENT is None or _CURRENT.size != size:
        found = "none" if _CURRENT is None else f"one of {_CURRENT.size}"
        raise RuntimeError(f"sequence parallelism over {size} ranks: join_groups({size}) made no such group ({found})")
    return _CURRENT


@dataclass(frozen=True)
class RowShard:
    """This rank's part of a row: its input and position ids (1, l), the blocks of the padded row, and for each
    completion token whose source lies here its local source index, its label and its sequence."""

    input_ids: Tensor
    position_ids: Tensor
    blocks: tuple[Block, ...]
    sources: Tensor
    labels: Tensor
    seq: Tensor


def shard_row(batch: SegmentBatch, rank: int, size: int) -> RowShard:
    """Rank `rank`'s shard of `batch`'s row among `size` ranks: the row is padded to a multiple of `size` with a
    block of its own (position ids from 0, token ids repeated from the row's first; they predict nothing)."""
    length = batch.num_tokens
    local = -(-length // size)
    pad = local * size - length
    ids, pos, blocks = batch.input_ids, batch.position_ids, batch.blocks
    if pad:
        ids = torch.cat([ids, ids[:, :1].expand(1, pad)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, device=pos.device).unsqueeze(0)], dim=1)
        blocks = (*blocks, Block(length, length + pad))
    lo, hi = rank * local, (rank + 1) * local
    here = (batch.sources >= lo) & (batch.sources < hi)
    return RowShard(
        ids[:, lo:hi],
        pos[:, lo:hi],
        blocks,
        batch.sources[here] - lo,
        batch.input_ids[0, batch.targets[here]],
        batch.seq[here],
    )


def check_heads(config: Any, size: int) -> None:
    """Refuse a model whose heads cannot be split among `size` ranks: each rank attends with H/k query heads and
    either H_kv/k key-value heads or, where k is a multiple of H_kv, one repeated key-value head."""
    from dpo_ray.compute.fused_head import text_config

    config = text_config(config)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % size or (kv % size and size % kv):
        from dpo_ray.compute.attention import UnsupportedAttention

        fits = [k for k in range(2, heads + 1) if heads % k == 0 and (kv % k == 0 or k % kv == 0)]
        raise UnsupportedAttention(
            f"sequence parallelism over {size} ranks splits the attention heads among them: {config.model_type} has "
            f"{heads} query and {kv} key-value heads; k must divide the {heads} query heads and either divide the "
            f"key-value heads or be a multiple of them"
            + (f" (here: {', '.join(map(str, fits))})" if fits else " (no k > 1 does here)")
        )


def replicate_kv(x: Tensor, size: int) -> Tensor:
    """Key or value (1, H_kv, l, D) with k a multiple of H_kv → (1, k, l, D): each head repeated k / H_kv times,
    so that the all-to-all gives rank j the head its query heads [j·H/k, (j+1)·H/k) read. Unchanged when the
    key-value heads divide among the ranks."""
    kv = x.shape[1]
    return x if kv % size == 0 else x.repeat_interleave(size // kv, dim=1)


def _all_to_all(x: Tensor, group: Any) -> Tensor:
    """x (k, ...) → (k, ...): piece j goes to rank j, piece i of the result came from rank i (with autograd)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    pg = group if group is not None else dist.group.WORLD
    if pg is None:
        raise RuntimeError("sequence parallelism needs an initialised torch.distributed process group")
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, pg))


def heads_to_row(x: Tensor, sp: SequenceGroup) -> Tensor:
    """(1, H, l, D) of this rank's tokens → (1, H/k, k·l, D): the whole row for this rank's heads."""
    _, h, n, d = x.shape
    k = sp.size
    pieces = x.reshape(1, k, h // k, n, d).transpose(0, 1)  # (k, 1, H/k, l, D): head group j for rank j
    got = _all_to_all(pieces, sp.group)  # got[i]: rank i's tokens of this rank's heads
    return got.permute(1, 2, 0, 3, 4).reshape(1, h // k, k * n, d)


def row_to_heads(x: Tensor, sp: SequenceGroup) -> Tensor:
    """(1, k·l, H/k, D), attention's output for this rank's heads → (1, l, H, D): this rank's tokens, all heads."""
    _, n, h, d = x.shape
    k = sp.size
    pieces = x.reshape(1, k, n // k, h, d).transpose(0, 1)  # (k, 1, l, H/k, D): rank j's tokens
    got = _all_to_all(pieces, sp.group)  # got[i]: this rank's tokens of rank i's heads
    return got.permute(1, 2, 0, 3, 4).reshape(1, n // k, k * h, d)


class _SumForward(torch.autograd.Function):
    """All-reduce (sum) over the group in the forward; the gradient passes unchanged (every rank computes the
    same loss from the sum, so each rank's part needs the loss's gradient once)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sequence_parallel_logps(
    model: Any,
    batch: SegmentBatch,
    sp: SequenceGroup,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    kernel: str = "blocks",
    fused: bool = False,
) -> PairLogps:
    """segment_logps of `batch` computed by the group's ranks together (every rank calls it with the same batch):
    this rank runs its shard of the row; the per-sequence sums are the whole row's, on every rank. `fused`:
    through the fused LM head (enabled on the model)."""
    check_heads(getattr(model, "module", model).config, sp.size)  # DDP wraps the model
    shard = shard_row(batch, sp.rank, sp.size)
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=shard.input_ids.device)
    inputs = {
        "input_ids": shard.input_ids,
        "position_ids": shard.position_ids,
        "attention_mask": placeholder,
        "logits_to_keep": shard.sources,
        "use_cache": False,
        "dpo_blocks": shard.blocks,
        "dpo_kernel": kernel,
        "dpo_sp": sp,
    }
    # Every rank's backward must run through its whole forward, whose all-to-alls are collectives: a rank
    # holding no source position (a short row, a placeholder) still gets per-token log-probs tied to its graph
    # (chunked_logps returns an empty tensor that depends on its input).
    if fused:
        per_token: Tensor = model(**inputs, dpo_logps_labels=shard.labels, dpo_logps_chunk=chunk_tokens)
    else:
        logits = model(**inputs).logits[0]
        recompute = torch.is_grad_enabled() and logits.requires_grad
        per_token = chunked_logps(gathered_logps, logits, shard.labels, chunk_tokens, recompute=recompute)
    n = 2 * batch.num_pairs
    partial = torch.zeros(n, dtype=torch.float32, device=per_token.device).index_add(0, shard.seq, per_token)
    sums = _SumForward.apply(partial, sp.group)
    counts = torch.bincount(batch.seq, minlength=n)
    b = batch.num_pairs
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def sum_gradients(model: Any, sp: SequenceGroup) -> None:
    """Each parameter's gradient summed over the group: the whole row's gradient on every rank."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=sp.group)
