"""Fixtures of the unit tests that read text: the session's tiny tokenizer and its PairTokenizer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    from dpo_ray.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def pt(tok):
    """The tokenization rule with max_length 64, prompts up to 32 tokens, truncation keep_end."""
    from dpo_ray.data.tokenization import PairTokenizer

    return PairTokenizer(tok, max_length=64, max_prompt_length=32, truncation="keep_end")
