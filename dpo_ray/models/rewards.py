"""Reward functions for on-policy pairs: (prompts, completions) batches → one float per completion.

A reward is named in config as one of:
- `lexicon`: the demo's sentiment score: per sentence, (positive − negative lexicon words) / 2 clipped to
  [-1, 1]; the completion's score is the mean over its sentences;
- `length`: the completion's length in characters;
- `model:<dir or hub id>`: a sequence-classification reward model (its first logit), batched;
- `<module>:<function>`: any importable callable with the same signature.
`score` checks what a scorer returns (count, finiteness) and names the scorer in every error.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from dpo_ray.errors import UserError

__all__ = [
    "NEGATIVE",
    "POSITIVE",
    "RewardError",
    "RewardFn",
    "completion_length",
    "lexicon_sentiment",
    "load_reward",
    "score",
]

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]

POSITIVE = frozenset(
    "wonderful brilliant delightful moving superb charming great excellent beautiful fun good loved liked".split()
)
NEGATIVE = frozenset("terrible boring awful dull clumsy painful weak bad tedious messy hated disliked".split())
_WORD = re.compile(r"[a-z']+")
_SENTENCE = re.compile(r"[.!?\n]+")


class RewardError(UserError, RuntimeError):
    """A reward function failed or returned something unusable; the message names it."""


def lexicon_sentiment(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Mean over the completion's sentences of clip((#positive − #negative lexicon words) / 2, -1, 1).

    Per sentence it saturates like a classifier's confidence (two net positive words score 1; piling up
    more cannot raise it), and averaging over sentences means that rambling on (more sentences, or an
    unfinished one) cannot raise it either. Earlier versions were reward-hacked by the demo's DPO: a
    per-word ratio by strings of adjectives, a whole-text count by never ending the review.
    """
    del prompts
    out = []
    for text in completions:
        scores = []
        for sentence in _SENTENCE.split(text.lower()):
            words = _WORD.findall(sentence)
            if words:
                hits = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
                scores.append(max(-1.0, min(1.0, hits / 2)))
        out.append(sum(scores) / len(scores) if scores else 0.0)
    return out


class RewardModel:
    """A sequence-classification reward model scoring prompt + completion texts in batches; a text longer than
    the model's context is cut from the left (its end, the completion, is scored)."""

    def __init__(self, ref: str, batch_size: int = 16, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from dpo_ray.models.loading import load_tokenizer, resolve_model_dir

        path = str(resolve_model_dir(ref))
        self.tok = load_tokenizer(path, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code
        ).eval()
        self.model.config.pad_token_id = self.tok.pad_token_id
        # A text longer than the reward model's context keeps its end: the completion and the latest turns
        # (transformers' default keeps the start, so a long prompt would hide the completion it is to score).
        self.tok.truncation_side = "left"
        self.batch_size, self.torch = batch_size, torch

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [
                p + c
                for p, c in zip(prompts[i : i + self.batch_size], completions[i : i + self.batch_size], strict=True)
            ]
            enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True)
            with self.torch.no_grad():
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out


def completion_length(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Characters in each completion (a simple, bias-revealing reward for tests and length experiments)."""
    del prompts
    return [float(len(c)) for c in completions]


def load_reward(spec: str) -> RewardFn:
    """The reward function a config names (see the module docstring)."""
    if spec == "lexicon":
        return lexicon_sentiment
    if spec == "length":
        return completion_length
    if spec.startswith("model:"):
        return RewardModel(spec.removeprefix("model:"))
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise RewardError(f"reward {spec!r}: expected 'lexicon', 'model:<path>' or '<module>:<function>'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {name} is not callable")
    return fn


def score(fn: RewardFn, name: str, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Call a reward function and check its answer: one finite float per completion."""
    try:
        values: Any = fn(prompts, completions)
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name!r} returned something that is not a list of numbers ({e})") from None
    if len(floats) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(floats)} values for {len(completions)} completions")
    bad = [i for i, v in enumerate(floats) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward {name!r} returned non-finite values (NaN/inf) at positions {bad[:10]}")
    return floats
