"""run: the stages of plan(cfg) in order (every round, then the β sweep), each skipped when its artifact
is complete, so a stopped run restarted with the same command resumes at the first incomplete stage. The
vLLM stages' actors are shared between stages that use the same engine (pipeline.core.units.sharing). With
a `demo:` section, the demo's data and tiny model are generated first (once, under demo.assets). With an
`evaluate:` section the run ends with a summary (table of reward and KL per round and β, reward-vs-KL plot;
see pipeline.cli.summary). What runs when is pipeline.core.plan's.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from dpo_ray.objective.health import REMEDIES
from pipeline.cli.summary import EvalPoint, summarize
from pipeline.config import PipelineConfig
from pipeline.core import console, units
from pipeline.core.gate import GateFailed, Verdict, gated, judge
from pipeline.core.plan import plan

logger = logging.getLogger(__name__)

__all__ = ["run", "stage_module"]

VLLM_STAGES = ("generate", "reference", "evaluate")  # the stages whose pool actors can be shared


def stage_module(stage: str) -> str:
    """The module whose `run(cfg)` a planned stage calls."""
    return f"pipeline.stages.{stage}"


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every planned stage in order; returns {label: result} (labels as in pipeline.core.plan)."""
    if cfg.demo is not None:
        from pipeline.cli.demo import build_assets

        console.log_file("demo-assets")
        build_assets(cfg.demo.assets, cfg.demo.pairs, cfg.demo.seed, cfg.demo.model, sft_steps=cfg.demo.sft_steps)
    results: dict[str, Any] = {}
    timings = []
    stages = plan(cfg)
    failed: dict[int, Verdict] = {}  # round → its failed gate verdict
    skipped: set[str] = set()
    with units.sharing():  # vLLM actors (engines loaded) carry over to the next stage with the same engine
        for planned in stages:
            if _builds_on_failed(planned, failed, cfg):
                console.result(f"run: {planned.label} not run: round {min(failed)}'s policy failed the gate")
                skipped.add(planned.label)
                continue
            console.log_file(planned.label.replace("/", "-"))
            if planned.stage not in VLLM_STAGES:
                units.release()  # train (or prepare) gets the whole cluster
            t0 = time.perf_counter()
            results[planned.label] = importlib.import_module(stage_module(planned.stage)).run(planned.config)
            where = f"β={planned.beta:g}" if planned.group.startswith("β") else str(planned.round)
            timings.append(f"{planned.stage}[{where}] {time.perf_counter() - t0:.0f}s")
            if planned.stage == "evaluate" and planned.group.startswith("round") and gated(cfg.gate):
                verdict = judge(results[planned.label], cfg.gate)
                if not verdict.passed:
                    failed[planned.round] = verdict
                    console.error(f"run: round {planned.round}'s policy FAILED the gate: {verdict.line()}")
    points = [
        EvalPoint(p.group, p.beta if p.beta is not None else 0.0, p.round, p.output)
        for p in stages
        if p.stage == "evaluate" and cfg.train is not None and p.label not in skipped
    ]
    if points:
        results["summary"] = summarize(points, cfg.run_dir, _summary_tracking(cfg, stages), cfg.gate)
    console.result("run: done (" + ", ".join(timings) + f") -> {cfg.run_dir}")
    if failed and cfg.gate.on_fail == "stop":
        rounds = ", ".join(f"round {r}: {v.line()}" for r, v in sorted(failed.items()))
        later = "; no later round was built on a failed policy" if cfg.rounds > 1 else ""
        raise GateFailed(
            f"the evaluation gate failed ({rounds}){later}. Remedies: {REMEDIES}; or gate.on_fail: continue to go "
            "on anyway"
        )
    return results


def _builds_on_failed(planned: Any, failed: dict[int, Verdict], cfg: PipelineConfig) -> bool:
    """A stage of a round after one whose policy failed the gate (with gate.on_fail: stop)."""
    return (
        bool(failed)
        and cfg.gate.on_fail == "stop"
        and planned.group.startswith("round")
        and planned.round > min(failed)
    )


def _summary_tracking(cfg: PipelineConfig, stages: list[Any]) -> Any:
    """Where the summary is tracked: with one evaluated policy, that policy's tracker run (train's and
    evaluate's); with several, a run of its own named <run>/summary."""
    from pipeline.core.trackers import tracking_settings

    evals = [p.config for p in stages if p.stage == "evaluate"]
    if not evals or not evals[0].tracking.report_to:
        return None
    if len(evals) == 1:
        return tracking_settings(evals[0].tracking, key=evals[0].policy)
    name = f"{cfg.run_dir.rstrip('/').split('/')[-1]}/summary"
    return tracking_settings(evals[0].tracking.model_copy(update={"name": name}), key=cfg.run_dir)
