"""Every config key that is accepted changes what the stage does, or is refused with a message.

The train config is where keys are copied into the worker's settings (a key can be read, then dropped on the way):
for each of its keys, walked from the pydantic model, some valid value other than the default must change what the
driver hands to Ray Train (the workers' loop config, the trainer's arguments, the placement bundle, the step count,
the batching mode). The other stages' configs reach their handlers whole; for them the walk proves that each key is
read somewhere in the stage code.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.config import (
    ColumnMap,
    DemoConfig,
    EvaluateConfig,
    GenerateConfig,
    LoraConfig,
    PipelineConfig,
    PrepareConfig,
    ReferenceConfig,
    TrackingConfig,
    TrainConfig,
    VllmConfig,
    model_of,
)

ROOT = Path(__file__).resolve().parents[2]

# Keys (dotted, within train) that only take effect with another key set (the base), each with the values to try.
# Everything else is tried with values derived from its type and default (_candidates).
_NEEDS: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "loss.weights": ({"loss": {"name": ["sigmoid", "sft"]}}, [[1.0, 0.5]]),
    "loss.discopop_tau": ({"loss": {"name": "discopop"}}, [0.2]),
    "loss.dpop_lambda": ({"loss": {"name": "dpop"}}, [5.0]),
    "loss.simpo_gamma": ({"loss": {"name": "simpo"}}, [1.0]),
    "loss.orpo_lambda": ({"loss": {"name": "orpo"}}, [0.3]),
    "loss.desirable_weight": ({"loss": {"name": "kto"}}, [1.33]),
    "loss.undesirable_weight": ({"loss": {"name": "apo_zero_unpaired"}}, [1.33]),
    "loss.f_alpha": ({"loss": {"f_divergence": "alpha_divergence"}}, [0.3]),
    "loss.name": ({}, ["ipo", ["sigmoid", "sft"]]),
    "batching.attention": ({"workers": {"use_gpu": True}}, ["flex"]),
    "lora": ({}, [LoraConfig().model_dump()]),
    "tracking.report_to": ({}, [["tensorboard"]]),
    "tracking.dir": ({"tracking": {"report_to": ["tensorboard"]}}, ["other-tracking"]),
    "tracking.experiment": ({"tracking": {"report_to": ["tensorboard"]}}, ["another"]),
    "tracking.name": ({"tracking": {"report_to": ["tensorboard"]}}, ["named"]),
    "workers.resources": ({}, [{"CPU": 2}]),
    "workers.accelerator_type": ({}, ["H100"]),
    "workers.count": ({"batch_size": 8}, [2, 0]),
    "sequence_parallel": ({"workers": {"count": 2}, "batch_size": 8}, [2]),
}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, field) of every key of a config model, sections expanded (LoRA, optional, stays whole)."""
    out: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        sub = model_of(field.annotation)
        if sub is not None and name != "lora":
            out += _leaves(sub, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field))
    return out


def _at(key: str, value: Any) -> dict[str, Any]:
    head, _, rest = key.partition(".")
    return {head: _at(rest, value) if rest else value}


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """Raw config sections merged key by key (sub-sections too)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _candidates(name: str, field: Any, default: Any) -> list[Any]:
    """Values other than the default to try for a key, from its annotation."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool:
        return [not default]
    if typing.get_origin(annotation) is typing.Literal:
        return [c for c in typing.get_args(annotation) if c != default]
    if annotation is str or str in args:
        return [f"/elsewhere/{name}"]
    numbers = [default * 2, default + 1, 0.3, 3] if isinstance(default, int | float) else [0.3, 3, 1e-3]
    if annotation is int or int in args:
        return [int(v) for v in numbers if float(v).is_integer()] + [5]
    return numbers


def _behaviour(cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the driver hands on for `cfg`: the loop config (minus the tracker's copy of the whole config), the
    trainer's arguments, the worker bundle, the step count and the resolved batching."""
    import ray.train.torch

    from pipeline.stages import train

    monkeypatch.setattr("dpo_ray.data.order.split_counts", lambda uri, shards: {"train": 64, "eval": 8})
    n_train, n_eval, steps = train._steps(cfg, SimpleNamespace(shards=[]))  # type: ignore[arg-type]
    batching = train._batching(cfg)
    loop = train._loop_config(cfg, steps, batching, True, n_eval > 0, [])
    recorded: dict[str, Any] = {}

    class Recording:  # in place of TorchTrainer (which train subclasses on the embedded Ray)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            recorded.update(kwargs)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Recording)
    train._trainer(cfg, loop)
    recorded.pop("train_loop_config")
    return repr((dataclasses.replace(loop, tracking_params=None), recorded, train._worker_bundle(cfg), steps))


def test_every_train_key_changes_what_the_workers_get(tiny_model_dir, tmp_path, monkeypatch):
    """Each TrainConfig key (and LoRA's) with some valid non-default value changes what the driver hands to Ray Train.

    Checked to fail: with `fused_head=cfg.batching.fused_head` removed from _loop_config, the walk names
    batching.fused_head."""
    import shutil

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    tok = other_model / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace('"<pad>"', '"</s>"', 1))  # another pad token: another model's settings
    monkeypatch.chdir(tmp_path)
    required = {"model": str(tiny_model_dir), "scored": "s", "output": "o", "export": "e"}
    required |= {"checkpoint": {"storage_path": "c"}}
    dropped, tried = [], 0
    leaves = _leaves(TrainConfig)
    for name, field in leaves:
        base, values = _NEEDS.get(name, ({}, _candidates(name.split(".")[-1], field, field.default)))
        if name == "model":
            values = [str(other_model)]
        before = _behaviour(TrainConfig.model_validate(_merge(required, base)), monkeypatch)
        changed = False
        for value in values:
            try:
                cfg = TrainConfig.model_validate(_merge(required, base, _at(name, value)))
            except ValueError:
                continue  # refused with a message: not a value this key takes
            tried += 1
            if _behaviour(cfg, monkeypatch) != before:
                changed = True
                break
        if not changed:
            dropped.append(name)
    for name, field in LoraConfig.model_fields.items():
        lora = LoraConfig().model_dump()
        before = _behaviour(TrainConfig.model_validate(required | {"lora": lora}), monkeypatch)
        values = [["q_proj"]] if name == "target_modules" else _candidates(name, field, field.default)
        cfgs = []
        for value in values:
            try:
                cfgs.append(TrainConfig.model_validate(required | {"lora": lora | {name: value}}))
            except ValueError:
                continue  # refused with a message
        if all(_behaviour(c, monkeypatch) == before for c in cfgs):
            dropped.append(f"lora.{name}")
    assert not dropped, f"accepted train keys that change nothing the workers get: {dropped}"
    assert tried >= len(leaves)


def _properties(folder: Path) -> list[ast.AST]:
    """The bodies of pipeline/config's properties (a key read there, e.g. parity_tolerance, acts through it)."""
    return [
        node
        for path in sorted(folder.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and any(getattr(d, "id", None) == "property" for d in node.decorator_list)
    ]


def _attributes_read(trees: list[ast.AST]) -> set[str]:
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # read by name: getattr(cfg, "field"), model_dump()[...]
    return names


# Where each config reaches: the stage's own module and the shared modules it hands the config to (engine settings,
# units, the plan). A key read only by another stage's module does not count (generate reading `c.temperature`
# says nothing of evaluate's).
_READERS: dict[type, tuple[str, ...]] = {
    ColumnMap: ("pipeline/stages/prepare.py", "dpo_ray/data/tokenization.py"),
    PrepareConfig: ("pipeline/stages/prepare.py", "pipeline/core/sources.py", "pipeline/core/inputs.py"),
    VllmConfig: (
        "pipeline/core/engines.py",
        "pipeline/core/runtime.py",
        "pipeline/core/units.py",
        "dpo_ray/models/engine.py",
        "pipeline/core/inputs.py",
    ),
    ReferenceConfig: ("pipeline/stages/reference.py",),
    GenerateConfig: ("pipeline/stages/generate.py",),
    EvaluateConfig: ("pipeline/stages/evaluate.py", "pipeline/stages/evaluation.py", "pipeline/core/runtime.py"),
    TrackingConfig: ("pipeline/core/trackers.py", "pipeline/core/plan.py"),
    DemoConfig: ("pipeline/cli/demo.py", "pipeline/cli/run.py"),
    PipelineConfig: ("pipeline/core/plan.py", "pipeline/cli/run.py", "pipeline/cli/demo.py", "pipeline/cli/main.py"),
}


@pytest.mark.parametrize("model", list(_READERS), ids=lambda m: m.__name__)
def test_every_other_stage_key_is_read(model):
    """Each key of the other stages' configs is read by the modules that config reaches (_READERS; a subclass's
    also by its base's), or by one of pipeline/config's properties: their configs reach the handlers whole, so a
    key that is read there acts. Checked to fail with a field added to ReferenceConfig."""
    paths = [path for m in model.__mro__ if m in _READERS for path in _READERS[m]]
    trees = [ast.parse((ROOT / path).read_text()) for path in paths]
    read = _attributes_read(trees + _properties(ROOT / "pipeline" / "config"))
    unread = [name for name in model.model_fields if name not in read]
    assert not unread, f"{model.__name__} keys that none of {paths} reads: {unread}"
