"""<run_dir>/report.html: one self-contained page per run (no external files: images are embedded as data
URIs, styles inline): the summary table, the plots (reward vs KL, and each policy's training curves and
reward histogram), and for a few prompts the reference's and each policy's sampled completions side by side
with their rewards. Written by the summary at the end of `run`.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from typing import Any

from dpo_ray.data import artifacts
from dpo_ray.objective.health import fired_steps
from pipeline.core.gate import failed_gate

__all__ = ["SAMPLED_PROMPTS", "write_report"]

SAMPLED_PROMPTS = 6  # prompts shown with their completions

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.samples td{max-width:22em;white-space:pre-wrap;font-size:0.9em}.reward{color:#555;font-size:0.85em}
.alarm{background:#fde2e1;border:2px solid #c0392b;padding:0.8em;margin:1em 0;font-size:1.1em}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}figure{display:inline-block;margin:0 1em 1em 0}
"""

_COLUMNS = [
    ("policy", "label", None),
    ("β", "beta", "g"),
    ("round", "round", "d"),
    ("reward", "reward_mean", "+.3f"),
    ("± se", "reward_stderr", ".3f"),
    ("KL(π‖πref)", "kl", ".2f"),
    ("± se", "kl_stderr", ".2f"),
    ("win rate", "win_rate", ".2f"),
    ("± se", "win_rate_stderr", ".2f"),
    ("prompts", "prompts", "d"),
    ("samples", "samples", "d"),
    ("pref. accuracy", "pref_accuracy", ".2f"),
    ("± se", "pref_stderr", ".2f"),
    ("pairs", "pref_pairs", "d"),
    ("gate", "gate", None),
]


def _image(fs: Any, path: str) -> str | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _jsonl(uri: str) -> list[dict[str, Any]]:
    fs, path = artifacts.artifact_fs(uri)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "<td></td>"
    if fmt is None:
        return f"<td>{html.escape(str(value))}</td>"
    return f'<td class="num">{format(value, fmt)}</td>'


def _table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in _COLUMNS)
    body = "".join("<tr>" + "".join(_cell(r.get(k), f) for _, k, f in _COLUMNS) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _first_per_prompt(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["prompt"], r)
    return out


def _samples(evals: list[tuple[str, str]]) -> str:
    """The first SAMPLED_PROMPTS prompts of the first evaluation: the reference's first sample and each
    policy's, for the same prompt, in one row."""
    if not evals:
        return ""
    reference = _first_per_prompt(_jsonl(f"{evals[0][1]}/reference_samples.jsonl"))
    policies = [(label, _first_per_prompt(_jsonl(f"{uri}/policy_samples.jsonl"))) for label, uri in evals]
    prompts = list(reference)[:SAMPLED_PROMPTS]
    if not prompts:
        return "<p>(no samples recorded)</p>"
    head = "<tr><th>prompt</th><th>πref</th>" + "".join(f"<th>{html.escape(lbl)}</th>" for lbl, _ in policies)

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "<td></td>"
        return f'<td>{html.escape(row["completion"])}<div class="reward">reward {row["reward"]:+.3f}</div></td>'

    body = "".join(
        f"<tr><td>{html.escape(p)}</td>{cell(reference.get(p))}"
        + "".join(cell(s.get(p)) for _, s in policies)
        + "</tr>"
        for p in prompts
    )
    return f'<table class="samples">{head}</tr>{body}</table>'


def _banner(rows: list[dict[str, Any]], evals: Sequence[tuple[str, str]] = ()) -> str:
    """A failed gate (pipeline.core.gate) and the health guards that fired in training, first on the page."""
    failed = [r for r in rows if failed_gate(r.get("gate"))]
    out = "".join(
        f'<div class="alarm"><b>GATE FAILED</b> {html.escape(r["label"])}: {html.escape(r["gate"])}</div>'
        for r in failed
    )
    for label, alarms in _health_alarms(evals).items():
        out += f'<div class="alarm"><b>HEALTH</b> {html.escape(label)}: {html.escape(alarms)}</div>'
    return out


def _health_alarms(evals: Sequence[tuple[str, str]]) -> dict[str, str]:
    """label → "signal at steps ..." for each evaluated policy whose training fired a guard (its metrics.jsonl)."""
    found = {}
    for label, uri in evals:
        manifest = artifacts.read_manifest(uri)
        metrics = ((manifest.stats if manifest is not None else {}).get("config") or {}).get("train_metrics")
        if not metrics:
            continue
        steps = fired_steps(_jsonl(f"{metrics}/metrics.jsonl"))
        if steps:
            found[label] = "; ".join(f"health/{s} fired at steps {', '.join(map(str, v))}" for s, v in steps.items())
    return found


def write_report(run_dir: str, rows: list[dict[str, Any]], table_md: str, evals: list[tuple[str, str]]) -> str:
    """Write <run_dir>/report.html (see the module docstring); returns its URI."""
    fs, out = artifacts.artifact_fs(run_dir)
    figures = []
    summary_plot = _image(fs, f"{out}/reward_vs_kl.png")
    if summary_plot:
        figures.append(("reward vs KL", summary_plot))
    for label, uri in evals:
        efs, epath = artifacts.artifact_fs(uri)
        for name in ("training_curves.png", "training_health.png", "rewards.png"):
            img = _image(efs, f"{epath}/{name}")
            if img:
                figures.append((f"{label}: {name.removesuffix('.png').replace('_', ' ')}", img))
    plots = "".join(
        f'<figure><img src="{src}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for cap, src in figures
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dpo-ray report: {html.escape(run_dir)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>dpo-ray run {html.escape(run_dir)}</h1>{_banner(rows, evals)}"
        "<h2>Summary</h2><p>Each statistic with its standard error over prompts (a prompt's samples are averaged "
        "first); preference accuracy over the eval pairs, with its binomial standard error.</p>"
        f"{_table(rows)}<details><summary>as Markdown</summary><pre>{html.escape(table_md)}</pre></details>"
        f"<h2>Plots</h2>{plots}<h2>Samples</h2><p>The first sample of each model for the same prompts.</p>"
        f"{_samples(evals)}</body></html>"
    )
    path = f"{out}/report.html"
    with fs.open(path, "w") as f:
        f.write(page)
    return f"{run_dir}/report.html"
