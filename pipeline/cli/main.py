"""CLI: `python -m pipeline <stage> --config X.yaml [key=value ...]` (also installed as `dpo-ray`).

Stages: prepare, reference, train, generate, evaluate; `run` runs them all (every round); `status` prints
what is complete under the run directory; `config` prints the resolved config (defaults filled in, paths
resolved) and runs nothing; `init --model M --data D` writes a starter config after checking both.
`dpo-ray <stage> --help` lists the stage's config keys.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import traceback
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from dpo_ray.errors import UserError
from pipeline.config import ConfigError, PipelineConfig, load_config, model_of
from pipeline.core import console

# stage name → (module holding `run(cfg)`, config section)
STAGES = {
    "prepare": ("pipeline.stages.prepare", "prepare"),
    "reference": ("pipeline.stages.reference", "reference"),
    "train": ("pipeline.stages.train", "train"),
    "generate": ("pipeline.stages.generate", "generate"),
    "evaluate": ("pipeline.stages.evaluate", "evaluate"),
    "run": ("pipeline.cli.run", ""),  # the whole pipeline: takes the full config
    "status": ("pipeline.cli.status", ""),  # what is complete under run_dir (reads artifacts, runs nothing)
    "config": ("", ""),  # the resolved config, printed
    "init": ("pipeline.cli.init", ""),  # a starter config from --model and --data (own arguments)
}


def _stage_config(cfg: PipelineConfig, section: str) -> Any:
    stage_cfg = getattr(cfg, section)
    if stage_cfg is None:
        raise ConfigError(f"the config has no '{section}:' section (needed by `{section}`)")
    return stage_cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:  # its own arguments: --model, --data, ...
        from pipeline.cli import init

        try:
            return init.main(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="dpo-ray", description=__doc__, add_help=False)
    parser.add_argument("stage", nargs="?", choices=sorted(STAGES), help="stage to run")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prepare.max_length=512")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's and vLLM's output on the console (otherwise it goes to <run_dir>/logs/<stage>.log)",
    )
    parser.add_argument("-h", "--help", action="store_true", help="this message; with a stage: its config keys")
    args = parser.parse_intermixed_args(argv)
    if args.help or args.stage is None:
        print(parser.format_help() if args.stage is None else stage_help(args.stage))
        return 0 if args.help else 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.stage == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        module_name, section = STAGES[args.stage]
        stage_cfg = _stage_config(cfg, section) if section else cfg
        if args.verbose or args.stage == "status":
            importlib.import_module(module_name).run(stage_cfg)
            return 0
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # the console draws its own progress
        ray_was_up = _ray_up()
        with console.capture(log_dir(cfg.run_dir)):
            try:
                console.log_file(args.stage)
                importlib.import_module(module_name).run(stage_cfg)
            except UserError:
                raise
            except BaseException:  # the whole traceback, on the console as well as in the log
                console.error(traceback.format_exc().rstrip())
                return 1
            finally:
                if not ray_was_up:  # while still captured: Ray forwards workers' last lines until it stops
                    _stop_ray()
    except UserError as e:  # one message, its exit status (2 unless it says otherwise), no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    return 0


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _stop_ray() -> None:
    """Shut down the Ray this command started (a caller's own Ray, e.g. a test session's, is left alone)."""
    if _ray_up():
        sys.modules["ray"].shutdown()


def log_dir(run_dir: str) -> str:
    """Where captured output goes: <run_dir>/logs, or for an object-store run_dir a local directory (logs are
    written as they come, which object stores do not allow): <tmp>/dpo-ray-logs/<bucket path>."""
    if "://" not in run_dir or run_dir.startswith("file://"):
        return os.path.join(run_dir.removeprefix("file://"), "logs")
    return os.path.join(tempfile.gettempdir(), "dpo-ray-logs", run_dir.split("://", 1)[1].strip("/"))


def stage_help(stage: str) -> str:
    """`dpo-ray <stage> --help`: usage and the config keys the stage reads, from the config models (types,
    defaults, descriptions), so the help cannot drift from what is accepted."""
    section = STAGES[stage][1]
    usage = f"usage: dpo-ray {stage} --config X.yaml [key=value ...] [--log-level LEVEL] [--verbose]"
    if section:
        model = PipelineConfig.model_fields[section].annotation
        found = model_of(model)
        assert found is not None
        return f"{usage}\n\nconfig keys (section '{section}:'; override as {section}.KEY=VALUE):\n" + "\n".join(
            config_keys(found, f"{section}.")
        )
    if stage == "init":
        from pipeline.cli import init

        return init.__doc__ or ""
    what = {"run": "runs every stage of the plan", "status": "prints what is complete", "config": "prints it"}[stage]
    return f"{usage}\n\n`{stage}` takes the whole config and {what}. Top-level keys:\n" + "\n".join(
        config_keys(PipelineConfig, "")
    )


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def config_keys(model: type[BaseModel], prefix: str) -> list[str]:
    """One line per key: `  prefix.key  type  (default ...)  description`; sections are expanded in place."""
    lines = []
    for name, field in model.model_fields.items():
        sub = model_of(field.annotation)
        if sub is not None and prefix:  # a nested model inside a stage (lora, columns)
            lines.append(f"  {prefix}{name}: {field.description or ''}")
            lines += config_keys(sub, f"{prefix}{name}.")
            continue
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = f"default {'null' if value is None else json.dumps(value, default=str)}"
        kind = "section" if sub is not None else _type_name(field.annotation)
        lines.append(f"  {prefix}{name}  ({kind}; {default})  {field.description or ''}".rstrip())
    return lines
