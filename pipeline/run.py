"""run: the stages in order (prepare → reference → train), each skipped when its artifact is complete.

With a `demo:` section, the demo's data and tiny model are generated first (once, under demo.assets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)

__all__ = ["run"]


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every configured stage in order; returns {stage: manifest}."""
    from pipeline import prepare, reference, train

    if cfg.demo is not None:
        from pipeline.demo import build_assets

        build_assets(cfg.demo.assets, cfg.demo.pairs, cfg.demo.seed, cfg.demo.model)
    stages: list[tuple[str, Any, Callable[[Any], Any]]] = [
        ("prepare", cfg.prepare, prepare.run),
        ("reference", cfg.reference, reference.run),
        ("train", cfg.train, train.run),
    ]
    results: dict[str, Any] = {}
    timings = []
    for name, stage_cfg, fn in stages:
        if stage_cfg is None:
            continue
        t0 = time.perf_counter()
        results[name] = fn(stage_cfg)
        timings.append(f"{name} {time.perf_counter() - t0:.0f}s")
    print("run: done (" + ", ".join(timings) + f") -> {cfg.run_dir}", flush=True)
    return results
