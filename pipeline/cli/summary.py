"""The run's summary: one row per evaluated policy (round, β) → summary.json, summary.md, reward_vs_kl.png.

Reads the `eval` artifacts the evaluate stage wrote; prints the table. The plot is the DPO paper's Figure-2
analogue: each policy's mean reward against its KL(π‖πref) estimate, the reference at KL 0.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from dpo_ray.data import artifacts
from pipeline.core import console
from pipeline.core.gate import failed_gate

logger = logging.getLogger(__name__)

__all__ = ["EvalPoint", "summarize", "table"]


@dataclass(frozen=True)
class EvalPoint:
    """Where one evaluated policy's eval.json is, and what produced it."""

    label: str
    beta: float
    round: int
    eval_dir: str


def _read(uri: str) -> dict[str, Any] | None:
    """The evaluation recorded by a complete `eval` artifact, or None."""
    manifest = artifacts.read_manifest(uri)
    return manifest.stats if manifest is not None and manifest.kind == "eval" else None


def _pm(value: float | None, stderr: float | None, fmt: str) -> str:
    if value is None:
        return ""
    return format(value, fmt) + ("" if stderr is None else " ± " + format(stderr, fmt.lstrip("+")))


def banner(rows: list[dict[str, Any]]) -> str:
    """The failed gates, as the summary's first lines ("" when none failed)."""
    failed = [f"{r['label']}: {r['gate']}" for r in rows if failed_gate(r.get("gate"))]
    return "".join(f"**GATE FAILED** {line}\n\n" for line in failed)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the summary rows: every statistic ± its standard error, with its count (prompts, each
    sampled `samples` times; eval pairs for the preference accuracy)."""
    head = (
        "| policy | β | round | reward ± se | positive | KL(π‖πref) ± se | win rate vs πref ± se | prompts x samples "
        "| eval pref. accuracy ± se (pairs) | gate |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        kl = "0" if r["kl"] is None else _pm(r["kl"], r["kl_stderr"], ".2f")
        acc = ""
        if r.get("pref_accuracy") is not None:
            acc = f"{_pm(r['pref_accuracy'], r.get('pref_stderr'), '.2f')} ({r['pref_pairs']})"
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        rnd = "" if r["round"] is None else str(r["round"])
        lines.append(
            f"| {r['label']} | {beta} | {rnd} | {_pm(r['reward_mean'], r.get('reward_stderr'), '+.3f')} "
            f"| {100 * r['positive_fraction']:.0f}% | {kl} | {_pm(r.get('win_rate'), r.get('win_rate_stderr'), '.2f')} "
            f"| {r['prompts']} x {r['samples']} | {acc} | {r.get('gate', '')} |"
        )
    return head + "\n".join(lines) + "\n"


def _row(label: str, beta: float | None, rnd: int | None, ev: dict[str, Any], model: str) -> dict[str, Any]:
    """One table row from an evaluation: `model` is "policy" or "reference" (the reference row has no KL)."""
    row = {
        "label": label,
        "beta": beta,
        "round": rnd,
        **{k: ev[model].get(k) for k in ("reward_mean", "reward_stderr", "reward_std", "positive_fraction")},
        "prompts": ev["prompts"],
        "samples": ev["samples_per_prompt"],
        "kl": None,
        "kl_stderr": None,
        "win_rate": None,
        "win_rate_stderr": None,
        "pref_accuracy": None,
        "pref_stderr": None,
        "pref_pairs": None,
    }
    if model == "policy":
        pref = ev.get("preference") or {}
        acc, pairs = pref.get("accuracy"), pref.get("pairs") or 0
        row |= {
            "kl": ev["kl"],
            "kl_stderr": ev["kl_stderr"],
            "win_rate": ev["win_rate"],
            "win_rate_stderr": ev.get("win_rate_stderr"),
            "pref_accuracy": acc,
            "pref_stderr": None if acc is None or not pairs else (acc * (1 - acc) / pairs) ** 0.5,
            "pref_pairs": pairs or None,
        }
    return row


def summarize(points: list[EvalPoint], run_dir: str, tracking: Any = None, gate: Any = None) -> dict[str, Any]:
    """Collect the eval.json of each point; write <run_dir>/summary.{json,md}, reward_vs_kl.png and the HTML
    report (pipeline.cli.report); log the table and the plot to `tracking` (dpo_ray.train.tracking settings) if
    given. With `gate` (a GateConfig that tests something), each round's row carries its verdict
    (pipeline.core.gate), and a failed one opens the summary and the report as a banner."""
    import fsspec

    from pipeline.cli.report import write_report
    from pipeline.core.gate import gated, judge

    rows: list[dict[str, Any]] = []
    evals: list[tuple[str, str]] = []
    for p in points:
        ev = _read(p.eval_dir)
        if ev is None:
            logger.warning("summary: %s is not a complete eval artifact; %s left out", p.eval_dir, p.label)
            continue
        if not rows:
            rows.append(_row("πref", None, None, ev, "reference"))
        row = _row(p.label, p.beta, p.round, ev, "policy") | {"eval": f"{p.eval_dir}/eval.json"}
        if gate is not None and gated(gate) and p.label.startswith("round"):
            row["gate"] = judge(ev, gate).line()
        rows.append(row)
        evals.append((p.label, p.eval_dir))
    if not rows:
        return {"rows": []}
    md = banner(rows) + table(rows)
    fs, out = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(out, exist_ok=True)
    with fs.open(f"{out}/summary.json", "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    with fs.open(f"{out}/summary.md", "w") as f:
        f.write(md)
    _plot(rows, fs, f"{out}/reward_vs_kl.png")
    report = write_report(run_dir, rows, md, evals)
    if tracking is not None:
        _track(tracking, rows, md, fs, f"{out}/reward_vs_kl.png")
    console.result("summary (" + f"{run_dir}/summary.md, reward_vs_kl.png):\n" + md + f"report: {report}")
    return {"rows": rows, "table": md, "report": report}


def _track(tracking: Any, rows: list[dict[str, Any]], md: str, fs: Any, plot: str) -> None:
    """The summary's numbers (summary/<policy>/<statistic>), its table and its plot, in one tracker run."""
    import os
    import tempfile

    from dpo_ray.train.tracking import Tracker

    values = {}
    for r in rows[1:]:
        for k in ("reward_mean", "kl", "win_rate", "pref_accuracy"):
            if r.get(k) is not None:
                values[f"summary/{r['label']}/{k}"] = float(r[k])
    values["summary/reference/reward_mean"] = float(rows[0]["reward_mean"])
    tracker = Tracker(tracking)
    try:
        tracker.summary(values, 0)
        tracker.text("summary.md", md)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "reward_vs_kl.png")
            fs.get(plot, local)
            tracker.image("summary/reward_vs_kl", local, 0)
    finally:
        tracker.close()


def _plot(rows: list[dict[str, Any]], fs: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ref = rows[0]
    ax.axhline(ref["reward_mean"], color="gray", ls="--", lw=1)
    ax.plot([0.0], [ref["reward_mean"]], "ks", label="πref")
    betas = sorted({r["beta"] for r in rows[1:]})
    cmap = plt.get_cmap("viridis")
    for i, beta in enumerate(betas):
        pts = sorted((r for r in rows[1:] if r["beta"] == beta), key=lambda r: r["round"])
        color = cmap(i / max(1, len(betas) - 1))
        ax.errorbar(
            [r["kl"] for r in pts],
            [r["reward_mean"] for r in pts],
            xerr=[r["kl_stderr"] or 0 for r in pts],
            fmt="o-",
            color=color,
            label=f"DPO β={beta:g}",
        )
        for r in pts:
            ax.annotate(f"r{r['round']}", (r["kl"], r["reward_mean"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("KL(π‖πref) estimate (nats / completion)")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL (r<k>: after round k)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
