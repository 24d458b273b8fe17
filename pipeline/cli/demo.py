"""Demo assets generated on the fly: a templated movie-review preference corpus and a tiny Llama.

Pairs share a prompt (the opening of a review) and differ only in sentiment: chosen completions use
positive words, rejected ones negative words. A policy can learn that preference from token identity
alone, so DPO visibly works on a 2-core CPU in a minute (tests use it as the learnable task).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from pipeline.core import console

logger = logging.getLogger(__name__)

__all__ = ["NEGATIVE", "NEUTRAL", "POSITIVE", "build_assets", "review_corpus", "review_pairs"]

POSITIVE = "wonderful brilliant delightful moving superb charming great excellent beautiful fun".split()
NEGATIVE = "terrible boring awful dull clumsy painful weak bad tedious messy".split()
NEUTRAL = "long recent quiet old slow short loud simple familiar late".split()
_SUBJECTS = "movie film plot acting music ending cast story script camera".split()
_TITLES = "Red River|The Long Night|Blue Harbor|Paper Moon|Silent Road|The Last Train|Cold Light|Small Town".split("|")
_OPENINGS = ["I watched {t} last night.", "We saw {t} yesterday.", "My review of {t}:", "{t} opened this week."]


def _sentence(rng: random.Random, words: list[str]) -> str:
    a, b = rng.sample(_SUBJECTS, 2)
    return f" The {a} was {rng.choice(words)} and the {b} was {rng.choice(words)}."


def review_pairs(n: int, seed: int = 0, conditional: bool = False) -> list[dict[str, str]]:
    """n explicit (prompt, chosen, rejected) pairs; chosen is positive, rejected negative.

    conditional: the prompt says whether the reviewer liked the movie and the chosen completion agrees with
    it (half the pairs prefer negative words): a preference that only a prompt-aware policy can learn.
    """
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = rng.choice(_OPENINGS).format(t=rng.choice(_TITLES)) + f" (#{i})"
        good, bad = _sentence(rng, POSITIVE), _sentence(rng, NEGATIVE)
        if conditional:
            liked = rng.random() < 0.5
            prompt += " I liked it." if liked else " I disliked it."
            good, bad = (good, bad) if liked else (bad, good)
        pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return pairs


def review_corpus(n: int = 2000, seed: int = 1) -> list[str]:
    """Text for training the tokenizer (and, in the sentiment demo, the reference model)."""
    rng = random.Random(seed)
    words = POSITIVE + NEGATIVE + NEUTRAL
    return [rng.choice(_OPENINGS).format(t=rng.choice(_TITLES)) + f" (#{i})" + _sentence(rng, words) for i in range(n)]


def build_assets(
    root: str | Path,
    pairs: int,
    seed: int,
    model: dict[str, Any] | None = None,
    conditional: bool = False,
    sft_steps: int = 0,
) -> Path:
    """Write <root>/pairs.jsonl and a tiny Llama at <root>/model, SFT-trained on the review corpus for
    `sft_steps` steps (once; reused when present and built with these arguments, rebuilt otherwise)."""
    import shutil

    from dpo_ray.models.tiny import build_tiny_llama
    from dpo_ray.train.sft import sft_train

    root = Path(root)
    done = root / ".complete"
    made_with = json.dumps(
        {"pairs": pairs, "seed": seed, "model": model, "conditional": conditional, "sft_steps": sft_steps},
        sort_keys=True,
    )
    if done.exists() and done.read_text() == made_with:
        return root
    if done.exists():  # built for another demo config (seed, size, model): never reused for this one
        console.result(f"demo: {root} was built with {done.read_text() or 'other settings'}; rebuilding")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    console.header(f"demo: {pairs} review prefixes and a tiny Llama, SFT-trained for {sft_steps} steps -> {root}")
    with (root / "pairs.jsonl").open("w") as f:
        f.writelines(json.dumps(p) + "\n" for p in review_pairs(pairs, seed, conditional))
    corpus = review_corpus()
    build_tiny_llama(root / "model", corpus, seed=seed, **(model or {}))
    if sft_steps:
        sft_train(root / "model", corpus, sft_steps, seed=seed)
    done.write_text(made_with)
    console.result(f"demo: assets at {root}")
    return root
