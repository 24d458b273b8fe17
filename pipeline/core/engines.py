"""The vLLM engine of a stage's VllmConfig, and when two stages' engines are the same one (shared actors)."""

from __future__ import annotations

from typing import Any

__all__ = ["engine_key", "engine_spec"]


# The VllmConfig fields an engine is built from, besides the model and the seed (dpo_ray.models.engine.EngineSpec).
_ENGINE_FIELDS = (
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_batched_tokens",
    "tensor_parallel_size",
    "trust_remote_code",
    "enforce_eager",
    "in_process",
)


def engine_spec(cfg: Any, model: str) -> Any:
    """A dpo_ray.models.engine.EngineSpec from a stage's VllmConfig fields. Prefix caching is off in every stage:
    cached prefixes can make prompt log-probs depend on request order (scoring), and one spec for all stages
    lets a later stage reuse an earlier one's engine (generate pays one prefill per sample instead)."""
    from dpo_ray.models.engine import EngineSpec
    from dpo_ray.models.loading import resolve_model_dir

    fields = {name: getattr(cfg, name) for name in _ENGINE_FIELDS}
    return EngineSpec(model=str(resolve_model_dir(model)), seed=cfg.seed, enable_prefix_caching=False, **fields)


def engine_key(cfg: Any, model: str) -> tuple[Any, ...]:
    """What makes two stages' engines the same one (pipeline.core.units shares actors by it): the model as
    configured and every engine_spec field but the seed (requests carry their own seeds). Computed without
    resolving the model; kept actors never outlive a train stage, so a path names one model within a run."""
    return (model, *(getattr(cfg, name) for name in _ENGINE_FIELDS))
