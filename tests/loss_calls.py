"""The losses called with keywords, as the tests state their cases: LossSpec fields and batch state alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from dpo_ray.objective.losses import BatchState, LossOutput, initial_loss, preference_loss, step_zero
from dpo_ray.objective.spec import LossSpec


def spec(name: str | Sequence[str], **params: Any) -> LossSpec:
    """LossSpec of a name (or list of names) and keyword fields (validated as the config validates them)."""
    return LossSpec(name=name if isinstance(name, str) else list(name), **params)


def loss(
    name: str | Sequence[str],
    *tensors: Tensor,
    bco_delta: float = 0.0,
    aot_partners: Tensor | None = None,
    **params: Any,
) -> LossOutput:
    """preference_loss(spec(name, **params), *tensors, BatchState(bco_delta, aot_partners))."""
    return preference_loss(spec(name, **params), *tensors, BatchState(bco_delta, aot_partners))


def initial(name: str, beta: float, label_smoothing: float = 0.0, **params: Any) -> Any:
    return initial_loss(name, spec(name, beta=beta, label_smoothing=label_smoothing, **params))


def zero_step(names: Sequence[str], weights: Sequence[float] | None, beta: float, **params: Any) -> Any:
    return step_zero(spec(names, weights=None if weights is None else list(weights), beta=beta, **params))
