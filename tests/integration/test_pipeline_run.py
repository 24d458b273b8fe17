"""`python -m pipeline run` on a reduced version of the demo (the sentiment experiment in miniature):
SFT'd tiny πref → on-policy samples → lexicon reward → best-vs-worst pairs → reference (vLLM) → DPO →
evaluate. The policy's reward must rise clearly above πref's; a rerun is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import main

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.pipeline]

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "demo.yaml"


def reduced_demo(tmp_path: Path) -> tuple[Path, Path]:
    cfg = yaml.safe_load(DEMO.read_text())
    run_dir = tmp_path / "demo"
    model = str(run_dir / "assets" / "model")
    cfg.update(run_dir=str(run_dir), rounds=1, beta_sweep=[])
    cfg["demo"].update(assets=str(run_dir / "assets"), pairs=400)
    cfg["prepare"].update(inputs=[str(run_dir / "assets" / "pairs.jsonl")], tokenizer=model)
    cfg["generate"].update(policy=model, max_prompts=160)
    cfg["reference"]["model"] = model
    cfg["train"].update(model=model, batch_size=16, eval_every=5)
    cfg["evaluate"].update(reference=model, max_prompts=40, n=2)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def test_reduced_demo_improves_the_reward_and_reruns_as_noop(tmp_path, capsys):
    path, run_dir = reduced_demo(tmp_path)
    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for stage, kind in (("pairs", "pairs"), ("generated_pairs", "pairs"), ("scored", "scored"), ("export", "model")):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["kind"] == kind
    scored = json.loads((run_dir / "scored" / "manifest.json").read_text())
    assert scored["stats"]["parity"]["token_max_abs"] <= 1e-4
    history = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    # πθ == πref at step 1: DPO's margins are 0 and its part of the loss is ln 2; the demo's NLL term on the
    # chosen (loss [sigmoid, sft]) adds the chosen completions' mean NLL per token, > 0.
    # Bound: the parity gate's 1e-4 per token (vLLM's vs the policy's log-probs) x at most 24 completion tokens
    # x 2 completions x β 0.1 = 4.8e-4.
    assert history[0]["step"] == 1 and abs(history[0]["rewards/margins"]) < 5e-4
    assert history[0]["loss"] > 0.693147 + 0.1

    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    policy, ref = ev["policy"], ev["reference"]
    assert policy["reward_mean"] > ref["reward_mean"] + 0.2, ev
    assert policy["positive_fraction"] > ref["positive_fraction"] + 0.2, ev
    assert ev["kl"] > 0 and ev["win_rate"] > 0.5
    summary = (run_dir / "summary.md").read_text()
    assert "| πref |" in summary and "| round 0 | 0.1 | 0 |" in summary
    # The run's own verdicts: its training-health guards stayed quiet and its evaluation gate passed.
    assert not [k for h in history for k in h if k.startswith("health/alarm/")] and "health: " not in out
    assert "GATE FAILED" not in summary and summary.rstrip().endswith("| passed |"), summary
    assert (run_dir / "reward_vs_kl.png").stat().st_size > 0 and "run: done" in out

    assert main(["run", "--config", str(path)]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped") == 5, again  # prepare, generate, reference, train, evaluate


def test_a_reference_free_loss_runs_without_the_reference_stage(tmp_path, capsys):
    """SimPO on the reduced demo: no reference stage (nothing scored with vLLM, no `scored` artifact), train
    reads the generated pairs, and the policy's reward still rises clearly above πref's."""
    path, run_dir = reduced_demo(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["loss"] = {"name": "simpo", "beta": 2.0, "simpo_gamma": 1.0}
    # The demo's KL budget (10 nats) is for its own loss; SimPO here moves ~13 nats. This test is about the
    # stages a reference-free loss runs, so its gate keeps the reward test and drops the budget.
    cfg["gate"]["max_kl"] = None
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reference:" not in out and not (run_dir / "scored").exists()
    assert "reference-free (no reference log-probs)" in out
    train = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert train["stats"]["scored_path"] == str(run_dir / "generated_pairs")
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert ev["policy"]["reward_mean"] > ev["reference"]["reward_mean"] + 0.2, ev
    assert ev["preference"]["pairs"] > 0 and ev["preference"]["accuracy"] > 0.5, ev
    assert ev["preference"]["implicit_reward"] == "mean_logp" and "preference accuracy (mean log-prob)" in out


def test_kto_on_the_reduced_demo_split_into_unpaired_rows(tmp_path, capsys):
    """KTO through every stage: generate splits its best-vs-worst pairs into desirable and undesirable rows with
    KL completions, reference scores both sequences of every row, train starts at πref (the step-0 check: every
    reward 0 and the loss ½ with equal weights) and the policy's reward rises clearly above πref's within the
    gate's KL budget; every row is accounted for."""
    path, run_dir = reduced_demo(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["loss"] = {"name": "kto", "beta": 0.5}  # the KTO demo's setting (README)
    cfg["generate"]["unpaired"] = "pairs"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    generated = json.loads((run_dir / "generated_pairs" / "manifest.json").read_text())
    scored = json.loads((run_dir / "scored" / "manifest.json").read_text())
    assert generated["kind"] == "unpaired" and scored["kind"] == "scored_unpaired"
    labels = generated["stats"]["labels"]
    assert labels["desirable"] == labels["undesirable"] and generated["rows"] == 2 * labels["desirable"]
    assert (
        scored["stats"]["rows_in"]
        == generated["rows"]
        == scored["stats"]["rows_out"] + scored["stats"]["rows_rejected"]
    )
    assert scored["stats"]["parity"]["token_max_abs"] <= 1e-4
    history = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    first = history[0]
    # Bound: the parity gate's 1e-4 per token x at most 24 completion tokens x β 0.5 = 1.2e-3 on a reward; the
    # loss's slope in a reward is 1/4.
    assert abs(first["rewards/chosen"]) < 1.2e-3 and abs(first["rewards/rejected"]) < 1.2e-3
    assert first["loss"] == pytest.approx(0.5, abs=1e-3) and "kto/z0" in first and "eval/loss" in history[-1]
    assert "unpaired rows" in out and "rewards/accuracies" not in first
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert ev["policy"]["reward_mean"] > ev["reference"]["reward_mean"] + 0.2, ev
    assert ev["preference"]["implicit_reward"] == "label_sign" and ev["preference"]["accuracy"] > 0.5, ev
    summary = (run_dir / "summary.md").read_text()
    assert "GATE FAILED" not in summary and summary.rstrip().endswith("| passed |"), summary
