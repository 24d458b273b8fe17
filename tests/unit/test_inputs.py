"""pipeline.core.inputs: a stage's identity covers every model, tokenizer and reward it reads, by content.

Each case failed before models entered the identity by fingerprint: the identity named them by path only."""

from __future__ import annotations

import shutil

import pyarrow as pa

from dpo_ray.data import artifacts
from pipeline.config import GenerateConfig
from pipeline.core.inputs import changes, known_inputs, stage_inputs


def _prompts(tmp_path) -> str:
    uri = str(tmp_path / "prompts")
    artifacts.write_table(pa.table({"prompt": ["p"]}), uri, "part-00000.parquet")
    artifacts.write_manifest(uri, "pairs", {}, {"tokenizer": "t"}, {}, {})
    return uri


def _edit_weights(model_dir) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(str(path)).items()}, str(path), {"format": "pt"})


def test_models_tokenizers_and_rewards_are_read_by_content(tiny_model_dir, tmp_path, monkeypatch):
    policy, judge = tmp_path / "policy", tmp_path / "judge"
    shutil.copytree(tiny_model_dir, policy)
    shutil.copytree(tiny_model_dir, judge)
    (tmp_path / "my_reward.py").write_text("def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = _prompts(tmp_path)
    by_model = GenerateConfig(policy=str(policy), prompts=prompts, reward=f"model:{judge}")
    by_code = GenerateConfig(policy=str(policy), prompts=prompts, reward="my_reward:score")

    before, code_before = stage_inputs("generate", by_model), stage_inputs("generate", by_code)
    assert set(before) == {"prompts", "model:policy", "tokenizer:policy", "model:reward", "tokenizer:reward", "split"}
    assert set(code_before) == {"prompts", "model:policy", "tokenizer:policy", "code:reward", "split"}
    assert stage_inputs("generate", by_model) == before  # unchanged inputs: the same identity

    _edit_weights(policy)  # the policy edited in place (a retrained export at the same path)
    after = stage_inputs("generate", by_model)
    assert after["model:policy"] != before["model:policy"] and after["model:reward"] == before["model:reward"]
    assert changes(before, known_inputs("generate", by_model), {"model:policy": "round-0/train"}) == [
        "policy model of round-0/train changed since this artifact was written"
    ]
    _edit_weights(judge)
    assert stage_inputs("generate", by_model)["model:reward"] != before["model:reward"]

    tok = policy / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace('"<pad>"', '"</s>"', 1))  # the tokenizer edited in place
    assert stage_inputs("generate", by_model)["tokenizer:policy"] != before["tokenizer:policy"]

    (tmp_path / "my_reward.py").write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    assert stage_inputs("generate", by_code)["code:reward"] != code_before["code:reward"]


def test_status_compares_only_what_it_can_read_without_fetching(tiny_model_dir, tmp_path):
    """A hub id or URI model and an incomplete upstream are unknown to status (None), never fetched."""
    cfg = GenerateConfig(policy="s3://bucket/model", prompts=str(tmp_path / "absent"))
    known = known_inputs("generate", cfg)
    assert known == {"prompts": None, "model:policy": None, "tokenizer:policy": None, "split": "prompt-sha256"}
    assert changes({"prompts": "a", "model:policy": "b", "split": "prompt-sha256"}, known, {}) == []
    # an artifact split by the older per-pair rule (no "split" recorded) is stale
    assert changes({"prompts": "a"}, known, {}) == [
        "split was not recorded when this artifact was written (an older dpo-ray)"
    ]
