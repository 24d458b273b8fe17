"""Shared by the CPU benchmarks: the HH-RLHF sample and a Llama with a BPE tokenizer trained on it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test-1500.jsonl.gz"


def hh_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.open(HH, "rt")]


def build_hh_llama(out: Path, records: list[dict[str, Any]], hidden: int, layers: int, vocab: int = 8000) -> Path:
    """A seeded random-init Llama (head_dim 64, MLP 2.75 x hidden) whose BPE tokenizer is trained on the
    records' dialogs; saved to `out`."""
    from dpo_ray.models.tiny import build_tiny_llama

    corpus = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    return build_tiny_llama(
        out,
        corpus,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        head_dim=64,
        intermediate_size=int(hidden * 2.75),
        max_position_embeddings=2048,
        seed=0,
    )
