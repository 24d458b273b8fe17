"""A long-context preference set made here from HH-RLHF dialogs: several dialogs joined into one long multi-turn
conversation that ends in a last dialog's preference pair, for the tests and benchmarks of long sequences
(sequence parallelism, the fused head, the reference stage at 32k tokens).

Each record keeps HH-RLHF's implicit format ({"chosen": transcript, "rejected": transcript}, the two sharing
everything up to the last "\\n\\nAssistant:"): the earlier dialogs' chosen transcripts come first, whole (each
alternates Human and Assistant turns and ends with an Assistant answer, so the joined conversation alternates
too), then the last dialog's chosen or rejected transcript. Dialogs are drawn in a seeded order without
repetition until the sample runs out, then again in a new order. A record's length, counted with the caller's
tokenizer, stays within its target (the dialog that would pass it is left out), so a target below
prepare.max_length is never truncated.

As a command, it writes such a set as JSON lines for a long-context run (pipeline/configs/llama3-8b-32k.yaml):

    python -m dpo_ray.testing.long_context --hh train.jsonl.gz --tokenizer meta-llama/Llama-3.1-8B-Instruct \
        --count 4000 --min-tokens 8000 --max-tokens 32000 --out long-hh.jsonl

with targets drawn uniformly between the bounds (seeded).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["long_conversations", "main", "read_hh"]


def read_hh(path: str | Path) -> list[dict[str, Any]]:
    """The records of an HH-RLHF JSON-lines file (gzip or plain): {"chosen", "rejected"} transcripts."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _draws(n: int, rng: random.Random) -> Iterator[int]:
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def long_conversations(
    dialogs: Sequence[dict[str, Any]], count_tokens: Callable[[str], int], lengths: Sequence[int], seed: int = 0
) -> list[dict[str, Any]]:
    """One record per target in `lengths` (tokens of the longer sequence, prompt and completion, as
    count_tokens counts a text): earlier dialogs joined in front of a last dialog's pair, as the module
    docstring says. Each record also has `dialogs` (the indices joined, the last one's pair last) and `tokens`
    (count_tokens of its longer transcript)."""
    if len(dialogs) < 2:
        raise ValueError(f"long_conversations: {len(dialogs)} dialog(s); at least 2 are needed")
    rng = random.Random(seed)
    draws = _draws(len(dialogs), rng)
    lengths_of: dict[int, int] = {}

    def length(i: int) -> int:
        if i not in lengths_of:
            lengths_of[i] = count_tokens(dialogs[i]["chosen"])
        return lengths_of[i]

    records = []
    for target in lengths:
        last = next(draws)
        final = max(count_tokens(dialogs[last]["chosen"]), count_tokens(dialogs[last]["rejected"]))
        if final > target:
            raise ValueError(f"long_conversations: target {target} tokens is below one dialog ({final} tokens)")
        joined: list[int] = []
        total = final
        for _ in range(4 * len(dialogs)):  # enough draws to pass any target the sample can fill
            i = next(draws)
            if i == last:
                continue
            if total + length(i) > target:
                break
            joined.append(i)
            total += length(i)
        context = "".join(dialogs[i]["chosen"] for i in joined)
        chosen, rejected = context + dialogs[last]["chosen"], context + dialogs[last]["rejected"]
        tokens = max(count_tokens(chosen), count_tokens(rejected))
        records.append({"chosen": chosen, "rejected": rejected, "dialogs": [*joined, last], "tokens": tokens})
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write long HH-RLHF conversations (dpo_ray.testing.long_context).")
    parser.add_argument("--hh", required=True, help="HH-RLHF JSON lines (.jsonl or .jsonl.gz)")
    parser.add_argument("--tokenizer", required=True, help="the policy's tokenizer: a local dir or hub id")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--min-tokens", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from dpo_ray.models.loading import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    rng = random.Random(args.seed)
    targets = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.count)]
    records = long_conversations(read_hh(args.hh), lambda t: len(tok(t).input_ids), targets, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    tokens = [r["tokens"] for r in records]
    print(f"wrote {len(records)} conversations of {min(tokens)}-{max(tokens)} tokens to {args.out}")


if __name__ == "__main__":
    main()
