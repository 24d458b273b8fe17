"""The house in layers: every import (module level or inside a function) points down or sideways, never up.

dpo_ray (the library) never imports pipeline (the orchestration). Within dpo_ray: errors, then objective
(the loss spec, losses, metrics) and data (artifacts, schemas, tokenization, order) and compute (log-probs,
batching, attention) and models (loading, vLLM engine, rewards), then train (step and loop); testing (tiny
families, fault hooks) is imported by tests and benchmarks only. Within pipeline: config, then core (stage
lifecycle, inputs, units, Ray start-up, plan, console), then stages, then cli (the command line, run, status,
summary, report, demo).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANK = {
    "dpo_ray": 0,  # the package root (__version__)
    "dpo_ray.errors": 0,
    "dpo_ray.objective": 1,
    "dpo_ray.data": 1,
    "dpo_ray.compute": 1,
    "dpo_ray.models": 1,
    "dpo_ray.train": 2,
    "dpo_ray.testing": 9,  # nothing in dpo_ray or pipeline may import it
    "pipeline.config": 10,
    "pipeline.core": 11,
    "pipeline.stages": 12,
    "pipeline.cli": 13,
    "pipeline.__main__": 14,
    "pipeline": 14,
}


def _layer(module: str) -> str:
    parts = module.split(".")
    two = ".".join(parts[:2])
    return two if two in RANK else parts[0]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if node.module in ("dpo_ray", "pipeline")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.split(".")[0] in ("dpo_ray", "pipeline")]


def test_every_import_points_down_or_sideways():
    """Checked to fail: with `from pipeline.stages.train import _batching` in pipeline/core/plan.py."""
    upward = []
    for folder in ("dpo_ray", "pipeline"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mine = RANK[_layer(module)]
            for target in _imports(path):
                theirs = RANK[_layer(target)]
                if _layer(target) == "dpo_ray.testing" and _layer(module) != "dpo_ray.testing":
                    upward.append(f"{module} imports test scaffolding {target}")
                elif theirs > mine and _layer(target) not in ("dpo_ray", "pipeline"):
                    upward.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not upward, "\n".join(upward)


def test_every_module_has_a_layer():
    unplaced = [
        str(p.relative_to(ROOT))
        for folder in ("dpo_ray", "pipeline")
        for p in (ROOT / folder).rglob("*.py")
        if _layer(".".join(p.relative_to(ROOT).with_suffix("").parts)) not in RANK
    ]
    assert not unplaced
