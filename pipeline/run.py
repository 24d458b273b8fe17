"""run: the stages in order, for `rounds` rounds, each stage skipped when its artifact is complete.

Round 0: prepare → [generate from generate.policy, if on_policy_first_round] → reference → train → evaluate.
Round r >= 1 (artifacts under <run_dir>/round-<r>/): generate from round r−1's exported policy on the same
prompts → reference (the initial model, or the previous policy with round_reference: previous) → train
(starting from the previous policy) → evaluate (against the configured reference). A stopped run
restarted with the same command resumes at the first incomplete stage. With a `demo:` section, the demo's
data and tiny model are generated first (once, under demo.assets).

beta_sweep: after the rounds, round 0's scored pairs are trained again with each listed β (under
<run_dir>/beta-<β>/) and evaluated. With an `evaluate:` section the run ends with a summary (table of
reward and KL per round and β, reward-vs-KL plot; see pipeline.summary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.summary import EvalPoint, summarize

logger = logging.getLogger(__name__)

__all__ = ["round_stages", "run", "sweep_stages"]

Stage = tuple[str, Any, Callable[[Any], Any]]


def round_stages(cfg: PipelineConfig, r: int, previous_export: str | None) -> list[Stage]:
    """The stage configs of round r (paths of rounds >= 1 under <run_dir>/round-<r>)."""
    from pipeline import evaluate, generate, prepare, reference, train

    stages: list[Stage] = []
    gen, ref, trn, ev = cfg.generate, cfg.reference, cfg.train, cfg.evaluate
    if r == 0:
        if cfg.prepare is not None:
            stages.append(("prepare", cfg.prepare, prepare.run))
        if cfg.on_policy_first_round and gen is not None and ref is not None:
            stages.append(("generate", gen, generate.run))
            ref = ref.model_copy(update={"pairs": gen.output})
    else:
        assert gen is not None and ref is not None and trn is not None and previous_export is not None
        d = f"{cfg.run_dir}/round-{r}"
        gen = gen.model_copy(
            update={"policy": previous_export, "generations": f"{d}/generations", "output": f"{d}/generated_pairs"}
        )
        stages.append(("generate", gen, generate.run))
        ref_model = ref.model if cfg.round_reference == "initial" else previous_export
        ref = ref.model_copy(update={"model": ref_model, "pairs": gen.output, "output": f"{d}/scored"})
        trn = trn.model_copy(
            update={
                "model": previous_export,
                "scored": ref.output,
                "output": f"{d}/train",
                "export": f"{d}/export",
                "storage_path": f"{d}/checkpoints",
            }
        )
        if ev is not None:
            ev = ev.model_copy(
                update={"policy": trn.export, "scored": ref.output, "train_metrics": trn.output, "output": f"{d}/eval"}
            )
    stages += [
        (n, c, f)
        for n, c, f in (("reference", ref, reference.run), ("train", trn, train.run), ("evaluate", ev, evaluate.run))
        if c is not None
    ]
    return stages


def _eval_dir(cfg: PipelineConfig, r: int) -> str:
    assert cfg.evaluate is not None
    return cfg.evaluate.output if r == 0 else f"{cfg.run_dir}/round-{r}/eval"


def sweep_stages(cfg: PipelineConfig, beta: float) -> list[Stage]:
    """Train round 0's scored pairs with another β (under <run_dir>/beta-<β>/) and evaluate that policy."""
    from pipeline import evaluate, train

    assert cfg.train is not None and cfg.evaluate is not None
    d = f"{cfg.run_dir}/beta-{beta:g}"
    trn = cfg.train.model_copy(
        update={"beta": beta, "output": f"{d}/train", "export": f"{d}/export", "storage_path": f"{d}/checkpoints"}
    )
    ev = cfg.evaluate.model_copy(
        update={"policy": trn.export, "scored": trn.scored, "train_metrics": trn.output, "output": f"{d}/eval"}
    )
    return [("train", trn, train.run), ("evaluate", ev, evaluate.run)]


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every configured stage of every round in order; returns {"round-r/stage": result}."""
    if cfg.demo is not None:
        from pipeline.demo import build_assets

        build_assets(cfg.demo.assets, cfg.demo.pairs, cfg.demo.seed, cfg.demo.model, sft_steps=cfg.demo.sft_steps)
    results: dict[str, Any] = {}
    timings = []
    previous_export: str | None = None
    for r in range(cfg.rounds):
        for name, stage_cfg, fn in round_stages(cfg, r, previous_export):
            t0 = time.perf_counter()
            results[f"round-{r}/{name}"] = fn(stage_cfg)
            timings.append(f"{name}[{r}] {time.perf_counter() - t0:.0f}s")
            if name == "train":
                previous_export = stage_cfg.export
    points = []
    if cfg.evaluate is not None and cfg.train is not None:
        points = [EvalPoint(f"round {r}", cfg.train.beta, r, _eval_dir(cfg, r)) for r in range(cfg.rounds)]
    for beta in dict.fromkeys(cfg.beta_sweep):
        if cfg.train is not None and beta == cfg.train.beta:
            continue  # the main run is that point
        for name, stage_cfg, fn in sweep_stages(cfg, beta):
            t0 = time.perf_counter()
            results[f"beta-{beta:g}/{name}"] = fn(stage_cfg)
            timings.append(f"{name}[β={beta:g}] {time.perf_counter() - t0:.0f}s")
        points.append(EvalPoint(f"β={beta:g}", beta, 0, f"{cfg.run_dir}/beta-{beta:g}/eval"))
    if points:
        results["summary"] = summarize(points, cfg.run_dir)
    print("run: done (" + ", ".join(timings) + f") -> {cfg.run_dir}", flush=True)
    return results
