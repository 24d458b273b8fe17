"""The on-policy loop: two rounds, then a run stopped inside round 1 resumes at the first incomplete stage."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.cli.run import run
from pipeline.cli.status import collect as status_rows
from pipeline.config import load_config

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.pipeline]


def _config(d) -> dict:
    """Two rounds on the demo's tiny assets under `d`: hf reference, 2 train steps, on-policy round 1."""
    assets = d / "assets"
    return {
        "run_dir": str(d),
        "rounds": 2,
        "demo": {"assets": str(assets), "pairs": 60},
        "prepare": {
            "inputs": [str(assets / "pairs.jsonl")],
            "tokenizer": str(assets / "model"),
            "max_length": 96,
            "max_prompt_length": 48,
            "eval_fraction": 0.0,
        },
        "reference": {"model": str(assets / "model"), "backend": "hf", "max_model_len": 128},
        "train": {
            "model": str(assets / "model"),
            "workers": {"count": 0},
            "batch_size": 8,
            "max_steps": 2,
            "optim": {"lr": 1e-3},
        },
        "generate": {
            "policy": str(assets / "model"),
            "n": 4,
            "max_tokens": 8,
            "max_prompts": 16,
            "reward": "length",
            "max_model_len": 128,
            "gpu_memory_utilization": 0.1,
        },
    }


def test_two_rounds_and_resume_after_a_stop_between_stages(tmp_path, capsys):
    d = tmp_path / "loop"
    assets = d / "assets"
    cfg = _config(d)
    path = tmp_path / "loop.yaml"
    path.write_text(json.dumps(cfg))
    results = run(load_config(path))
    assert list(results) == [
        "round-0/prepare",
        "round-0/reference",
        "round-0/train",
        "round-1/generate",
        "round-1/reference",
        "round-1/train",
    ]
    round1 = json.loads((d / "round-1" / "export" / "manifest.json").read_text())
    assert round1["config"]["model"] == str(d / "export")  # round 1 starts from round 0's policy
    gen = json.loads((d / "round-1" / "generated_pairs" / "manifest.json").read_text())
    assert gen["stats"]["lineage"]["policy"] == str(d / "export") and gen["rows"] > 0
    capsys.readouterr()

    # status: every output complete, lineage resolved to the artifacts and models of this run.
    from pipeline.cli.main import main

    assert main(["status", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "7/7 stage outputs complete" in printed, printed
    rows = {r["label"]: r for r in status_rows(load_config(path))}
    assert rows["round-0/reference"]["lineage"]["pairs"] == "round-0/prepare"
    assert rows["round-0/train"]["lineage"] == {"scored": "round-0/reference", "model": f"model {assets / 'model'}"}
    assert rows["round-1/generations"]["lineage"]["model"] == "round-0/train"  # sampled by round 0's policy
    assert rows["round-1/generate"]["lineage"]["policy"] == "round-0/train"
    assert rows["round-1/reference"]["lineage"]["pairs"] == "round-1/generate"
    assert rows["round-1/train"]["rows"] == 0 and rows["round-1/train"]["kind"] == "model"

    # Stop "between stages" of round 1: its scored artifact lost its manifest and the train stage never ran.
    (d / "round-1" / "scored" / "manifest.json").unlink()
    shutil.rmtree(d / "round-1" / "export")
    states = {r["label"]: r["state"] for r in status_rows(load_config(path))}
    assert (states["round-1/reference"], states["round-1/train"]) == ("incomplete", "absent")
    run(load_config(path))
    out = capsys.readouterr().out
    assert out.count("skipped") == 4  # prepare, reference and train of round 0; generate of round 1
    assert (d / "round-1" / "export" / "manifest.json").exists()

    # An unchanged rerun skips every stage.
    run(load_config(path))
    assert capsys.readouterr().out.count("skipped") == 6

    # Another lr and run name: round 0's train is redone, and so is every stage of round 1, since each reads
    # round 0's export (generate samples from it, its pairs are scored, train starts from it).
    # Failed before models entered a stage's identity by fingerprint: round 1's generate and reference were
    # skipped ("complete for this config and these inputs") and round 1 trained on the old policy's samples.
    cfg["train"] |= {"optim": {"lr": 2e-3}, "run_name": "b"}
    path.write_text(json.dumps(cfg))
    stale = {r["label"]: r.get("why") for r in status_rows(load_config(path)) if r["state"] == "stale"}
    keys = ["config key optim.lr changed", "config key run_name changed"]

    def redone(label: str) -> str:
        return f"it reads {label} (stale), which `run` redoes first"

    assert stale == {  # status names every stage `run` redoes, and why
        "round-0/train": keys,
        "round-1/generations": [redone("round-0/train")],
        "round-1/generate": [redone("round-0/train")],
        "round-1/reference": [redone("round-1/generate")],
        "round-1/train": [*keys, redone("round-1/reference"), redone("round-0/train")],
    }
    old_export = json.loads((d / "export" / "manifest.json").read_text())["fingerprints"]["model"]
    run(load_config(path))
    out = capsys.readouterr().out
    assert out.count("skipped") == 2, out  # prepare and reference of round 0
    new_export = json.loads((d / "export" / "manifest.json").read_text())["fingerprints"]["model"]
    trained = json.loads((d / "round-1" / "export" / "manifest.json").read_text())
    assert trained["upstream"]["model:model"] == new_export and trained["config"]["optim"]["lr"] == 2e-3
    gen = json.loads((d / "round-1" / "generated_pairs" / "manifest.json").read_text())
    assert gen["upstream"]["model:policy"] == new_export != old_export

    # round 0's export edited in place: status names what changed and where it came from, and `run` redoes
    # every stage that read it (and nothing else).
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / "export" / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(d / "export" / "model.safetensors"), {"format": "pt"})
    stale = {r["label"]: r.get("why") for r in status_rows(load_config(path)) if r["state"] == "stale"}
    changed = ["policy model of round-0/train changed since this artifact was written"]
    assert stale == {
        "round-1/generations": changed,
        "round-1/generate": changed,
        "round-1/reference": [redone("round-1/generate")],
        "round-1/train": [
            "model of round-0/train changed since this artifact was written",
            redone("round-1/reference"),
        ],
    }
    assert main(["status", "--config", str(path)]) == 0
    assert "stale: policy model of round-0/train changed since this artifact was written" in capsys.readouterr().out
    run(load_config(path))
    assert capsys.readouterr().out.count("skipped") == 3  # prepare, reference and train of round 0


def test_a_failed_gate_stops_the_loop_before_the_next_round(tmp_path, capsys):
    """A reward test no policy passes (a gain above 1e6 standard errors): round 0's evaluation fails the gate,
    round 1 is not built on its policy, `run` exits with status 4 after the summary, and the failure opens the
    summary, the report and `status`."""
    from pipeline.cli.main import main

    d = tmp_path / "gated"
    assets = d / "assets"
    cfg = _config(d)
    cfg["gate"] = {"reward_se": 1e6}
    cfg["prepare"]["eval_fraction"] = 0.3
    cfg["train"]["optim"] = {"lr": 1e-6}
    cfg["generate"] |= {"n": 2, "max_prompts": 8}
    cfg["evaluate"] = {
        "reference": str(assets / "model"),
        "max_prompts": 8,
        "max_eval_pairs": 0,
        "max_tokens": 8,
        "reward": "length",
        "max_model_len": 128,
        "gpu_memory_utilization": 0.1,
    }
    path = tmp_path / "gated.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["run", "--config", str(path)]) == 4
    captured = capsys.readouterr()
    assert "round 0's policy FAILED the gate" in captured.out + captured.err
    assert "run: round-1/generate not run" in captured.out
    assert not (d / "round-1").exists()  # nothing of round 1 was built
    summary = (d / "summary.md").read_text()
    assert summary.startswith("**GATE FAILED** round 0: FAILED: the reward gain over the reference")
    assert "GATE FAILED</b> round 0" in (d / "report.html").read_text()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the evaluation gate failed (round 0:" in errors[0] and "gate.on_fail" in errors[0]
    rows = {r["label"]: r for r in status_rows(load_config(path))}
    assert rows["round-0/evaluate"]["gate"].startswith("FAILED")
