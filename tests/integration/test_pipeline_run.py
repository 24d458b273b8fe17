"""`python -m pipeline run` on a reduced demo config: prepare → reference (vLLM) → train, then a no-op rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main

pytestmark = pytest.mark.usefixtures("ray_local")

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "demo.yaml"


def test_demo_pipeline_runs_end_to_end_and_reruns_as_noop(tmp_path, capsys):
    cfg = yaml.safe_load(DEMO.read_text())
    run_dir = tmp_path / "demo"
    cfg["run_dir"] = str(run_dir)
    cfg["demo"].update(assets=str(run_dir / "assets"), pairs=160)
    cfg["prepare"].update(inputs=[str(run_dir / "assets" / "pairs.jsonl")], tokenizer=str(run_dir / "assets" / "model"))
    cfg["reference"]["model"] = str(run_dir / "assets" / "model")
    cfg["train"].update(model=str(run_dir / "assets" / "model"), max_steps=3, batch_size=8, eval_every=3)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for stage, kind in (("pairs", "pairs"), ("scored", "scored"), ("export", "model")):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["kind"] == kind
    scored = json.loads((run_dir / "scored" / "manifest.json").read_text())
    assert scored["stats"]["parity"]["token_max_abs"] <= 1e-4
    history = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3] and abs(history[0]["loss"] - 0.693147) < 1e-3
    assert "run: done" in out

    assert main(["run", "--config", str(path)]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped") == 3, again
