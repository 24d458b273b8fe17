"""The generate stage: vLLM samples on CPU, lexicon rewards, pairing, reproducibility, reuse downstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_ray.rewards import lexicon_sentiment
from pipeline.config import GenerateConfig, PrepareConfig, ReferenceConfig
from pipeline.demo import build_assets
from pipeline.generate import run as generate
from pipeline.prepare import run as prepare
from pipeline.reference import run as reference
from tests.integration.helpers import read_artifact

pytestmark = pytest.mark.usefixtures("ray_local")


def _gen(root: Path, model: Path, name: str, **kw) -> GenerateConfig:
    base = {
        "policy": str(model),
        "prompts": str(root / "pairs"),
        "generations": str(root / name / "generations"),
        "output": str(root / name / "pairs"),
        "n": 4,
        "max_tokens": 12,
        "max_prompts": 24,
        "seed": 7,
        "max_model_len": 128,
        "gpu_memory_utilization": 0.1,
        "temperature": 1.0,
    }
    return GenerateConfig(**{**base, **kw})


def test_generate_pairs_reproducibly_and_feeds_the_reference_stage(tmp_path):
    assets = build_assets(tmp_path / "assets", pairs=60, seed=0)
    model = assets / "model"
    prepare(
        PrepareConfig(
            inputs=[str(assets / "pairs.jsonl")],
            tokenizer=str(model),
            output=str(tmp_path / "pairs"),
            max_length=96,
            max_prompt_length=48,
            eval_fraction=0.0,
        )
    )
    a_cfg = _gen(tmp_path, model, "a")
    m = generate(a_cfg)
    gens = read_artifact(a_cfg.generations).to_pylist()
    assert len(gens) == 24 * 4
    # Rewards are the lexicon score of each completion's text (recomputed here).
    assert [g["reward"] for g in gens] == pytest.approx(
        lexicon_sentiment([g["prompt"] for g in gens], [g["completion"] for g in gens])
    )
    by_prompt: dict[str, dict[str, float]] = {}
    for g in gens:
        by_prompt.setdefault(g["prompt"], {})[g["completion"]] = g["reward"]
        assert g["finish_reason"] in ("stop", "length") and len(g["completion_ids"]) >= 1
        assert g["policy_logp"] < 0
    pairs = read_artifact(a_cfg.output).to_pylist()
    assert m.rows == len(pairs) == 24 - m.stats["ties_dropped"] - m.stats["identical_dropped"]
    for p in pairs:
        assert by_prompt[p["prompt"]][p["chosen"]] > by_prompt[p["prompt"]][p["rejected"]]
    # Per-prompt seeds: a second run samples exactly the same completions.
    b_cfg = _gen(tmp_path, model, "b")
    generate(b_cfg)
    key = ("prompt_id", "sample_index")
    a = sorted(((g[key[0]], g[key[1]]), g["completion_ids"]) for g in gens)
    b = sorted(((g[key[0]], g[key[1]]), g["completion_ids"]) for g in read_artifact(b_cfg.generations).to_pylist())
    assert a == b
    # The generated pairs are an ordinary `pairs` artifact: the reference stage takes them unchanged.
    scored = reference(
        ReferenceConfig(
            model=str(model), pairs=a_cfg.output, output=str(tmp_path / "scored"), backend="hf", max_model_len=128
        )
    )
    assert scored.rows == len(pairs)
