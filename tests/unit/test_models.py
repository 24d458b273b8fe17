"""Tiny model construction, loading and fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpo_ray.models.loading import (
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    resolve_model_dir,
    tokenizer_fingerprint,
)
from dpo_ray.models.tiny import build_tiny_llama


def test_tiny_model_loads_with_special_tokens(tiny_model_dir: Path, tiny_model):
    tok = load_tokenizer(tiny_model_dir)
    ids = tok("the movie was great").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.bos_token_id != tok.eos_token_id != tok.pad_token_id
    assert tok("the movie", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    assert tok.decode(tok("the movie was great", add_special_tokens=False).input_ids) == "the movie was great"
    assert tiny_model.config.head_dim >= 32
    assert tiny_model.config.vocab_size == len(tok)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|user|>hi\n<|assistant|>"
    )


def test_fingerprints_are_stable_and_sensitive(tiny_model_dir: Path, tmp_path: Path):
    tok = load_tokenizer(tiny_model_dir)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(tiny_model_dir))
    tok.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer(tiny_model_dir))

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)
    # Other stop tokens (generation_config.json: generate ends samples at them) are another model for the stages.
    stops = tmp_path / "stops"
    shutil.copytree(tiny_model_dir, stops)
    (stops / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert model_fingerprint(stops) != model_fingerprint(tiny_model_dir)

    # Same architecture and tokenizer, other weights (as after fine-tuning): another fingerprint.
    from tests.conftest import CHAT_TEMPLATE, small_corpus

    reseeded = build_tiny_llama(
        tmp_path / "reseeded", small_corpus(), vocab_size=512, chat_template=CHAT_TEMPLATE, seed=5
    )
    assert (reseeded / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert model_fingerprint(reseeded) != model_fingerprint(tiny_model_dir)

    other = build_tiny_llama(tmp_path / "other", ["some other corpus text"] * 20, vocab_size=300, seed=1)
    assert model_fingerprint(other) != model_fingerprint(tiny_model_dir)
    assert tokenizer_fingerprint(load_tokenizer(other)) != tokenizer_fingerprint(load_tokenizer(tiny_model_dir))
    assert load_causal_lm(other).config.vocab_size == len(load_tokenizer(other))


def test_resolve_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_fingerprint(tmp_path)
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_llama(tmp_path / "x", ["a b"], head_dim=16)


def test_resolve_copies_uri_to_cache(tiny_model_dir: Path, tmp_path: Path):
    local = resolve_model_dir(f"file://{tiny_model_dir}")
    assert local == tiny_model_dir
    # A non-local fsspec URI (memory://) is copied once into the cache.
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in tiny_model_dir.iterdir():
        fs.pipe(f"/model/{f.name}", f.read_bytes())
    cached = resolve_model_dir("memory://model", cache_dir=tmp_path / "cache")
    assert model_fingerprint(cached) == model_fingerprint(tiny_model_dir)
    assert resolve_model_dir("memory://model", cache_dir=tmp_path / "cache") == cached  # copied once


def test_a_model_rewritten_at_its_uri_is_copied_anew(tiny_model_dir: Path, tmp_path: Path):
    """A retrained export at the same URI is the new model, not the cached copy of the old one.

    Failed before the cache was keyed by the files' versions: the first copy of a URI was served forever."""
    import fsspec
    from safetensors.torch import load_file, save_file

    fs = fsspec.filesystem("memory")
    for f in tiny_model_dir.iterdir():
        fs.pipe(f"/retrained/{f.name}", f.read_bytes())
    old = resolve_model_dir("memory://retrained", cache_dir=tmp_path / "cache")
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    edited = {k: v + 1.0 for k, v in weights.items()}
    save_file(edited, str(tmp_path / "edited.safetensors"), metadata={"format": "pt"})
    fs.pipe("/retrained/model.safetensors", (tmp_path / "edited.safetensors").read_bytes())
    new = resolve_model_dir("memory://retrained", cache_dir=tmp_path / "cache")
    assert new != old and model_fingerprint(new) != model_fingerprint(old)
    assert load_file(str(new / "model.safetensors")).keys() == edited.keys()


def test_a_chat_template_change_changes_the_tokenizer_fingerprint(family_dirs):
    """A re-templated tokenizer is a different tokenizer for every stage."""
    from dpo_ray.models.loading import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(family_dirs["qwen2"])
    before = tokenizer_fingerprint(tok)
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "<|im_end|><|im_end|>", 1)
    assert tokenizer_fingerprint(tok) != before
    assert tokenizer_fingerprint(load_tokenizer(family_dirs["qwen2"])) == before


def test_one_rule_for_local_paths_uris_and_hub_ids(tmp_path):
    from dpo_ray.models.loading import ref_kind
    from pipeline.config.base import _absolute_ref

    cases = {
        "meta-llama/Llama-3.1-8B-Instruct": "hub",
        "gpt2": "hub",
        "s3://bucket/model": "uri",
        "gs://b/m": "uri",
        "./model": "local",
        "/abs/model": "local",
        "~/model": "local",
        "runs/demo/assets/model": "local",
        str(tmp_path): "local",
        f"file://{tmp_path}": "local",
    }
    assert {ref: ref_kind(ref) for ref in cases} == cases
    assert _absolute_ref("gpt2") == "gpt2" and _absolute_ref("s3://b/m") == "s3://b/m"
    assert _absolute_ref("./model").startswith("/")
