"""The one tokenization rule (ARCHITECTURE.md, "Tokenization") and raw records → tokenized pairs.

A sequence is prompt_ids + completion_ids. prompt_ids carries BOS exactly once when the tokenizer adds
one; completion_ids end with EOS exactly once. For chat data the prompt is the chat template applied to
the prompt messages with the generation prompt, and the rendered prompt must be a token prefix of the
rendered conversation. Truncation is explicit and reported per pair.

A record that cannot become a pair raises RowRejected with a stable reason code (REASONS).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "REASONS",
    "PairTokenizer",
    "RowRejected",
    "TokenizedPair",
    "pair_id",
    "record_to_pair",
    "split_of",
]

Truncation = Literal["keep_start", "keep_end", "drop"]
Format = Literal["auto", "explicit", "implicit", "conversational"]

# Stable reject reason codes, with what each means (README's table is generated from the same words).
REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the record is not a JSON object / mapping",
    "undecodable_text": "bytes that are not UTF-8, or a string with lone surrogates",
    "missing_field": "a mapped column is absent or null",
    "wrong_type": "a field is not a string (text formats) or not a list of {role, content} messages (chat)",
    "empty_prompt": "the prompt is empty or whitespace",
    "empty_completion": "chosen or rejected is empty or whitespace",
    "identical_completions": "chosen == rejected",
    "no_shared_prefix": "implicit/chat format: chosen and rejected share no prompt up to the last assistant turn",
    "no_chat_template": "chat messages, but the tokenizer has no chat template",
    "chat_prefix_mismatch": "the rendered prompt is not a token prefix of the rendered conversation",
    "text_too_long": "a text field exceeds max_text_chars characters",
    "too_long": "over max_length / max_prompt_length under truncation: drop",
    "duplicate": "an exact duplicate (same pair_id) of a pair kept earlier",
}


class RowRejected(Exception):
    """A record that cannot become a pair; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class TokenizedPair:
    prompt: str
    chosen: str
    rejected: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: dict[str, bool] = field(default_factory=dict)


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Content hash of the pair's texts (32 hex chars)."""
    return hashlib.sha256(json.dumps([prompt, chosen, rejected]).encode("utf-8")).hexdigest()[:32]


def split_of(pid: str, eval_fraction: float) -> str:
    """Deterministic train/eval assignment from the pair_id hash."""
    return "eval" if int(pid[:8], 16) / 0x1_0000_0000 < eval_fraction else "train"


def _check_text(value: Any, column: str, max_chars: int) -> str:
    if value is None:
        raise RowRejected("missing_field", f"column {column!r} is null")
    if not isinstance(value, str):
        raise RowRejected("wrong_type", f"column {column!r}: expected a string, found {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowRejected("undecodable_text", f"column {column!r}: {e.reason} at character {e.start}") from None
    if len(value) > max_chars:
        raise RowRejected("text_too_long", f"column {column!r}: {len(value)} characters > max_text_chars {max_chars}")
    return value


def _check_messages(value: Any, column: str, max_chars: int) -> list[dict[str, str]]:
    if value is None:
        raise RowRejected("missing_field", f"column {column!r} is null")
    if not isinstance(value, list) or not value:
        raise RowRejected("wrong_type", f"column {column!r}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowRejected("wrong_type", f"column {column!r} message {i}: expected {{role: str, content: str}}")
        out.append({"role": m["role"], "content": _check_text(m["content"], f"{column}[{i}].content", max_chars)})
    return out


class PairTokenizer:
    """Applies the tokenization and truncation rules with one tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        max_prompt_length: int,
        truncation: Truncation = "keep_end",
        max_text_chars: int = 1_000_000,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token; completions must end with one")
        if not 1 <= max_prompt_length < max_length:
            raise ValueError(f"need 1 <= max_prompt_length < max_length, found {max_prompt_length}, {max_length}")
        self.tok = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        bos = tokenizer.bos_token_id
        # A tokenizer "uses BOS" when its own encoding with special tokens starts with it.
        self.bos = int(bos) if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.truncation, self.max_text_chars = truncation, max_text_chars

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def prompt_ids(self, text: str) -> list[int]:
        """Prompt tokens with BOS exactly once (when the tokenizer uses BOS)."""
        ids = self._ids(text)
        if self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        return ids

    def completion_ids(self, text: str) -> list[int]:
        """Completion tokens ending with EOS exactly once."""
        ids = self._ids(text)
        while ids and ids[-1] == self.eos:
            ids.pop()
        return [*ids, self.eos]

    def render_chat(self, prompt_msgs: list[dict[str, str]], completion_msgs: list[dict[str, str]]) -> tuple:
        """(prompt_text, completion_text, prompt_ids, completion_ids) of a conversation, checked for prefix."""
        if not getattr(self.tok, "chat_template", None):
            raise RowRejected("no_chat_template", "the record holds messages but the tokenizer has no chat template")
        prompt_text = self.tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full_text = self.tok.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise RowRejected("chat_prefix_mismatch", "rendered prompt is not a text prefix of the conversation")
        prompt_ids = self.prompt_ids(prompt_text)
        full_ids = self.prompt_ids(full_text)
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
            raise RowRejected(
                "chat_prefix_mismatch",
                f"rendered prompt ({len(prompt_ids)} tokens) is not a token prefix of the conversation",
            )
        completion = full_ids[len(prompt_ids) :]
        while completion and completion[-1] == self.eos:
            completion.pop()
        return prompt_text, full_text[len(prompt_text) :], prompt_ids, [*completion, self.eos]

    def _truncate(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple:
        truncated = {"prompt": False, "chosen": False, "rejected": False}
        too_long = len(prompt) > self.max_prompt_length or len(prompt) + max(len(chosen), len(rejected)) > (
            self.max_length
        )
        if not too_long:
            return prompt, chosen, rejected, truncated
        if self.truncation == "drop":
            raise RowRejected(
                "too_long",
                f"prompt {len(prompt)} + completion {max(len(chosen), len(rejected))} tokens > max_length "
                f"{self.max_length} or prompt > max_prompt_length {self.max_prompt_length}",
            )
        if len(prompt) > self.max_prompt_length:
            truncated["prompt"] = True
            if self.truncation == "keep_start":
                prompt = prompt[: self.max_prompt_length]
            elif self.bos is not None:
                prompt = [self.bos, *prompt[len(prompt) - self.max_prompt_length + 1 :]]
            else:
                prompt = prompt[len(prompt) - self.max_prompt_length :]
        budget = self.max_length - len(prompt)
        if len(chosen) > budget:
            chosen, truncated["chosen"] = chosen[:budget], True
        if len(rejected) > budget:
            rejected, truncated["rejected"] = rejected[:budget], True
        return prompt, chosen, rejected, truncated

    def pair(
        self,
        prompt: str,
        chosen: str,
        rejected: str,
        ids: tuple[list[int], list[int], list[int]] | None = None,
    ) -> TokenizedPair:
        """Checks and tokenizes (or takes the given `ids` of) a text pair, then truncates."""
        if not prompt.strip():
            raise RowRejected("empty_prompt", "the prompt is empty or whitespace")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise RowRejected("empty_completion", f"{name} is empty or whitespace")
        if chosen == rejected:
            raise RowRejected("identical_completions", "chosen and rejected are the same text")
        if ids is None:
            ids = (self.prompt_ids(prompt), self.completion_ids(chosen), self.completion_ids(rejected))
        p, c, r, truncated = self._truncate(*ids)
        return TokenizedPair(prompt, chosen, rejected, p, c, r, truncated)


def _implicit_prompt(chosen: str, rejected: str, marker: str) -> str:
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    end = chosen.rfind(marker, 0, common)
    if end < 0:
        raise RowRejected("no_shared_prefix", f"chosen and rejected share no prefix ending in {marker!r}")
    return chosen[: end + len(marker)]


def record_to_pair(
    record: Any,
    pt: PairTokenizer,
    columns: Mapping[str, str],
    fmt: Format = "auto",
    implicit_marker: str = "\n\nAssistant:",
) -> TokenizedPair:
    """One raw record (a mapping) → a TokenizedPair, or RowRejected with a reason.

    columns maps "prompt", "chosen", "rejected" to the record's keys. Formats: explicit text
    (prompt, chosen, rejected strings); implicit (chosen and rejected full dialogs whose shared prefix up to
    and including the last `implicit_marker` is the prompt); conversational (message lists, with or
    without a separate prompt list). "auto" decides per record from which columns are present and their types.
    """
    if not isinstance(record, Mapping):
        raise RowRejected("not_an_object", f"expected an object with columns, found {type(record).__name__}")
    pcol, ccol, rcol = columns["prompt"], columns["chosen"], columns["rejected"]
    for col in (ccol, rcol):
        if col not in record:
            raise RowRejected("missing_field", f"column {col!r} is absent (present: {sorted(record)[:10]})")
    has_prompt = record.get(pcol) is not None
    if fmt == "auto":
        if isinstance(record[ccol], list):
            fmt = "conversational"
        else:
            fmt = "explicit" if has_prompt else "implicit"
    if fmt == "explicit" and not has_prompt:
        raise RowRejected("missing_field", f"column {pcol!r} is absent or null")
    limit = pt.max_text_chars
    if fmt == "explicit":
        prompt = _check_text(record[pcol], pcol, limit)
        return pt.pair(prompt, _check_text(record[ccol], ccol, limit), _check_text(record[rcol], rcol, limit))
    if fmt == "implicit":
        chosen, rejected = _check_text(record[ccol], ccol, limit), _check_text(record[rcol], rcol, limit)
        prompt = _implicit_prompt(chosen, rejected, implicit_marker)
        return pt.pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :])
    chosen_msgs = _check_messages(record[ccol], ccol, limit)
    rejected_msgs = _check_messages(record[rcol], rcol, limit)
    if has_prompt:
        prompt_msgs = _check_messages(record[pcol], pcol, limit)
    else:
        if chosen_msgs[:-1] != rejected_msgs[:-1] or len(chosen_msgs) < 2:
            raise RowRejected("no_shared_prefix", "chosen and rejected differ before their last message")
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:-1], chosen_msgs[-1:], rejected_msgs[-1:]
    for name, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        if msgs[-1]["role"] != "assistant":
            raise RowRejected("wrong_type", f"{name}: the last message's role is {msgs[-1]['role']!r}, not 'assistant'")
    for name, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        if not "".join(m["content"] for m in msgs).strip():
            raise RowRejected("empty_completion", f"{name} has no content")
    if not "".join(m["content"] for m in prompt_msgs).strip():
        raise RowRejected("empty_prompt", "the prompt messages have no content")
    prompt_text, chosen_text, p_ids, c_ids = pt.render_chat(prompt_msgs, chosen_msgs)
    _, rejected_text, _, r_ids = pt.render_chat(prompt_msgs, rejected_msgs)
    return pt.pair(prompt_text, chosen_text, rejected_text, ids=(p_ids, c_ids, r_ids))
