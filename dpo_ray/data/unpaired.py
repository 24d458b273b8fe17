"""Unpaired feedback: one completion per record with a binary label (TRL's unpaired preference format), and the
mismatched completions KTO's reference point is estimated from.

A record is {prompt, completion, label}: text (two strings) or conversational (the prompt's messages and the
completion's assistant message(s)), with `columns` naming the record's keys as for pairs. The label must be a
JSON boolean: true for a desirable completion, false for an undesirable one; anything else (absent, null, 1,
"yes") is rejected with reason `invalid_label`. Tokenization and truncation follow the pairs' one rule
(dpo_ray.data.tokenization): the completion is tokenized after its prompt, ends with the stop token once, and
is cut to max_length − prompt.

A paired record becomes two unpaired rows on request (`pair_to_unpaired`): its chosen completion desirable, its
rejected one undesirable, with the pair's tokens unchanged; this is how KTO is compared with DPO on the same data
(Ethayarajh et al. 2024, section 4).

KL partners (`kl_partners`): KTO's z₀ is a KL estimate over mismatched (prompt, completion) pairs. Here each row
i gets, once and for all, the completion of another row j of the same split and a different prompt, chosen by a
seeded permutation of the split's rows (a cycle through them in the order of sha256(seed, row id)): the pairing
is a function of the rows and the seed alone, not of how a batch is cut into workers or micro-batches, so the
reference stage can score it once and training holds no reference model. TRL instead rotates completions by one
within each consecutive block of `per_device_train_batch_size` rows of the dataset (docs/explanation/losses.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpo_ray.data.tokenization import (
    Format,
    PairTokenizer,
    RowRejected,
    TokenizedPair,
    check_chat_turns,
    check_messages,
    check_text,
    check_texts,
)

__all__ = [
    "TokenizedUnpaired",
    "kl_assignments",
    "kl_completion",
    "kl_partners",
    "pair_to_unpaired",
    "record_to_unpaired",
    "row_id",
    "split_partners",
]


@dataclass(frozen=True)
class TokenizedUnpaired:
    prompt: str
    completion: str
    label: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: dict[str, bool] = field(default_factory=dict)
    boundary_merge: bool = False


def row_id(prompt: str, completion: str, label: bool) -> str:
    """Content hash of an unpaired row (32 hex chars): its identity for dedup, as pair_id is a pair's, in a space
    of its own (the hashed list starts with "unpaired"). The label is part of it: the same completion rated both
    ways is two rows."""
    return hashlib.sha256(json.dumps(["unpaired", prompt, completion, bool(label)]).encode("utf-8")).hexdigest()[:32]


def _label(record: Mapping[str, Any], column: str) -> bool:
    if column not in record or record[column] is None:
        raise RowRejected("invalid_label", f"column {column!r} is absent or null; expected true or false")
    value = record[column]
    if not isinstance(value, bool):
        raise RowRejected(
            "invalid_label", f"column {column!r}: expected true or false, found {type(value).__name__} {value!r}"
        )
    return value


def record_to_unpaired(
    record: Any, pt: PairTokenizer, columns: Mapping[str, str], fmt: Format = "auto"
) -> TokenizedUnpaired:
    """One raw record → a TokenizedUnpaired, or RowRejected with a reason.

    columns maps "prompt", "completion" and "label" to the record's keys. Formats: explicit text (prompt and
    completion strings) and conversational (message lists); "auto" decides from the completion's type. The
    implicit format of pairs (a prompt inferred from two completions) has no unpaired form."""
    if not isinstance(record, Mapping):
        raise RowRejected("not_an_object", f"expected an object with columns, found {type(record).__name__}")
    pcol, ccol, lcol = columns["prompt"], columns["completion"], columns["label"]
    for col in (pcol, ccol):
        if record.get(col) is None:
            raise RowRejected("missing_field", f"column {col!r} is absent or null (present: {sorted(record)[:10]})")
    label = _label(record, lcol)
    if fmt == "implicit":
        raise ValueError("prepare.format implicit infers a prompt from two completions: unpaired data has one")
    if fmt == "auto":
        fmt = "conversational" if isinstance(record[ccol], list) else "explicit"
    limit = pt.max_text_chars
    if fmt == "explicit":
        prompt, completion = check_text(record[pcol], pcol, limit), check_text(record[ccol], ccol, limit)
        check_texts(prompt, {"completion": completion})
        prompt_ids, (completion_ids,), merged = pt.text_ids(prompt, [completion])
    else:
        prompt_msgs, msgs = check_messages(record[pcol], pcol, limit), check_messages(record[ccol], ccol, limit)
        check_chat_turns(prompt_msgs, {"completion": msgs})
        prompt, (completion,), prompt_ids, (completion_ids,), merged = pt.render_chat(prompt_msgs, [msgs])
    p, c, truncated = pt.truncate_one(prompt_ids, completion_ids)
    return TokenizedUnpaired(prompt, completion, label, p, c, truncated, merged)


def pair_to_unpaired(pair: TokenizedPair) -> tuple[TokenizedUnpaired, TokenizedUnpaired]:
    """A tokenized pair as two unpaired rows: chosen desirable, rejected undesirable (same tokens)."""

    def row(side: str, text: str, ids: list[int], label: bool) -> TokenizedUnpaired:
        truncated = {"prompt": pair.truncated.get("prompt", False), "completion": pair.truncated.get(side, False)}
        return TokenizedUnpaired(
            pair.prompt, text, label, list(pair.prompt_ids), list(ids), truncated, pair.boundary_merge
        )

    return row("chosen", pair.chosen, pair.chosen_ids, True), row("rejected", pair.rejected, pair.rejected_ids, False)


def kl_partners(row_ids: Sequence[str], prompts: Sequence[str], seed: int) -> list[int | None]:
    """For each row, the index of the row whose completion is its mismatched KL completion (None: no row of
    another prompt exists, e.g. a split of one prompt).

    The rows are ordered by sha256(seed, row id) and each takes the completion of the row before it in that
    cycle; where that row has the same prompt, the nearest earlier row in the cycle with another prompt is
    taken instead. With distinct prompts this uses every completion once (a permutation); rows of a prompt that
    follow each other in the cycle share a partner. A function of (row ids, prompts, seed): the same rows in any
    input order get the same partners. Call it per split, so a partner never crosses the train/eval boundary."""
    if len(row_ids) != len(prompts):
        raise ValueError(f"kl_partners: {len(row_ids)} row ids but {len(prompts)} prompts")
    n = len(row_ids)
    order = sorted(range(n), key=lambda i: (hashlib.sha256(f"{seed}:{row_ids[i]}".encode()).hexdigest(), row_ids[i], i))
    partners: list[int | None] = [None] * n
    if len({*prompts}) < 2:
        return partners
    # Round the cycle once from a row whose predecessor has another prompt: each row takes its predecessor, or,
    # when that one has the same prompt, the predecessor's own partner (the nearest earlier row of another
    # prompt). O(n) whatever the prompts' sizes; a run of one prompt's rows shares one partner.
    start = next(k for k in range(n) if prompts[order[k - 1]] != prompts[order[k]])
    for step in range(n):
        k = (start + step) % n
        i, before = order[k], order[k - 1]
        partners[i] = before if prompts[before] != prompts[i] else partners[before]
    return partners


def split_partners(
    row_ids: Sequence[str], splits: Sequence[str], prompts: Sequence[str], seed: int
) -> list[int | None]:
    """kl_partners within each split of the rows (indices into the rows; None: the row's split has no other
    prompt among them)."""
    partners: list[int | None] = [None] * len(row_ids)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(splits):
        groups.setdefault(s, []).append(i)
    for members in groups.values():
        found = kl_partners([row_ids[i] for i in members], [prompts[i] for i in members], seed)
        for i, j in zip(members, found, strict=True):
            partners[i] = None if j is None else members[j]
    return partners


def kl_completion(completion_ids: Sequence[int], prompt_length: int, max_length: int | None) -> list[int]:
    """Another row's completion as this row's KL completion: cut to the max_length − prompt_length tokens that fit
    after this row's prompt (the rows' own rule, keep_start; None: no limit)."""
    ids = list(completion_ids)
    return ids if max_length is None else ids[: max(0, max_length - prompt_length)]


def kl_assignments(
    row_ids: Sequence[str],
    groups: Sequence[str],
    prompts: Sequence[str],
    prompt_lengths: Sequence[int],
    completions: Sequence[Sequence[int]],
    seed: int,
    max_length: int | None,
) -> list[tuple[list[int], str] | None]:
    """Each row's KL completion and the row_id it comes from, or None for a row with no partner: split_partners
    within each of `groups` (a split, or a shard's split), the partner's completion cut by kl_completion to fit
    after this row's prompt."""
    partners = split_partners(row_ids, groups, prompts, seed)
    return [
        None if j is None else (kl_completion(completions[j], prompt_lengths[i], max_length), row_ids[j])
        for i, j in enumerate(partners)
    ]
