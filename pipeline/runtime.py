"""Ray start-up shared by the stages: join a cluster when one is configured, else start a local one."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ensure_ray", "unwrap_user_error"]


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS (e.g. inside `ray job submit`) or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Local mode: no dashboard (nothing listens beyond what Ray needs, all on this machine).
    kwargs: dict[str, Any] = {"include_dashboard": False} if not address else {}
    ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    logger.info("ray: %s", ray.cluster_resources())


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
