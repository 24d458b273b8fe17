"""Preference pairs → model inputs, and the policy log-probs of their completions.

A pair is (prompt_ids, chosen_ids, rejected_ids); a sequence is prompt_ids + completion_ids and only the
completion positions count (docs/howto/own-model-and-data.md, "How text becomes tokens"). Every batching mode
must give the same per-sequence log-probs as unbatched single-sequence forwards; tests hold each mode to that.

Modes (`BATCHING`):
- padded: all chosen sequences, then all rejected ones, right-padded to the longest, one forward.
- packed, prefix_shared: padding-free single rows (dpo_ray.compute.layouts).
The micro-batch planner (`plan_micro_batches`) groups a worker's pairs under a token budget for any mode
and reports what share of the computed tokens is padding.

torch only (the model is any callable returning an object with `.logits`, e.g. a transformers LM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo_ray.compute.logps import DEFAULT_CHUNK_TOKENS, sequence_logps, token_logps

__all__ = [
    "BATCHING",
    "MicroBatchPlan",
    "PaddedBatch",
    "collate_sequences",
    "completion_logps",
    "PairLogps",
    "PairTokens",
    "collate_padded",
    "computed_tokens",
    "longest_first",
    "padded_token_count",
    "plan",
    "plan_micro_batches",
    "policy_logps",
]


@dataclass(frozen=True)
class PairTokens:
    """Token ids of one preference pair; completions end with EOS."""

    prompt_ids: Sequence[int]
    chosen_ids: Sequence[int]
    rejected_ids: Sequence[int]

    def __post_init__(self) -> None:
        if len(self.prompt_ids) < 1:
            raise ValueError("PairTokens.prompt_ids: at least one token (e.g. BOS) is needed before a completion")
        if len(self.chosen_ids) < 1 or len(self.rejected_ids) < 1:
            raise ValueError("PairTokens: chosen_ids and rejected_ids need at least one token each")

    @property
    def max_len(self) -> int:
        """Length of the longer of its two sequences."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens of both sequences."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


BATCHING = ("padded", "packed", "prefix_shared")


@dataclass(frozen=True)
class PaddedBatch:
    """B pairs as 2B right-padded rows: rows [0, B) chosen, rows [B, 2B) rejected.

    input_ids, attention_mask: (2B, T) int64. completion_mask: (2B, T) bool, true on completion tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    num_pairs: int

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.num_pairs,
        )


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs and completion token counts, each (B,)."""

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded rows prompt_i + completion_i → (input_ids, attention_mask, completion_mask), each (N, T)."""
    if not prompts or len(prompts) != len(completions):
        raise ValueError(
            f"collate: need as many prompts as completions (>= 1), found {len(prompts)}, {len(completions)}"
        )
    width = max(len(a) + len(b) for a, b in zip(prompts, completions, strict=True))
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    completion_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        input_ids[row, :n_total] = torch.tensor([*prompt, *completion], dtype=torch.int64)
        attention_mask[row, :n_total] = 1
        completion_mask[row, n_prompt:n_total] = True
    return input_ids, attention_mask, completion_mask


def collate_padded(pairs: Sequence[PairTokens], pad_token_id: int, pad_to_multiple_of: int = 1) -> PaddedBatch:
    """Lay out pairs for one padded forward (chosen rows first, then rejected rows)."""
    if not pairs:
        raise ValueError("collate_padded: no pairs")
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    tensors = collate_sequences(prompts, completions, pad_token_id, pad_to_multiple_of)
    return PaddedBatch(*tensors, num_pairs=len(pairs))


def completion_logps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    token_budget: int = 16_384,
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt, from padded forwards of `model` (no grad).

    Sequences are grouped longest-first into forwards of at most ~token_budget padded tokens. Each forward asks
    the model for the logits of its last positions only, from the shortest prompt's last token on
    (`logits_to_keep`, the model's own slicing before its head): a long prompt costs no [prompt × vocab] logits.
    out[i][j] = log p(completion_i[j] | prompt_i, completion_i[:j]).
    """
    out: list[list[float]] = [[] for _ in prompts]
    widths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    for idx in longest_first(widths, token_budget):
        ids, attn, mask = collate_sequences([prompts[i] for i in idx], [completions[i] for i in idx], pad_token_id)
        device = next(model.parameters()).device
        ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
        # Positions [start, width) hold every completion token of the group and the position before the first.
        start = max(0, min(len(prompts[i]) for i in idx) - 1)
        keep = {"logits_to_keep": ids.shape[1] - start} if start > 0 else {}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **keep).logits
        per_token = token_logps(logits, ids[:, start:], mask[:, start:]).double().cpu()
        for row, i in enumerate(idx):
            p = len(prompts[i]) - start
            out[i] = per_token[row, p : p + len(completions[i])].tolist()
    return out


def longest_first(widths: Sequence[int], token_budget: int, rows_per_item: int = 1) -> list[list[int]]:
    """The one padded planner: indices grouped longest first, each group's padded size (rows × its widest
    item's width) within token_budget; an item wider than the budget gets a group of its own.
    rows_per_item: padded rows per item (2 for a pair: its chosen and its rejected sequence)."""
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in sorted(range(len(widths)), key=lambda i: widths[i], reverse=True):
        new_width = max(width, widths[i])
        if current and rows_per_item * (len(current) + 1) * new_width > token_budget:
            groups.append(current)
            current, new_width = [], widths[i]
        current.append(i)
        width = new_width
    if current:
        groups.append(current)
    return groups


def padded_token_count(pairs: Sequence[PairTokens]) -> int:
    """Tokens a padded forward of these pairs computes, padding included."""
    return 2 * len(pairs) * max(p.max_len for p in pairs) if pairs else 0


def computed_tokens(pairs: Sequence[PairTokens], mode: str = "padded") -> int:
    """Tokens one forward of these pairs computes in `mode` (padded: padding included; packed: 2P + C + R
    per pair; prefix_shared: P + C + R per pair)."""
    if mode == "padded":
        return padded_token_count(pairs)
    if mode == "packed":
        return sum(p.num_tokens for p in pairs)
    if mode == "prefix_shared":
        return sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    raise ValueError(f"batching mode: unknown {mode!r}; expected one of {', '.join(BATCHING)}")


@dataclass(frozen=True)
class MicroBatchPlan:
    """Micro-batches (lists of pair indices) and what they cost.

    computed: tokens the forwards compute; real: non-padding tokens among them; padding_fraction =
    1 − real / computed (0 for the padding-free modes); fill: computed / (micro-batches × budget).
    """

    groups: list[list[int]]
    computed: int
    real: int
    budget: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real / self.computed if self.computed else 0.0

    @property
    def fill(self) -> float:
        return self.computed / (len(self.groups) * self.budget) if self.groups else 0.0


def plan(pairs: Sequence[PairTokens], token_budget: int, mode: str = "padded") -> MicroBatchPlan:
    """Group pair indices into micro-batches whose computed tokens (in `mode`) stay within `token_budget`.

    padded: longest first, so each group's padding is small. packed / prefix_shared: first-fit decreasing
    bin packing of each pair's token count, so few, full micro-batches. Pairs are never split; a pair
    that alone exceeds the budget gets a micro-batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, found {token_budget}")
    if mode == "padded":
        groups = longest_first([p.max_len for p in pairs], token_budget, rows_per_item=2)
    else:
        cost = [computed_tokens([p], mode) for p in pairs]
        groups = []
        loads: list[int] = []
        for i in sorted(range(len(pairs)), key=lambda i: cost[i], reverse=True):
            slot = next((g for g, load in enumerate(loads) if load + cost[i] <= token_budget), None)
            if slot is None:
                groups.append([i])
                loads.append(cost[i])
            else:
                groups[slot].append(i)
                loads[slot] += cost[i]
        groups = [sorted(g) for g in groups]
    computed = sum(computed_tokens([pairs[i] for i in g], mode) for g in groups)
    real = sum(computed_tokens([pairs[i] for i in g], "packed" if mode == "padded" else mode) for g in groups)
    return MicroBatchPlan(groups, computed, real, token_budget)


def plan_micro_batches(pairs: Sequence[PairTokens], token_budget: int, mode: str = "padded") -> list[list[int]]:
    """The groups of `plan` (lists of indices into `pairs`)."""
    return plan(pairs, token_budget, mode).groups


def policy_logps(model: Any, batch: PaddedBatch, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> PairLogps:
    """One forward of `model` over a padded batch → summed completion log-probs of chosen and rejected."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    per_token = token_logps(logits, batch.input_ids, batch.completion_mask, chunk_tokens)
    sums, counts = sequence_logps(per_token, batch.completion_mask)
    b = batch.num_pairs
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])
