"""The generate stage: vLLM samples on CPU, lexicon rewards, pairing, reproducibility, reuse downstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_ray.models.rewards import lexicon_sentiment
from pipeline.cli.demo import build_assets
from pipeline.config import GenerateConfig, ReferenceConfig
from pipeline.stages.generate import run as generate
from pipeline.stages.reference import run as reference
from tests.integration.helpers import prepare_pairs, read_artifact

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
    prepare_pairs(assets / "pairs.jsonl", model, tmp_path / "pairs", eval_fraction=0.0)
    a_cfg = _gen(tmp_path, model, "a", prompts_per_unit=5)  # 5 units
    m = generate(a_cfg)
    assert m.stats["units"] == m.stats["units_generated_this_run"] == 5
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
    # Units are the resume granularity: a run interrupted after three units generates only the other two, and
    # the artifacts equal the uninterrupted run's. Per-prompt seeds: the regenerated units (sampled in other
    # engine batches) hold exactly the same completions.
    before = {p["pair_id"] for p in pairs}
    for uri in (a_cfg.output, a_cfg.generations):
        (Path(uri) / "manifest.json").unlink()
        for name in ("part-00001.parquet", "part-00004.parquet"):
            (Path(uri) / name).unlink(missing_ok=uri == a_cfg.generations)
    resumed = generate(a_cfg)
    assert resumed.stats["units_generated_this_run"] == 2
    assert {p["pair_id"] for p in read_artifact(a_cfg.output).to_pylist()} == before
    key = ("prompt_id", "sample_index")
    again = sorted(((g[key[0]], g[key[1]]), g["completion_ids"]) for g in read_artifact(a_cfg.generations).to_pylist())
    assert again == sorted(((g[key[0]], g[key[1]]), g["completion_ids"]) for g in gens)
    assert {k: resumed.stats[k] for k in ("ties_dropped", "samples", "reward_mean")} == {
        k: m.stats[k] for k in ("ties_dropped", "samples", "reward_mean")
    }
    # The generated pairs are an ordinary `pairs` artifact: the reference stage takes them unchanged.
    scored = reference(
        ReferenceConfig(
            model=str(model), pairs=a_cfg.output, output=str(tmp_path / "scored"), backend="hf", max_model_len=128
        )
    )
    assert scored.rows == len(pairs)
