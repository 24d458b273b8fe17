"""Ray start-up shared by the stages: join a cluster when one is configured, else start a local one."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "check_pool_fits",
    "engine_spec",
    "ensure_ray",
    "matching_tokenizer",
    "tracking_settings",
    "unique_prompts",
    "unwrap_user_error",
]


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS (e.g. inside `ray job submit`) or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Local mode: a new embedded Ray ("local": never a cluster that happens to run on this machine, which
    # ray.init() would otherwise join), without a dashboard (no job server listening at all).
    kwargs: dict[str, Any] = {"include_dashboard": False} if not address else {}
    ray.init(address=address or "local", logging_level=logging.WARNING, **kwargs)
    logger.info("ray: %s", ray.cluster_resources())


def check_pool_fits(
    setting: str, actors: int, cpus_per_actor: float, needs_free_cpu: bool, accelerator_type: str | None = None
) -> None:
    """On a fixed-size Ray (the embedded local one: no autoscaler can add nodes), refuse an actor pool that
    cannot start, or that takes every CPU while the stage still needs one for its read tasks (they would
    wait forever). On a cluster (RAY_ADDRESS) nodes may be added; Ray's own scheduling applies there."""
    import ray

    from pipeline.config import ConfigError

    if os.environ.get("RAY_ADDRESS"):
        return
    resources = ray.cluster_resources()
    if accelerator_type and f"accelerator_type:{accelerator_type}" not in resources:
        stage = setting.split(".")[0]
        raise ConfigError(
            f"{stage}.accelerator_type is {accelerator_type!r} but this Ray has no such accelerator (resources: "
            f"{', '.join(sorted(k for k in resources if not k.startswith('node:')))}): unset it to run here"
        )
    cpus = float(resources.get("CPU", 0))
    wanted = actors * cpus_per_actor + (1 if needs_free_cpu else 0)
    if wanted > cpus:
        reads = " + 1 for reading the inputs" if needs_free_cpu else ""
        raise ConfigError(
            f"{setting}: {actors} actor(s) x {cpus_per_actor:g} CPU{reads} = {wanted:g} CPUs, but this Ray has "
            f"{cpus:g} and cannot add nodes: lower {setting}, or run on a cluster (RAY_ADDRESS)"
        )


def unwrap_user_error(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` inside a Ray task error's cause chain, else None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


# The VllmConfig fields an engine is built from, besides the model and the seed (dpo_ray.engine.EngineSpec).
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
    """A dpo_ray.engine.EngineSpec from a stage's VllmConfig fields. Prefix caching is off in every stage:
    cached prefixes can make prompt log-probs depend on request order (scoring), and one spec for all stages
    lets a later stage reuse an earlier one's engine (generate pays one prefill per sample instead)."""
    from dpo_ray.engine import EngineSpec
    from dpo_ray.models import resolve_model_dir

    fields = {name: getattr(cfg, name) for name in _ENGINE_FIELDS}
    return EngineSpec(model=str(resolve_model_dir(model)), seed=cfg.seed, enable_prefix_caching=False, **fields)


def engine_key(cfg: Any, model: str) -> tuple[Any, ...]:
    """What makes two stages' engines the same one (pipeline.units shares actors by it): the model as
    configured and every engine_spec field but the seed (requests carry their own seeds). Computed without
    resolving the model; kept actors never outlive a train stage, so a path names one model within a run."""
    return (model, *(getattr(cfg, name) for name in _ENGINE_FIELDS))


def tracking_settings(cfg: Any, key: str) -> Any:
    """dpo_ray.tracking.TrackingSettings of a train or evaluate `tracking` section (None without report_to);
    refuses, before any work, a tracker whose library is not installed."""
    from dpo_ray.tracking import TrackingSettings, missing_backends
    from pipeline.config import ConfigError

    if not cfg.report_to:
        return None
    missing = missing_backends(cfg.report_to)
    if missing:
        raise ConfigError(
            f"tracking.report_to asks for {', '.join(missing)}, not installed here: pip install 'dpo-ray[tracking]' "
            "(tensorboard, mlflow-skinny, wandb)"
        )
    name = cfg.name or "/".join(key.rstrip("/").split("/")[-2:-1]) or key
    return TrackingSettings.from_env(cfg.report_to, cfg.dir.removeprefix("file://"), cfg.experiment, key, name)


def matching_tokenizer(found: str, model: str, manifest: Any, artifact: str) -> str:
    """`found`, the fingerprint of `model`'s tokenizer, which must be the one `artifact` (its manifest) was made
    with."""
    from dpo_ray.artifacts import ArtifactError

    expected = manifest.fingerprints.get("tokenizer")
    if found != expected:
        raise ArtifactError(
            f"{artifact} was tokenized with tokenizer {expected}, but model {model} has tokenizer {found}: "
            "use the same tokenizer in every stage (rerun prepare with prepare.tokenizer set to this model's)"
        )
    return found


def unique_prompts(uri: str, manifest: Any, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Unique prompts (by text) of one split of a `pairs` artifact, ordered by prompt id; 3 columns are read."""
    from dpo_ray import artifacts
    from dpo_ray.tokenization import prompt_id

    seen: dict[str, dict[str, Any]] = {}
    for shard in manifest.shards:
        for row in artifacts.read_shard(uri, shard, ["prompt", "prompt_ids", "split"]).to_pylist():
            if row["split"] == split and row["prompt"] not in seen:
                seen[row["prompt"]] = {
                    "prompt_id": prompt_id(row["prompt"]),
                    "prompt": row["prompt"],
                    "prompt_ids": row["prompt_ids"],
                }
    prompts = sorted(seen.values(), key=lambda r: r["prompt_id"])
    return prompts[:limit] if limit else prompts
