"""plan(cfg): the ordered stages of a run, every round and β-sweep point — the one place that knows them.

Round 0: prepare → [generate from generate.policy, if on_policy_first_round] → reference → train → evaluate.
Round r >= 1 (artifacts under <run_dir>/round-<r>/): generate from round r−1's exported policy on the same
prompts → reference (the initial model, or the previous policy with round_reference: previous) → train
(starting from the previous policy) → evaluate (against the configured reference).
beta_sweep: after the rounds, round 0's scored pairs are trained again with each listed β other than
train.loss.beta (under <run_dir>/beta-<β>/) and evaluated. The evaluate stages run last, in that order, after
every train (same results; back to back they share the reference's vLLM engine).

With a reference-free train.loss (simpo, orpo) there is no reference stage: train and evaluate read the
round's pairs (generate's, else prepare's).

`run` executes the plan, `status` reads each planned stage's outputs, the summary reads the evaluate
stages'. Pure: builds configs, imports no stage module, starts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.core.gate import gated

__all__ = ["PlannedStage", "plan"]


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a run: label ("round-1/train", "beta-0.5/evaluate"), stage name, its resolved config,
    the artifact URIs it writes (generate: the generations, then the pairs), and the policy group it belongs
    to in the summary ("round 1", "β=0.5") with that group's β and round."""

    label: str
    stage: str
    config: Any
    outputs: tuple[str, ...]
    group: str
    beta: float | None
    round: int

    @property
    def output(self) -> str:
        """The artifact the stage's completion is judged by (train: the export)."""
        return self.outputs[-1]


def _outputs(stage: str, c: Any) -> tuple[str, ...]:
    if stage == "generate":
        return (c.generations, c.output)
    return (c.export,) if stage == "train" else (c.output,)


def _round(cfg: PipelineConfig, r: int, previous_export: str | None) -> list[tuple[str, Any]]:
    gen, ref, trn, ev = cfg.generate, cfg.reference, cfg.train, cfg.evaluate
    free = trn is not None and trn.reference_free
    stages: list[tuple[str, Any]] = []
    pairs: str | None = None  # the pairs this round generates
    if r == 0:
        if cfg.prepare is not None:
            stages.append(("prepare", cfg.prepare))
        if cfg.on_policy_first_round and gen is not None and (ref is not None or free):
            stages.append(("generate", gen))
            pairs = gen.output
    else:
        assert gen is not None and trn is not None and previous_export is not None
        d = f"{cfg.run_dir}/round-{r}"
        gen = gen.model_copy(
            update={"policy": previous_export, "generations": f"{d}/generations", "output": f"{d}/generated_pairs"}
        )
        stages.append(("generate", gen))
        pairs = gen.output
        trn = trn.model_copy(
            update={
                "model": previous_export,
                "output": f"{d}/train",
                "export": f"{d}/export",
                "checkpoint": trn.checkpoint.model_copy(update={"storage_path": f"{d}/checkpoints"}),
            }
        )
        if ev is not None:
            ev = ev.model_copy(update={"policy": trn.export, "train_metrics": trn.output, "output": f"{d}/eval"})
    scored = trn.scored if trn is not None else ""
    if free:  # train and evaluate read the pairs; no reference stage
        ref = None
        scored = pairs or (cfg.reference.pairs if cfg.reference is not None else scored)
    elif ref is not None:
        update: dict[str, Any] = {"pairs": pairs} if pairs else {}
        if r > 0:
            ref_model = ref.model if cfg.round_reference == "initial" else previous_export
            update |= {"model": ref_model, "output": f"{cfg.run_dir}/round-{r}/scored"}
        ref = ref.model_copy(update=update)
        scored = ref.output if r > 0 else scored
    if trn is not None and (free or r > 0):
        trn = trn.model_copy(update={"scored": scored})
    if ev is not None and (free or r > 0):
        ev = ev.model_copy(update={"scored": scored})
    return stages + [(n, c) for n, c in (("reference", ref), ("train", trn), ("evaluate", ev)) if c is not None]


def _sweep(cfg: PipelineConfig, beta: float, scored: str) -> list[tuple[str, Any]]:
    """Round 0's training data (`scored`: what round 0's train read) trained with β = `beta`, and evaluated."""
    assert cfg.train is not None and cfg.evaluate is not None
    d = f"{cfg.run_dir}/beta-{beta:g}"
    trn = cfg.train.model_copy(
        update={
            "loss": cfg.train.loss.with_beta(beta),
            "scored": scored,
            "output": f"{d}/train",
            "export": f"{d}/export",
            "checkpoint": cfg.train.checkpoint.model_copy(update={"storage_path": f"{d}/checkpoints"}),
        }
    )
    ev = cfg.evaluate.model_copy(
        update={"policy": trn.export, "scored": trn.scored, "train_metrics": trn.output, "output": f"{d}/eval"}
    )
    return [("train", trn), ("evaluate", ev)]


def _tracked(cfg: PipelineConfig, name: str, c: Any, group: str) -> Any:
    """Train and evaluate of one policy log to one tracker run, named after the run and the group; evaluate
    without its own report_to uses train's trackers."""
    if name not in ("train", "evaluate"):
        return c
    tracking = c.tracking
    if name == "evaluate" and tracking.report_to is None and cfg.train is not None:
        tracking = cfg.train.tracking.model_copy(update={"name": tracking.name})
    run = cfg.run_dir.rstrip("/").split("/")[-1]
    return c.model_copy(update={"tracking": tracking.model_copy(update={"name": tracking.name or f"{run}/{group}"})})


def plan(cfg: PipelineConfig) -> list[PlannedStage]:
    """Every stage `run` executes for this config, in order (see the module docstring)."""
    out: list[PlannedStage] = []
    beta = cfg.train.loss.beta if cfg.train is not None else None
    previous_export: str | None = None
    first_scored = ""
    for r in range(cfg.rounds):
        for name, c in _round(cfg, r, previous_export):
            c = _tracked(cfg, name, c, f"round {r}")
            out.append(PlannedStage(f"round-{r}/{name}", name, c, _outputs(name, c), f"round {r}", beta, r))
            if name == "train":
                previous_export = c.export
                first_scored = first_scored or c.scored
    if cfg.train is not None and cfg.evaluate is not None:
        for b in dict.fromkeys(cfg.beta_sweep):
            if b == cfg.train.loss.beta:
                continue  # the main run is that point
            for name, c in _sweep(cfg, b, first_scored):
                c = _tracked(cfg, name, c, f"beta {b:g}")
                out.append(PlannedStage(f"beta-{b:g}/{name}", name, c, _outputs(name, c), f"β={b:g}", b, 0))
    # Evaluations last: they need no later stage's work nor give any, and run back to back they share the
    # reference's vLLM engine (pipeline.core.units.sharing) instead of starting it again after every train. With
    # a gate (pipeline.core.gate), a round's evaluation comes before the next round, which builds on its policy.
    early = {f"round-{r}/evaluate" for r in range(cfg.rounds - 1)} if gated(cfg.gate) else set()
    late = [p for p in out if p.stage == "evaluate" and p.label not in early]
    return [p for p in out if p.stage != "evaluate" or p.label in early] + late
