"""The one tokenization rule (docs/howto/own-model-and-data.md, "How text becomes tokens") and raw records →
tokenized pairs.

A sequence is prompt_ids + completion_ids, tokenized the way the model sees it when it generates:
- prompt_ids: the prompt tokenized alone, BOS exactly once when the tokenizer uses one. For chat data the
  prompt is the chat template of the prompt messages with the generation prompt.
- completion_ids: the tokens of the whole text (prompt + completion; for chat, the rendered conversation)
  after that prefix, ending with the stop token exactly once: EOS for text; for chat the template's end of
  turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, Mistral's `</s>`: what generation stops
  on), found by rendering a probe conversation, with whatever the template puts after it (ChatML's "\n",
  Phi-3's trailing EOS) cut off.
- Boundary merges: where the tokenizer merges the prompt's last tokens with the completion's first (a
  prompt ending in a space, a Metaspace "▁"), the tokenized prompt is not a prefix of the tokenized whole.
  Then, as TRL 1.16 does, prompt_ids are the common prefix of the two (the prompt's diverging end moves
  into the completion) and the pair is counted (`TokenizedPair.boundary_merge`, prepare's
  `stats.boundary_merges`).
Truncation is explicit and reported per pair.

A record that cannot become a pair raises RowRejected with a stable reason code (REASONS).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = [
    "REASONS",
    "SPLIT_RULE",
    "PairTokenizer",
    "RowRejected",
    "batch_encoded",
    "TokenizedPair",
    "common_prefix_length",
    "encode_many",
    "end_of_turn_id",
    "pair_id",
    "prompt_id",
    "record_to_pair",
    "records_to_pairs",
    "split_of",
]

T = TypeVar("T")
Truncation = Literal["keep_start", "keep_end", "drop"]
Format = Literal["auto", "explicit", "implicit", "conversational"]

# Stable reject reason codes, with what each means (docs/reference/artifacts.md is generated from this table).
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
    "no_prompt_tokens": "the prompt's only tokens merge with the completion's, so no prompt token is left",
    "too_long": "over max_length / max_prompt_length under truncation: drop",
    "duplicate": "an exact duplicate (same pair_id; unpaired: same row_id) of a row kept earlier",
    "invalid_label": "unpaired data: the label is absent, null or not a boolean (true: desirable, false: not)",
    "no_kl_partner": "unpaired data: no row of another prompt in the row's shard and split gives it a KL completion",
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
    boundary_merge: bool = False


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Content hash of the pair's texts (32 hex chars)."""
    return hashlib.sha256(json.dumps([prompt, chosen, rejected]).encode("utf-8")).hexdigest()[:32]


def prompt_id(prompt: str) -> str:
    """Content hash of a prompt's text (32 hex chars): how prompts are ordered, seeded and split."""
    return pair_id(prompt, "", "")


# The split rule, part of the identity of the stages that split (pipeline.core.inputs): artifacts split by an older
# rule (per pair, before 2026-12) are redone, not reused.
SPLIT_RULE = "prompt-sha256"


def split_of(prompt: str, eval_fraction: float, salt: str = "") -> str:
    """Deterministic train/eval assignment of a prompt, from the hash of its text (and `salt`).

    A function of the prompt, not of the pair: every pair of one prompt lands in the same split, so eval
    metrics and evaluate's held-out prompts never measure a prompt the model trained on (a dataset with
    several pairs per prompt, or generate's all_pairs, would otherwise put most eval prompts in train too).
    `salt` draws an independent split of the same prompts: generate splits prompts that were all in prepare's
    train split (hash ≥ prepare's fraction), and with prepare's hash it would put none in eval.
    """
    key = prompt_id(prompt) if not salt else pair_id(prompt, salt, "")
    return "eval" if int(key[:8], 16) / 0x1_0000_0000 < eval_fraction else "train"


def check_text(value: Any, column: str, max_chars: int) -> str:
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


def check_messages(value: Any, column: str, max_chars: int) -> list[dict[str, str]]:
    if value is None:
        raise RowRejected("missing_field", f"column {column!r} is null")
    if not isinstance(value, list) or not value:
        raise RowRejected("wrong_type", f"column {column!r}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowRejected("wrong_type", f"column {column!r} message {i}: expected {{role: str, content: str}}")
        out.append({"role": m["role"], "content": check_text(m["content"], f"{column}[{i}].content", max_chars)})
    return out


def check_texts(prompt: str, completions: Mapping[str, str]) -> None:
    """RowRejected when the prompt or a completion (by its column's role: chosen, rejected, completion) is empty or
    whitespace."""
    if not prompt.strip():
        raise RowRejected("empty_prompt", "the prompt is empty or whitespace")
    for name, text in completions.items():
        if not text.strip():
            raise RowRejected("empty_completion", f"{name} is empty or whitespace")


def check_chat_turns(prompt_msgs: list[dict[str, str]], completions: Mapping[str, list[dict[str, str]]]) -> None:
    """RowRejected unless each completion's messages end with the assistant's turn and hold content, and the
    prompt's messages hold content."""
    for name, msgs in completions.items():
        if msgs[-1]["role"] != "assistant":
            raise RowRejected("wrong_type", f"{name}: the last message's role is {msgs[-1]['role']!r}, not 'assistant'")
    for name, msgs in completions.items():
        if not "".join(m["content"] for m in msgs).strip():
            raise RowRejected("empty_completion", f"{name} has no content")
    if not "".join(m["content"] for m in prompt_msgs).strip():
        raise RowRejected("empty_prompt", "the prompt messages have no content")


_PROBE = "dpo_ray_probe_text"


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token a chat template ends an assistant turn with (what generation stops on), or None without a
    template. Found by rendering a user/assistant probe: the first special token after the assistant's text;
    EOS when the template puts none there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    tail = text[text.rindex(_PROBE) + len(_PROBE) :]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    for token in tokenizer(tail, add_special_tokens=False).input_ids:
        if token in special:
            return int(token)
    return int(tokenizer.eos_token_id)


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (list elements, string characters) a and b share. A binary search over prefix
    equality: the comparisons run in C, which matters for prompts of thousands of characters or tokens."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1] or hi is the shorter length
    if a[:hi] == b[:hi]:  # the common case: the prompt's tokens start the whole's
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
        self.end_of_turn = end_of_turn_id(tokenizer)
        # records_to_pairs: the texts a batch needs (while collecting) and their ids (once encoded together).
        self._collecting: list[str] | None = None
        self._encoded: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if self._collecting is not None:
            self._collecting.append(text)
            return []
        found = self._encoded.get(text)
        if found is not None:
            return list(found)
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def prompt_ids(self, text: str) -> list[int]:
        """Prompt tokens with BOS exactly once (when the tokenizer uses BOS)."""
        ids = self._ids(text)
        if self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        return ids

    def _ended(self, ids: list[int], stop: int, chat: bool) -> list[int]:
        """Completion tokens ending with `stop` exactly once. Chat: cut after the last `stop` (dropping what the
        template renders after the turn). Text, or a chat turn without it: trailing EOS/stop tokens dropped,
        then `stop` appended."""
        if chat and stop in ids:
            ids = ids[: len(ids) - ids[::-1].index(stop)]
            while len(ids) >= 2 and ids[-2] == stop:
                ids = ids[:-1]
            return ids
        while ids and ids[-1] in (self.eos, stop):
            ids = ids[:-1]
        return [*ids, stop]

    def split(
        self, prompt_ids: list[int], wholes: list[list[int]], stop: int, chat: bool
    ) -> tuple[list[int], list[list[int]], bool]:
        """The one rule on token ids: prompt alone and prompt + each completion → (prompt_ids, completion_ids
        per completion, boundary_merge). See the module docstring."""
        n = min(common_prefix_length(prompt_ids, w) for w in wholes)
        if n == 0:
            raise RowRejected("no_prompt_tokens", "the prompt's first token merges with the completion")
        completions = [self._ended(list(w[n:]), stop, chat) for w in wholes]
        return list(prompt_ids[:n]), completions, n < len(prompt_ids)

    def text_ids(self, prompt: str, completions: list[str]) -> tuple[list[int], list[list[int]], bool]:
        """Text data: prompt_ids, completion_ids of each completion (ending with EOS once), boundary_merge."""
        wholes = [self.prompt_ids(prompt + c) for c in completions]
        return self.split(self.prompt_ids(prompt), wholes, self.eos, chat=False)

    def render_chat(
        self, prompt_msgs: list[dict[str, str]], completions: list[list[dict[str, str]]]
    ) -> tuple[str, list[str], list[int], list[list[int]], bool]:
        """Chat data: (prompt_text, completion texts, prompt_ids, completion_ids each, boundary_merge)."""
        if not getattr(self.tok, "chat_template", None) or self.end_of_turn is None:
            raise RowRejected("no_chat_template", "the record holds messages but the tokenizer has no chat template")
        prompt_text = self.tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        texts = []
        for msgs in completions:
            full_text = self.tok.apply_chat_template(prompt_msgs + msgs, tokenize=False)
            if not full_text.startswith(prompt_text):
                raise RowRejected("chat_prefix_mismatch", "rendered prompt is not a text prefix of the conversation")
            texts.append(full_text[len(prompt_text) :])
        wholes = [self.prompt_ids(prompt_text + t) for t in texts]
        prompt_ids, completion_ids, merged = self.split(
            self.prompt_ids(prompt_text), wholes, self.end_of_turn, chat=True
        )
        return prompt_text, texts, prompt_ids, completion_ids, merged

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

    def truncate_one(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int], dict[str, bool]]:
        """The truncation rule with one completion (unpaired rows): (prompt, completion, truncated flags)."""
        p, c, _, truncated = self._truncate(prompt, completion, completion)
        return p, c, {"prompt": truncated["prompt"], "completion": truncated["chosen"]}

    def pair(
        self,
        prompt: str,
        chosen: str,
        rejected: str,
        ids: tuple[list[int], list[int], list[int]] | None = None,
        boundary_merge: bool = False,
    ) -> TokenizedPair:
        """Checks and tokenizes (or takes the given `ids` of) a text pair, then truncates."""
        check_texts(prompt, {"chosen": chosen, "rejected": rejected})
        if chosen == rejected:
            raise RowRejected("identical_completions", "chosen and rejected are the same text")
        if ids is None:
            prompt_ids, (chosen_ids, rejected_ids), boundary_merge = self.text_ids(prompt, [chosen, rejected])
            ids = (prompt_ids, chosen_ids, rejected_ids)
        p, c, r, truncated = self._truncate(*ids)
        return TokenizedPair(prompt, chosen, rejected, p, c, r, truncated, boundary_merge)


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """tokenizer(text, add_special_tokens=False).input_ids of each text, in one call.

    For a transformers fast tokenizer whose class does not override the encoding path, and whose backend has no
    truncation or padding set, this calls the `tokenizers` backend directly (what transformers' own call ends
    in, without offsets and Python-side conversion: ~35% less time here); any other tokenizer goes through its
    own __call__."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: its own call, which is always right
        return [list(x) for x in tokenizer(texts, add_special_tokens=False).input_ids]
    cls = type(tokenizer)
    backend: Any = getattr(tokenizer, "_tokenizer", None)
    direct = (
        isinstance(tokenizer, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and backend is not None
        and backend.truncation is None
        and backend.padding is None
        and hasattr(backend, "encode_batch_fast")
    )
    if not direct:
        return [list(x) for x in tokenizer(texts, add_special_tokens=False).input_ids]
    split = bool(tokenizer.split_special_tokens)
    if backend.encode_special_tokens != split:  # as transformers' call sets it
        backend.encode_special_tokens = split
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def records_to_pairs(
    records: list[Any],
    pt: PairTokenizer,
    columns: Mapping[str, str],
    fmt: Format = "auto",
    implicit_marker: str = "\n\nAssistant:",
) -> list[TokenizedPair | RowRejected]:
    """record_to_pair of each record (the pair or its RowRejected), with the batch's texts encoded in one call.

    A first pass runs each record up to its encodings, collecting the texts to encode; the tokenizer encodes
    them all at once (a fast tokenizer spreads a batch over every core); a second pass applies the rule with
    those ids. The same texts go through the same tokenizer, so the result is record_to_pair's, row for row."""

    return batch_encoded(pt, records, lambda record: record_to_pair(record, pt, columns, fmt, implicit_marker))


def batch_encoded(pt: PairTokenizer, records: list[Any], convert: Callable[[Any], T]) -> list[T | RowRejected]:
    """`convert` (a function of one record that tokenizes through `pt`) of each record, or its RowRejected, with
    every text of the batch encoded in one tokenizer call (records_to_pairs' two passes)."""

    def each() -> list[T | RowRejected]:
        out: list[T | RowRejected] = []
        for record in records:
            try:
                out.append(convert(record))
            except RowRejected as e:
                out.append(e)
        return out

    pt._collecting = []
    try:
        each()
        texts = list(dict.fromkeys(pt._collecting))
    finally:
        pt._collecting = None
    if texts:
        pt._encoded = dict(zip(texts, encode_many(pt.tok, texts), strict=True))
    try:
        return each()
    finally:
        pt._encoded = {}


def _implicit_prompt(chosen: str, rejected: str, marker: str) -> str:
    common = common_prefix_length(chosen, rejected)
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
        prompt = check_text(record[pcol], pcol, limit)
        return pt.pair(prompt, check_text(record[ccol], ccol, limit), check_text(record[rcol], rcol, limit))
    if fmt == "implicit":
        chosen, rejected = check_text(record[ccol], ccol, limit), check_text(record[rcol], rcol, limit)
        prompt = _implicit_prompt(chosen, rejected, implicit_marker)
        return pt.pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :])
    chosen_msgs = check_messages(record[ccol], ccol, limit)
    rejected_msgs = check_messages(record[rcol], rcol, limit)
    if has_prompt:
        prompt_msgs = check_messages(record[pcol], pcol, limit)
    else:
        if chosen_msgs[:-1] != rejected_msgs[:-1] or len(chosen_msgs) < 2:
            raise RowRejected("no_shared_prefix", "chosen and rejected differ before their last message")
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:-1], chosen_msgs[-1:], rejected_msgs[-1:]
    check_chat_turns(prompt_msgs, {"chosen": chosen_msgs, "rejected": rejected_msgs})
    prompt_text, (chosen_text, rejected_text), p_ids, (c_ids, r_ids), merged = pt.render_chat(
        prompt_msgs, [chosen_msgs, rejected_msgs]
    )
    return pt.pair(prompt_text, chosen_text, rejected_text, ids=(p_ids, c_ids, r_ids), boundary_merge=merged)
