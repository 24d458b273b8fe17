"""The evaluate stage: KL estimate and preference accuracy against direct HF computations, plots written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpo_ray.compute.logps import token_logps
from dpo_ray.models.loading import load_causal_lm
from dpo_ray.models.tiny import build_tiny_llama
from pipeline.cli.demo import build_assets, review_corpus
from pipeline.config import EvaluateConfig, ReferenceConfig
from pipeline.stages.evaluate import run as evaluate
from pipeline.stages.reference import run as reference
from tests.integration.helpers import prepare_pairs, read_artifact

pytestmark = pytest.mark.usefixtures("ray_local")


def _logp(model, prompt_ids, completion_ids) -> float:
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        per_token = token_logps(model(input_ids=ids).logits, ids)[0, len(prompt_ids) :]
    return float(per_token.double().sum())


def test_evaluate_kl_and_accuracy_match_direct_computation(tmp_path, monkeypatch):
    from dpo_ray.train.tracking import missing_backends

    trackers = ["tensorboard", "mlflow", "wandb"]
    trackers = [] if missing_backends(trackers) else trackers
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assets = build_assets(tmp_path / "assets", pairs=80, seed=0)
    ref_dir = assets / "model"
    policy_dir = build_tiny_llama(tmp_path / "policy", review_corpus(), seed=1)  # same tokenizer, other weights
    prepare_pairs(assets / "pairs.jsonl", ref_dir, tmp_path / "pairs", eval_fraction=0.3)
    reference(
        ReferenceConfig(
            model=str(ref_dir), pairs=str(tmp_path / "pairs"), output=str(tmp_path / "scored"), backend="hf"
        )
    )
    metrics = tmp_path / "train"
    metrics.mkdir()
    (metrics / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 0.7 / s, "rewards/accuracies": 0.5, "rewards/margins": 0.1 * s}) + "\n"
            for s in range(1, 5)
        )
    )
    cfg = EvaluateConfig(
        policy=str(policy_dir),
        reference=str(ref_dir),
        prompts=str(tmp_path / "pairs"),
        scored=str(tmp_path / "scored"),
        train_metrics=str(metrics),
        output=str(tmp_path / "eval"),
        max_prompts=12,
        n=2,
        max_tokens=10,
        max_model_len=128,
        gpu_memory_utilization=0.1,
        reward="length",  # characters: wins, losses and ties all occur between two models' samples
        tracking={"report_to": trackers, "dir": str(tmp_path / "tracking"), "name": "policy"},
    )
    result = evaluate(cfg)
    if trackers:  # the numbers and plots, in the policy's tracker run, at the train's last step (4)
        from tests.tracking_readers import mlflow_run, tensorboard_scalars, wandb_offline

        ml = mlflow_run(f"file:{tmp_path / 'tracking' / 'mlruns'}", "dpo-ray", str(policy_dir))
        assert ml["metrics"]["evaluate/kl"] == [(4, pytest.approx(result["kl"]))]
        assert ml["metrics"]["evaluate/win_rate"] == [(4, pytest.approx(result["win_rate"]))]
        assert sorted(ml["artifacts"]) == ["plots/rewards.png", "plots/training_curves.png"]
        tb = tensorboard_scalars(str(tmp_path / "tracking" / "tensorboard" / "policy"))
        assert tb["evaluate/reward_policy"] == [(4, pytest.approx(result["policy"]["reward_mean"]))]
        run_file = next((tmp_path / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
        wb = wandb_offline(str(tmp_path / "tracking"), run_file.stem.removeprefix("run-"))
        assert wb["summary"]["evaluate/kl"] == pytest.approx(result["kl"])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["kl"] == pytest.approx(result["kl"])
    assert {"training_curves.png", "rewards.png"} <= {p.name for p in (tmp_path / "eval").iterdir()}
    assert 0 <= result["win_rate"] <= 1 and result["prompts"] == 12
    # An `eval` artifact like every stage's: the manifest records the evaluation; a rerun is skipped.
    from dpo_ray.data.artifacts import read_manifest

    manifest = read_manifest(str(tmp_path / "eval"))
    assert manifest is not None and manifest.kind == "eval" and manifest.stats["kl"] == pytest.approx(result["kl"])
    models = {f"{kind}:{field}" for kind in ("model", "tokenizer") for field in ("policy", "reference")}
    assert set(manifest.upstream) == {"prompts", "scored"} | models
    assert evaluate(cfg) == manifest.stats

    policy, ref = load_causal_lm(policy_dir), load_causal_lm(ref_dir)
    samples = [json.loads(line) for line in (tmp_path / "eval" / "policy_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24
    references = [json.loads(line) for line in (tmp_path / "eval" / "reference_samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in references] == [s["prompt"] for s in samples]  # the same prompts, in order
    direct = []
    for s in samples:
        lp, lr = _logp(policy, s["prompt_ids"], s["completion_ids"]), _logp(ref, s["prompt_ids"], s["completion_ids"])
        assert s["policy_logp"] == pytest.approx(lp, abs=1e-3)
        assert s["ref_logp"] == pytest.approx(lr, abs=1e-3)
        direct.append(lp - lr)
    assert result["kl"] == pytest.approx(float(np.mean(direct)), abs=1e-3)

    # Rewards, win rate, positive fractions and standard errors, computed here from the samples' texts (the win
    # rate used to be checked only to lie in [0, 1]): the i-th policy sample against the reference's i-th (same
    # prompt), a tie counts half; a prompt's n = 2 samples are one observation for the standard errors.
    pol_w = np.array([float(len(s["completion"])) for s in samples])
    ref_w = np.array([float(len(r["completion"])) for r in references])
    assert [s["reward"] for s in samples] == list(pol_w) and [r["reward"] for r in references] == list(ref_w)
    win = np.where(pol_w > ref_w, 1.0, np.where(pol_w == ref_w, 0.5, 0.0))
    assert 0 < np.mean(win == 1.0) < 1, "samples of two models: some win, some do not"

    def stderr(values):
        means = values.reshape(12, 2).mean(axis=1)
        return means.std(ddof=1) / np.sqrt(12)

    assert result["win_rate"] == pytest.approx(win.mean(), abs=1e-12)
    assert result["win_rate_stderr"] == pytest.approx(stderr(win), rel=1e-9)
    for side, values in (("policy", pol_w), ("reference", ref_w)):
        assert result[side]["reward_mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert result[side]["reward_std"] == pytest.approx(values.std(), rel=1e-9)
        assert result[side]["reward_stderr"] == pytest.approx(stderr(values), rel=1e-9)
        assert result[side]["positive_fraction"] == pytest.approx(np.mean(values > 0), abs=1e-12)
    assert result["kl_stderr"] == pytest.approx(stderr(np.array(direct)), rel=1e-2, abs=1e-3)

    rows = [r for r in read_artifact(tmp_path / "scored").to_pylist() if r["split"] == "eval"]
    margins = [
        (_logp(policy, r["prompt_ids"], r["chosen_ids"]) - _logp(ref, r["prompt_ids"], r["chosen_ids"]))
        - (_logp(policy, r["prompt_ids"], r["rejected_ids"]) - _logp(ref, r["prompt_ids"], r["rejected_ids"]))
        for r in rows
    ]
    assert result["preference"]["pairs"] == len(rows) > 0
    assert result["preference"]["accuracy"] == pytest.approx(float(np.mean(np.array(margins) > 0)))
