"""status: which stages of a run are complete, from the artifacts alone (local dirs or object storage).

`dpo-ray status --config X.yaml` walks the stages `run` would execute for that config (every round and
β-sweep point) and reads each one's output: a `manifest.json` (complete, with rows, shards, fingerprints
and upstream identities; for evaluate, the evaluation's headline numbers). Lineage: each upstream identity and model
fingerprint is matched to the artifact of this run that has it, so the printout says which artifact
(and which trained policy) each one was made from. A complete output whose config or inputs
(`pipeline.core.inputs`: upstream artifacts, models and tokenizers by fingerprint) differ from what its stage would
read now is "stale", with the reason, e.g. "policy model of round-0/train changed since this artifact was
written": `run` redoes it. Nothing is fetched, computed or started (models at URIs or hub ids are not
compared); Ray is not needed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dpo_ray.data import artifacts
from pipeline.config import PipelineConfig
from pipeline.core import console
from pipeline.core.gate import failed_gate, gated, judge
from pipeline.core.plan import PlannedStage

logger = logging.getLogger(__name__)

__all__ = ["collect", "run"]


def _outputs(cfg: PipelineConfig) -> list[tuple[str, PlannedStage, str]]:
    """(label, planned stage, artifact URI) of every output of every planned stage, in order."""
    from pipeline.core.plan import plan

    found: list[tuple[str, PlannedStage, str]] = []
    for p in plan(cfg):
        if p.stage == "generate":
            found.append((p.label.replace("/generate", "/generations"), p, p.outputs[0]))
        found.append((p.label, p, p.output))
    return found


def _initial_models(cfg: PipelineConfig) -> dict[str, str]:
    """Fingerprint → name of the configured starting models that are local directories (no download)."""
    from pathlib import Path

    from dpo_ray.models.loading import model_fingerprint

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
    kind, rows, shards, fingerprints, upstream (name → identity) and lineage (name → producing label); a complete
    output whose stage would now read another config or other inputs is "stale", with `why`."""
    rows: list[dict[str, Any]] = []
    planned: dict[str, PlannedStage] = {}
    for label, p, uri in _outputs(cfg):
        planned[label] = p
        row: dict[str, Any] = {"label": label, "stage": p.stage, "uri": uri}
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
                if p.group.startswith("round") and gated(cfg.gate):
                    row["gate"] = judge(ev, cfg.gate).line()
        rows.append(row)
    # Lineage: which artifact of this run has each upstream identity / which export has each model fingerprint.
    by_identity = {r["identity"]: r["label"] for r in rows if "identity" in r}
    by_model = _initial_models(cfg) | {r["fingerprints"]["model"]: r["label"] for r in rows if r.get("kind") == "model"}
    producers = {r["uri"]: r["label"] for r in rows}  # which stage of this run writes each URI
    for r in rows:
        if r["state"] == "complete":
            _check_current(r, planned[r["label"]], producers)
    _propagate(rows, planned)
    for r in rows:
        lineage = {}
        for k, v in r.get("upstream", {}).items():
            if k.startswith("tokenizer:"):
                continue  # shown with the fingerprints; a tokenizer has no producing stage
            if k.startswith("model:"):  # a model read, by fingerprint
                lineage[k.removeprefix("model:")] = by_model.get(v, f"{v[:12]} (a model from outside this run)")
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


def _dotted(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's values by dotted key ("optim.lr"), sections expanded."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        out |= _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def _check_current(row: dict[str, Any], p: PlannedStage, producers: dict[str, str]) -> None:
    """Mark a complete output "stale" (with `why`) when its manifest's config or inputs are not what its stage
    would read now (the comparison `pipeline.core.stage.begin` makes before it skips); `producers`: URI → the label
    of the stage of this run that writes it."""
    from pipeline.core.inputs import changes, known_inputs, reads
    from pipeline.core.stage import identity, recorded_identity

    manifest = artifacts.read_manifest(row["uri"])
    assert manifest is not None
    now = json.loads(json.dumps(identity(p.config)))  # as the manifest stored it
    now, then = _dotted(now), _dotted(recorded_identity(manifest.config))
    why = [f"config key {k} changed" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    try:
        sources = {k: producers[ref] for k, ref in reads(p.stage, p.config).items() if ref in producers}
        why += changes(manifest.upstream, known_inputs(p.stage, p.config), sources)
    except Exception as e:  # an input that cannot be read now: the stage would fail on it too
        why.append(f"its inputs cannot be read ({type(e).__name__}: {e})")
    if why:
        row |= {"state": "stale", "why": why}


def _propagate(rows: list[dict[str, Any]], planned: dict[str, PlannedStage]) -> None:
    """A complete output that reads an output of this run that `run` redoes (stale, incomplete or absent) is
    stale too: `run` redoes it after that one (rows are in plan order, so what a row reads comes before it)."""
    from pipeline.core.inputs import reads

    by_uri = {r["uri"]: r for r in rows}
    for r in rows:
        if r["state"] not in ("complete", "stale"):
            continue
        p = planned[r["label"]]
        sources = {by_uri[ref]["label"]: by_uri[ref] for ref in reads(p.stage, p.config).values() if ref in by_uri}
        for label, src in sources.items():
            if src is not r and src["state"] in ("stale", "incomplete", "absent"):
                r["state"] = "stale"
                r.setdefault("why", []).append(f"it reads {label} ({src['state']}), which `run` redoes first")


def run(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Print the status of every stage of this config's run; returns collect()'s rows."""
    rows = collect(cfg)
    done = sum(r["state"] == "complete" for r in rows)
    console.result(f"status of {cfg.run_dir}: {done}/{len(rows)} stage outputs complete")
    for r in rows:
        if failed_gate(r.get("gate")):
            console.error(f"GATE FAILED {r['label']}: {r['gate']}")
    width = max(len(r["label"]) for r in rows) if rows else 0
    for r in rows:
        line = f"  {r['label']:<{width}}  {r['state']:<10}"
        if r["state"] == "complete" and r.get("kind") == "eval":
            line += f"  {r['summary']}" + (f"; gate {r['gate']}" if "gate" in r else "")
        elif r["state"] in ("complete", "stale"):
            fps = ", ".join(f"{k} {v[:12]}" for k, v in sorted(r["fingerprints"].items()))
            line += f"  {r['kind']:<15} {r['rows']:>8} rows {r['shards']:>3} shards  [{fps}]"
        line += f"  {r['uri']}"
        console.result(line)
        if r.get("lineage"):
            console.result(" " * (width + 4) + "from: " + ", ".join(f"{k} <- {v}" for k, v in r["lineage"].items()))
        for why in r.get("why", []):
            console.result(" " * (width + 4) + f"stale: {why}; `run` redoes it")
    return rows
