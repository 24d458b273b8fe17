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

from pipeline.cli.summary import EvalPoint, summarize
from pipeline.config import PipelineConfig
from pipeline.core import console, units
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
    with units.sharing():  # vLLM actors (engines loaded) carry over to the next stage with the same engine
        for planned in stages:
            console.log_file(planned.label.replace("/", "-"))
            if planned.stage not in VLLM_STAGES:
                units.release()  # train (or prepare) gets the whole cluster
            t0 = time.perf_counter()
            results[planned.label] = importlib.import_module(stage_module(planned.stage)).run(planned.config)
            where = f"β={planned.beta:g}" if planned.group.startswith("β") else str(planned.round)
            timings.append(f"{planned.stage}[{where}] {time.perf_counter() - t0:.0f}s")
    points = [
        EvalPoint(p.group, p.beta if p.beta is not None else 0.0, p.round, p.output)
        for p in stages
        if p.stage == "evaluate" and cfg.train is not None
    ]
    if points:
        results["summary"] = summarize(points, cfg.run_dir, _summary_tracking(cfg, stages))
    console.result("run: done (" + ", ".join(timings) + f") -> {cfg.run_dir}")
    return results


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
