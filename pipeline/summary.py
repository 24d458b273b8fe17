"""The run's summary: one row per evaluated policy (round, β) → summary.json, summary.md, reward_vs_kl.png.

Reads the `eval` artifacts the evaluate stage wrote; prints the table. The plot is the DPO paper's Figure-2
analogue: each policy's mean reward against its KL(π‖πref) estimate, the reference at KL 0.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from dpo_ray import artifacts
from pipeline import console

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


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the summary rows."""
    head = (
        "| policy | β | round | reward (mean ± std) | positive | KL(π‖πref) ± stderr | win rate vs πref "
        "| eval pref. accuracy |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        kl = "0" if r["kl"] is None else f"{r['kl']:.2f} ± {r['kl_stderr'] or 0:.2f}"
        acc = "" if r.get("pref_accuracy") is None else f"{r['pref_accuracy']:.2f}"
        win = "" if r.get("win_rate") is None else f"{r['win_rate']:.2f}"
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        rnd = "" if r["round"] is None else str(r["round"])
        lines.append(
            f"| {r['label']} | {beta} | {rnd} | {r['reward_mean']:+.3f} ± {r['reward_std']:.3f} "
            f"| {100 * r['positive_fraction']:.0f}% | {kl} | {win} | {acc} |"
        )
    return head + "\n".join(lines) + "\n"


def summarize(points: list[EvalPoint], run_dir: str) -> dict[str, Any]:
    """Collect the eval.json of each point; write <run_dir>/summary.{json,md} and reward_vs_kl.png."""
    import fsspec

    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    for p in points:
        ev = _read(p.eval_dir)
        if ev is None:
            logger.warning("summary: %s is not a complete eval artifact; %s left out", p.eval_dir, p.label)
            continue
        if reference is None:
            reference = {
                "label": "πref",
                "beta": None,
                "round": None,
                **{k: ev["reference"][k] for k in ("reward_mean", "reward_std", "positive_fraction")},
                "kl": None,
                "kl_stderr": None,
                "win_rate": None,
                "pref_accuracy": None,
            }
        rows.append(
            {
                "label": p.label,
                "beta": p.beta,
                "round": p.round,
                **{k: ev["policy"][k] for k in ("reward_mean", "reward_std", "positive_fraction")},
                "kl": ev["kl"],
                "kl_stderr": ev["kl_stderr"],
                "win_rate": ev["win_rate"],
                "pref_accuracy": ev["preference"].get("accuracy"),
                "eval": f"{p.eval_dir}/eval.json",
            }
        )
    if reference is None:
        return {"rows": []}
    rows = [reference, *rows]
    md = table(rows)
    fs, out = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(out, exist_ok=True)
    with fs.open(f"{out}/summary.json", "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    with fs.open(f"{out}/summary.md", "w") as f:
        f.write(md)
    _plot(rows, fs, f"{out}/reward_vs_kl.png")
    console.result("summary (" + f"{run_dir}/summary.md, reward_vs_kl.png):\n" + md)
    return {"rows": rows, "table": md}


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
