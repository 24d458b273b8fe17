"""pipeline.plan: the one walk of rounds and the β sweep that run, status and the summary share."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.plan import plan

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "demo.yaml"


def test_the_demo_plan_chains_rounds_and_the_sweep(tmp_path):
    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "beta_sweep=[0.05, 0.1, 0.5]"])
    stages = plan(cfg)
    assert [p.label for p in stages] == [
        "round-0/prepare",
        "round-0/generate",
        "round-0/reference",
        "round-0/train",
        "round-1/generate",
        "round-1/reference",
        "round-1/train",
        "beta-0.05/train",
        "beta-0.5/train",
        "round-0/evaluate",
        "round-1/evaluate",
        "beta-0.05/evaluate",
        "beta-0.5/evaluate",
    ]  # β = 0.1 is train.beta: the main run is that point; evaluations last (they share the reference's engine)
    by = {p.label: p for p in stages}
    r0, r1 = by["round-0/train"].config, by["round-1/train"].config
    assert by["round-0/reference"].config.pairs == by["round-0/generate"].config.output  # on-policy first round
    assert by["round-1/generate"].config.policy == r0.export == r1.model
    assert by["round-1/reference"].config.model == r0.export  # round_reference: previous
    assert r1.scored == by["round-1/reference"].config.output and r1.export.endswith("round-1/export")
    assert by["round-1/evaluate"].config.policy == r1.export
    sweep = by["beta-0.5/train"].config
    assert sweep.beta == 0.5 and sweep.scored == r0.scored and sweep.export.endswith("beta-0.5/export")
    assert by["beta-0.5/evaluate"].config.policy == sweep.export
    assert by["round-0/generate"].outputs == (cfg.generate.generations, cfg.generate.output)
    assert [(p.group, p.beta, p.round) for p in stages if p.stage == "evaluate"] == [
        ("round 0", 0.1, 0),
        ("round 1", 0.1, 1),
        ("β=0.05", 0.05, 0),
        ("β=0.5", 0.5, 0),
    ]


def test_status_reads_the_plan(tmp_path):
    from pipeline.status import collect

    cfg = load_config(DEMO, [f"run_dir={tmp_path}"])
    rows = collect(cfg)
    labels = [r["label"] for r in rows]
    assert labels[:3] == ["round-0/prepare", "round-0/generations", "round-0/generate"]
    assert len(labels) == len(plan(cfg)) + sum(p.stage == "generate" for p in plan(cfg))
    assert {r["state"] for r in rows} == {"absent"}
