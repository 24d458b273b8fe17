"""status: which stages of a run are complete, from the artifacts alone (local dirs or object storage).

`dpo-ray status --config X.yaml` walks the stages `run` would execute for that config (every round and
β-sweep point) and reads each one's output: a `manifest.json` (complete, with rows, shards, fingerprints
and upstream identities; for evaluate, the evaluation's headline numbers). Lineage: each upstream identity and model
fingerprint is matched to the artifact of this run that has it, so the printout says which artifact
(and which trained policy) each one was made from. Nothing is computed or started; Ray is not needed.
"""

from __future__ import annotations

import logging
from typing import Any

from dpo_ray import artifacts
from pipeline import console
from pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)

__all__ = ["collect", "run"]


def _outputs(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """(label, stage, artifact URI) of every output of every planned stage, in order."""
    from pipeline.plan import plan

    found: list[tuple[str, str, str]] = []
    for p in plan(cfg):
        if p.stage == "generate":
            found.append((p.label.replace("/generate", "/generations"), p.stage, p.outputs[0]))
        found.append((p.label, p.stage, p.output))
    return found


def _initial_models(cfg: PipelineConfig) -> dict[str, str]:
    """Fingerprint → name of the configured starting models that are local directories (no download)."""
    from pathlib import Path

    from dpo_ray.models import model_fingerprint

    refs = [getattr(getattr(cfg, s), k, None) for s, k in (("train", "model"), ("reference", "model"))]
    refs += [getattr(cfg.generate, "policy", None), getattr(cfg.evaluate, "reference", None)]
    known = {}
    for ref in dict.fromkeys(r for r in refs if r):
        if Path(ref).is_dir() and (Path(ref) / "config.json").exists():
            try:
                known[model_fingerprint(ref)] = f"model {ref}"
            except FileNotFoundError:
                continue
    return known


def collect(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One dict per stage output: label, uri, state (complete / incomplete / absent) and, when complete,
    kind, rows, shards, fingerprints, upstream (name → identity) and lineage (name → producing label)."""
    rows: list[dict[str, Any]] = []
    for label, stage, uri in _outputs(cfg):
        row: dict[str, Any] = {"label": label, "stage": stage, "uri": uri}
        manifest = artifacts.read_manifest(uri)
        fs, path = artifacts.artifact_fs(uri)
        if manifest is None:
            row["state"] = "incomplete" if fs.exists(path) else "absent"
        else:
            row |= {
                "state": "complete",
                "kind": manifest.kind,
                "rows": manifest.rows,
                "shards": len(manifest.shards),
                "fingerprints": manifest.fingerprints,
                "upstream": manifest.upstream,
                "identity": artifacts.manifest_sha256(uri),
                "created_at": manifest.created_at,
            }
            if manifest.kind == "eval":
                ev = manifest.stats
                row["summary"] = (
                    f"reward {ev['policy']['reward_mean']:+.3f} (πref {ev['reference']['reward_mean']:+.3f}), "
                    f"KL {ev['kl']:.2f}, win rate {ev['win_rate']:.2f}"
                )
        rows.append(row)
    # Lineage: which artifact of this run has each upstream identity / which export has each model fingerprint.
    by_identity = {r["identity"]: r["label"] for r in rows if "identity" in r}
    by_model = _initial_models(cfg) | {r["fingerprints"]["model"]: r["label"] for r in rows if r.get("kind") == "model"}
    for r in rows:
        lineage = {}
        for k, v in r.get("upstream", {}).items():
            if k in ("policy", "reference"):  # an eval artifact's models, by fingerprint
                lineage[k] = by_model.get(v, f"{v[:12]} (a model from outside this run)")
            else:
                lineage[k] = by_identity.get(
                    v, f"{v[:12]} ({'the input files' if k == 'inputs' else 'not from this run'})"
                )
        model = r.get("fingerprints", {}).get("model")
        if model and r.get("kind") != "model":
            lineage["model"] = by_model.get(model, f"{model[:12]} (a model from outside this run)")
        if lineage:
            r["lineage"] = lineage
    return rows


def run(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Print the status of every stage of this config's run; returns collect()'s rows."""
    rows = collect(cfg)
    done = sum(r["state"] == "complete" for r in rows)
    console.result(f"status of {cfg.run_dir}: {done}/{len(rows)} stage outputs complete")
    width = max(len(r["label"]) for r in rows) if rows else 0
    for r in rows:
        line = f"  {r['label']:<{width}}  {r['state']:<10}"
        if r["state"] == "complete" and r.get("kind") == "eval":
            line += f"  {r['summary']}"
        elif r["state"] == "complete":
            fps = ", ".join(f"{k} {v[:12]}" for k, v in sorted(r["fingerprints"].items()))
            line += f"  {r['kind']:<11} {r['rows']:>8} rows {r['shards']:>3} shards  [{fps}]"
        line += f"  {r['uri']}"
        console.result(line)
        if r.get("lineage"):
            console.result(" " * (width + 4) + "from: " + ", ".join(f"{k} <- {v}" for k, v in r["lineage"].items()))
    return rows
