"""Padding-free batching: the `packed` and `prefix_shared` layouts, one row per micro-batch, and their log-probs.

packed: every pair's two sequences, [prompt, chosen] and [prompt, rejected], laid end to end in one row;
    position ids restart at 0 for each sequence and each token attends (causally) only within its own
    sequence. No padding token exists, so none is computed.
prefix_shared: each pair as [prompt, chosen, rejected] in one segment, the prompt computed once. Chosen
    tokens attend to the prompt and to chosen (causally); rejected tokens attend to the prompt and to
    rejected (causally), never to chosen, and their positions restart at the prompt length. The first
    rejected token's log-prob is read from the last prompt position's logits.

A row is described by its blocks (Block: a causal block over one sequence, packed, or prompt + chosen; the
rejected block whose keys are the prompt's plus its own, causal within), which dpo_ray.compute.attention's
kernels compute exactly.

Logits: only at the positions that predict a completion token (`logits_to_keep` with indices), so the
LM head is not applied to prompt positions. Log-probs are float32, chunked, through dpo_ray.compute.logps'
kernel.

torch only at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_ray.compute.batching import PairLogps, PairTokens
from dpo_ray.compute.logps import DEFAULT_CHUNK_TOKENS, chunked_logps, gathered_logps

__all__ = [
    "Block",
    "SegmentBatch",
    "collate_packed",
    "collate_prefix_shared",
    "segment_logps",
    "segment_token_logps",
]


@dataclass(frozen=True)
class Block:
    """Queries [start, end) attend causally to keys [start, end) and, when set, to all of prefix [ps, pe)."""

    start: int
    end: int
    prefix: tuple[int, int] | None = None


@dataclass(frozen=True)
class SegmentBatch:
    """One row: input_ids/position_ids (1, L); blocks tiling [0, L) in order; for every completion token,
    its position (targets), the position whose logits predict it (sources) and its sequence (seq: b for
    pair b's chosen, B + b for its rejected)."""

    input_ids: Tensor
    position_ids: Tensor
    blocks: tuple[Block, ...]
    targets: Tensor
    sources: Tensor
    seq: Tensor
    num_pairs: int

    def to(self, device: torch.device | str) -> SegmentBatch:
        return SegmentBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.blocks,
            self.targets.to(device),
            self.sources.to(device),
            self.seq.to(device),
            self.num_pairs,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class _Layout:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.blocks: list[Block] = []
        self.targets: list[int] = []
        self.sources: list[int] = []
        self.seq: list[int] = []

    def completion(self, start: int, n: int, seq: int, first_source: int) -> None:
        """Completion tokens at [start, start + n); the first is predicted from first_source, the rest from t − 1."""
        self.targets += range(start, start + n)
        self.sources += [first_source, *range(start, start + n - 1)]
        self.seq += [seq] * n

    def batch(self, num_pairs: int) -> SegmentBatch:
        def row(x: list[int]) -> Tensor:
            return torch.tensor([x], dtype=torch.int64)

        return SegmentBatch(
            row(self.ids),
            row(self.pos),
            tuple(self.blocks),
            torch.tensor(self.targets, dtype=torch.int64),
            torch.tensor(self.sources, dtype=torch.int64),
            torch.tensor(self.seq, dtype=torch.int64),
            num_pairs,
        )


def collate_packed(pairs: Sequence[PairTokens]) -> SegmentBatch:
    """All chosen sequences, then all rejected ones, end to end in one row (see the module docstring)."""
    if not pairs:
        raise ValueError("collate_packed: no pairs")
    out = _Layout()
    b = len(pairs)
    for side in (0, 1):
        for i, p in enumerate(pairs):
            completion = p.chosen_ids if side == 0 else p.rejected_ids
            start, n_prompt = len(out.ids), len(p.prompt_ids)
            out.ids += [*p.prompt_ids, *completion]
            out.pos += range(n_prompt + len(completion))
            out.blocks.append(Block(start, len(out.ids)))
            first = start + n_prompt
            out.completion(first, len(completion), side * b + i, first - 1)
    return out.batch(b)


def collate_prefix_shared(pairs: Sequence[PairTokens]) -> SegmentBatch:
    """Each pair as [prompt, chosen, rejected], end to end in one row (see the module docstring)."""
    if not pairs:
        raise ValueError("collate_prefix_shared: no pairs")
    out = _Layout()
    b = len(pairs)
    for i, p in enumerate(pairs):
        start, n_p, n_c, n_r = len(out.ids), len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        out.ids += [*p.prompt_ids, *p.chosen_ids, *p.rejected_ids]
        out.pos += [*range(n_p + n_c), *range(n_p, n_p + n_r)]
        out.blocks.append(Block(start, start + n_p + n_c))
        out.blocks.append(Block(start + n_p + n_c, start + n_p + n_c + n_r, prefix=(start, start + n_p)))
        out.completion(start + n_p, n_c, i, start + n_p - 1)
        out.completion(start + n_p + n_c, n_r, b + i, start + n_p - 1)  # rejected's first token: from the prompt
    return out.batch(b)


def segment_token_logps(
    model: Any,
    batch: SegmentBatch,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    fused: bool = False,
    kernel: str = "blocks",
) -> Tensor:
    """One forward of `model` (segment attention enabled) over a packed / prefix-shared row → the float32
    log-prob of every completion token, (N,) in the order of batch.targets. `fused`: through the fused LM
    head (dpo_ray.compute.fused_head, enabled on the model), which never holds more than a chunk's logits.
    `kernel`: the attention kernel (ATTENTION_KERNELS; see the module docstring)."""
    # A 4D placeholder mask: transformers passes a 4D mask through untouched instead of building an
    # L x L one from the restarting position ids; segment_attention ignores it when blocks are given.
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch.input_ids.device)
    inputs = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": placeholder,
        "logits_to_keep": batch.sources,
        "use_cache": False,
        "dpo_blocks": batch.blocks,
        "dpo_kernel": kernel,
    }
    if fused:
        fused_logps: Tensor = model(
            **inputs, dpo_logps_labels=batch.input_ids[0, batch.targets], dpo_logps_chunk=chunk_tokens
        )
        return fused_logps
    logits = model(**inputs).logits[0]
    labels = batch.input_ids[0, batch.targets]
    recompute = torch.is_grad_enabled() and logits.requires_grad
    return chunked_logps(gathered_logps, logits, labels, chunk_tokens, recompute=recompute)


def segment_logps(
    model: Any,
    batch: SegmentBatch,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    fused: bool = False,
    kernel: str = "blocks",
) -> PairLogps:
    """Summed completion log-probs of chosen and rejected from one forward over a packed / prefix-shared
    row, as policy_logps gives for a padded batch (`fused`, `kernel`: see segment_token_logps)."""
    per_token = segment_token_logps(model, batch, chunk_tokens, fused, kernel)
    n = 2 * batch.num_pairs
    sums = torch.zeros(n, dtype=torch.float32, device=per_token.device).index_add(0, batch.seq, per_token)
    counts = torch.bincount(batch.seq, minlength=n)
    b = batch.num_pairs
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])
