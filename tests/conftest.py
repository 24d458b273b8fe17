"""Shared fixtures: tiny models and tokenizers built in-process (no hub, no network)."""

from __future__ import annotations

import gzip
import json
import os
import random
import tempfile
from pathlib import Path

import pytest

# One inductor cache per CPU kernel path: torch's compiled-code cache does not key on ATEN_CPU_CAPABILITY or
# MKL_ENABLE_INSTRUCTIONS, and a compiled CPU FlexAttention kernel cached under avx2 and loaded under avx512 (or
# natively) gave log-probs 3 nats off (measured on this machine's AMD EPYC). Set before torch compiles anything.
_KERNEL_PATH = (
    f"{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}-{os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'native')}"
)
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor-dpo-ray-{_KERNEL_PATH}")
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf-harmless-base-test-1500.jsonl.gz"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def small_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Dialog-like English sentences; the HH sample's text too when it is present."""
    rng = random.Random(seed)
    words = (
        "the a movie film was is great terrible fun boring I you we they like love hate think "
        "good bad very really not quite story plot actor scene music ending Human Assistant "
        "what how why can help please thanks sure sorry"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(n)]
    if HH_SAMPLE.exists():
        with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 300:
                    break
                row = json.loads(line)
                lines += [row["chosen"], row["rejected"]]
    return lines


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (head_dim 32) with a 512-token BPE tokenizer and a chat template."""
    from dpo_ray.models.tiny import build_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    return build_tiny_llama(out, small_corpus(), vocab_size=512, chat_template=CHAT_TEMPLATE, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from dpo_ray.models.loading import load_causal_lm

    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per family of dpo_ray.testing.families (window 8 where the family has one)."""
    from dpo_ray.testing.families import FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("families")
    corpus = small_corpus()
    return {name: build_tiny_model(name, root / name, corpus, window=8, seed=0) for name in FAMILIES}
