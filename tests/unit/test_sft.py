"""SFT of a tiny Llama on the demo's review corpus: the loss falls and greedy samples become review-like."""

from __future__ import annotations

import pytest
import torch

from dpo_ray.models.loading import load_causal_lm, load_tokenizer, model_fingerprint
from dpo_ray.models.tiny import build_tiny_llama
from dpo_ray.train.sft import sft_train
from pipeline.cli.demo import review_corpus


def test_sft_learns_the_review_corpus(tmp_path):
    corpus = review_corpus(600)
    model_dir = build_tiny_llama(tmp_path / "m", corpus, vocab_size=512)
    before = model_fingerprint(model_dir)
    losses = sft_train(model_dir, corpus, steps=150, batch_size=32, lr=3e-3)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert model_fingerprint(model_dir) != before  # saved back
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    ids = torch.tensor([tok("I watched Red River last night. (#5) I liked it.").input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    words = set(text.replace(".", " ").split())
    assert "The" in words and "was" in words, text  # review-like: "The <subject> was <adjective> ..."
    with pytest.raises(ValueError, match="steps"):
        sft_train(model_dir, corpus, steps=0)


def test_demo_assets_with_sft(tmp_path):
    from pipeline.cli.demo import build_assets

    plain = build_assets(tmp_path / "plain", pairs=20, seed=0)
    tuned = build_assets(tmp_path / "tuned", pairs=20, seed=0, sft_steps=20)
    assert model_fingerprint(plain / "model") != model_fingerprint(tuned / "model")
    assert (plain / "pairs.jsonl").read_text() == (tuned / "pairs.jsonl").read_text()


def test_demo_assets_are_reused_only_for_the_same_settings(tmp_path, capsys):
    """Assets built for another demo config are rebuilt, not reused (failed before: `.complete` alone meant reuse,
    so `run demo.seed=1` over a seed-0 run dir trained seed 0's model and pairs)."""
    from pipeline.cli.demo import build_assets

    first = build_assets(tmp_path / "assets", pairs=20, seed=0)
    print_before = model_fingerprint(first / "model")
    assert model_fingerprint(build_assets(tmp_path / "assets", pairs=20, seed=0) / "model") == print_before
    capsys.readouterr()
    other = build_assets(tmp_path / "assets", pairs=30, seed=1)
    assert "rebuilding" in capsys.readouterr().out
    assert model_fingerprint(other / "model") != print_before
    assert len((other / "pairs.jsonl").read_text().splitlines()) == 30
