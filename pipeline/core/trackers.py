"""The experiment trackers of a train or evaluate `tracking` section (dpo_ray.train.tracking does the logging)."""

from __future__ import annotations

from typing import Any

__all__ = ["tracking_settings"]


def tracking_settings(cfg: Any, key: str) -> Any:
    """dpo_ray.train.tracking.TrackingSettings of a train or evaluate `tracking` section (None without report_to);
    refuses, before any work, a tracker whose library is not installed."""
    from dpo_ray.train.tracking import TrackingSettings, missing_backends
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
