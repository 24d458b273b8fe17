"""pipeline.core.plan: the one walk of rounds and the β sweep that run, status and the summary share."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.core.plan import plan

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "demo.yaml"


def test_the_demo_plan_chains_rounds_and_the_sweep(tmp_path):
    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "beta_sweep=[0.05, 0.1, 0.5]"])
    stages = plan(cfg)
    assert [p.label for p in stages] == [
        "round-0/prepare",
        "round-0/generate",
        "round-0/reference",
        "round-0/train",
        "round-0/evaluate",  # the gate judges round 0 before round 1 builds on its policy
        "round-1/generate",
        "round-1/reference",
        "round-1/train",
        "beta-0.05/train",
        "beta-0.5/train",
        "round-1/evaluate",
        "beta-0.05/evaluate",
        "beta-0.5/evaluate",
    ]  # β = 0.1 is train.loss.beta: the main run is that point; evaluations last (they share the reference's engine)
    no_gate = [f"run_dir={tmp_path}", "gate.reward_se=null", "gate.max_kl=null"]
    ungated = [p.label for p in plan(load_config(DEMO, no_gate))]
    assert ungated.index("round-0/evaluate") > ungated.index("round-1/train")  # no gate: every evaluation last
    by = {p.label: p for p in stages}
    r0, r1 = by["round-0/train"].config, by["round-1/train"].config
    assert by["round-0/reference"].config.pairs == by["round-0/generate"].config.output  # on-policy first round
    assert by["round-1/generate"].config.policy == r0.export == r1.model
    assert by["round-1/reference"].config.model == r0.export  # round_reference: previous
    assert r1.scored == by["round-1/reference"].config.output and r1.export.endswith("round-1/export")
    assert by["round-1/evaluate"].config.policy == r1.export
    sweep = by["beta-0.5/train"].config
    assert sweep.loss.beta == 0.5 and sweep.scored == r0.scored and sweep.export.endswith("beta-0.5/export")
    assert by["beta-0.5/evaluate"].config.policy == sweep.export
    assert by["round-0/generate"].outputs == (cfg.generate.generations, cfg.generate.output)
    assert [(p.group, p.beta, p.round) for p in stages if p.stage == "evaluate"] == [
        ("round 0", 0.1, 0),
        ("round 1", 0.1, 1),
        ("β=0.05", 0.05, 0),
        ("β=0.5", 0.5, 0),
    ]


def test_every_planned_stage_has_the_module_run_calls(tmp_path):
    """Failed before: after the stages moved to pipeline/stages/, run still imported pipeline.<stage>."""
    import importlib

    from pipeline.cli.run import stage_module

    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "beta_sweep=[0.5]"])
    for stage in {p.stage for p in plan(cfg)} | {"prepare"}:
        assert callable(importlib.import_module(stage_module(stage)).run), stage


def test_status_reads_the_plan(tmp_path):
    from pipeline.cli.status import collect

    cfg = load_config(DEMO, [f"run_dir={tmp_path}"])
    rows = collect(cfg)
    labels = [r["label"] for r in rows]
    assert labels[:3] == ["round-0/prepare", "round-0/generations", "round-0/generate"]
    assert len(labels) == len(plan(cfg)) + sum(p.stage == "generate" for p in plan(cfg))
    assert {r["state"] for r in rows} == {"absent"}


def test_a_reference_free_loss_has_no_reference_stage(tmp_path):
    """simpo/orpo: train and evaluate read the round's pairs (generate's when it ran, else prepare's); the
    reference section may be left out."""
    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "beta_sweep=[0.5]", "train.loss.name=simpo"])
    by = {p.label: p for p in plan(cfg)}
    assert [p.stage for p in plan(cfg)].count("reference") == 0
    assert by["round-0/train"].config.scored == by["round-0/generate"].config.output
    assert by["round-1/train"].config.scored == by["round-1/generate"].config.output
    assert by["round-1/evaluate"].config.scored == by["round-1/generate"].config.output
    assert by["beta-0.5/train"].config.scored == by["round-0/generate"].config.output
    assert by["beta-0.5/evaluate"].config.scored == by["round-0/generate"].config.output
    off = load_config(
        DEMO,
        [f"run_dir={tmp_path}", "train.loss.name=orpo", "on_policy_first_round=false", "rounds=1", "beta_sweep=[]"],
    )
    stages = plan(off)
    assert [p.stage for p in stages] == ["prepare", "train", "evaluate"]
    assert stages[1].config.scored == stages[0].config.output == f"{tmp_path}/pairs" == stages[2].config.scored


def test_reference_free_defaults_and_a_config_without_reference(tmp_path):
    from pipeline.config import ConfigError

    cfg = load_config(None, [f"run_dir={tmp_path}", "train.model=m", "train.loss.name=simpo", "evaluate.reference=m"])
    assert cfg.train is not None and cfg.train.scored == f"{tmp_path}/pairs"
    assert cfg.evaluate is not None and cfg.evaluate.scored == f"{tmp_path}/pairs"
    assert load_config(None, [f"run_dir={tmp_path}", "train.model=m"]).train.scored == f"{tmp_path}/scored"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="rounds > 1 needs a 'reference:' section"):
        load_config(None, ["rounds=2", "generate.policy=m", "train.model=m"])
