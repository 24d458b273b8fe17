"""Functions named by "module:function" or "module:function:ARG" that the tests inject at known points of a run
(dpo_ray.testing.faults: kill a worker at a step, hold a unit in flight). Production code looks one up only when
the environment names it (DPO_RAY_STEP_HOOK, DPO_RAY_UNIT_HOOK) and never imports the testing package itself."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["STEP_HOOK_ENV", "UNIT_HOOK_ENV", "named_hook"]

# Called after every optimizer step with (step, rank, output); read by the train stage from the driver's environment.
STEP_HOOK_ENV = "DPO_RAY_STEP_HOOK"
# Called before each unit of work with its kind: "unit" (a pool actor's unit: reference, generate) or "shard" (a
# shard prepare writes); read in the process doing the work.
UNIT_HOOK_ENV = "DPO_RAY_UNIT_HOOK"


def named_hook(spec: str | None) -> Callable[..., Any] | None:
    """The function `spec` names; with an ARG, a function that calls it with ARG first. None for no spec."""
    if not spec:
        return None
    module, name, *arg = spec.split(":", 2)
    fn = getattr(importlib.import_module(module), name)
    if not arg:
        return fn  # type: ignore[no-any-return]
    return lambda *args: fn(arg[0], *args)
