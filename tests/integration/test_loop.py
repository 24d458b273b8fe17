"""The on-policy loop: two rounds, then a run stopped inside round 1 resumes at the first incomplete stage."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import load_config
from pipeline.run import run
from pipeline.status import collect as status_rows

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.pipeline]


def test_two_rounds_and_resume_after_a_stop_between_stages(tmp_path, capsys):
    d = tmp_path / "loop"
    assets = d / "assets"
    cfg = {
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
        "train": {"model": str(assets / "model"), "num_workers": 0, "batch_size": 8, "max_steps": 2, "lr": 1e-3},
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
    from pipeline.__main__ import main

    assert main(["status", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "7/7 stage outputs complete" in printed, printed
    rows = {r["label"]: r for r in status_rows(load_config(path))}
    assert rows["round-0/reference"]["lineage"]["pairs"] == "round-0/prepare"
    assert rows["round-0/train"]["lineage"] == {"scored": "round-0/reference"}
    assert rows["round-1/generations"]["lineage"]["model"] == "round-0/train"  # sampled by round 0's policy
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
