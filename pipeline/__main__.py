"""CLI: `python -m pipeline <stage> --config X.yaml [key=value ...]` (also installed as `dpo-ray`).

Stages: prepare, reference, train, generate, evaluate; `run` runs them all (every round); `status` prints
what is complete under the run directory.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from dpo_ray.errors import UserError
from pipeline.config import ConfigError, PipelineConfig, load_config

# stage name → (module holding `run(cfg)`, config section)
STAGES = {
    "prepare": ("pipeline.prepare", "prepare"),
    "reference": ("pipeline.reference", "reference"),
    "train": ("pipeline.train", "train"),
    "generate": ("pipeline.generate", "generate"),
    "evaluate": ("pipeline.evaluate", "evaluate"),
    "run": ("pipeline.run", ""),  # the whole pipeline: takes the full config
    "status": ("pipeline.status", ""),  # what is complete under run_dir (reads artifacts, runs nothing)
}


def _stage_config(cfg: PipelineConfig, section: str) -> Any:
    stage_cfg = getattr(cfg, section)
    if stage_cfg is None:
        raise ConfigError(f"the config has no '{section}:' section (needed by `{section}`)")
    return stage_cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-ray", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES), help="stage to run")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prepare.max_length=512")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        module_name, section = STAGES[args.stage]
        stage_cfg = _stage_config(cfg, section) if section else cfg
        importlib.import_module(module_name).run(stage_cfg)
    except UserError as e:  # one message, exit status 2, no traceback (dpo_ray.errors)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
