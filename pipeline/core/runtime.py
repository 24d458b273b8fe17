"""Ray start-up shared by the stages: join a cluster when one is configured, else start a local one; whether a
pool of actors fits it; a user error out of a Ray task's error chain."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["check_pool_fits", "embedded", "ensure_ray", "unwrap_user_error"]


def embedded() -> bool:
    """Whether this process runs the embedded local Ray (no RAY_ADDRESS): a fixed set of CPUs, no autoscaler, no
    dashboard, ending with the process. Otherwise it is connected to a cluster."""
    return not os.environ.get("RAY_ADDRESS")


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

    if not embedded():
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
