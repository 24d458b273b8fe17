"""What every config section shares: strict frozen models, the error a user can fix, tracking, paths."""

from __future__ import annotations

import os
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dpo_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key."""


def _absolute(path: str) -> str:
    """A local path made absolute; URIs (scheme://) unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _absolute_ref(ref: str) -> str:
    """Like _absolute for a reference that is a local path (dpo_ray.models.loading.ref_kind); URIs and hub ids
    unchanged."""
    from dpo_ray.models.loading import ref_kind

    return _absolute(ref) if ref_kind(ref) == "local" and not ref.startswith("file://") else ref


class StrictModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrackingConfig(StrictModel):
    """Experiment tracking (`train.tracking`, `evaluate.tracking`; under `run`, evaluate without report_to uses
    its train stage's)."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] | None = Field(
        None,
        description="Experiment trackers to log to, any of tensorboard, mlflow, wandb (pip extra `tracking`); "
        "default none (evaluate under `run`: train's). Train logs from rank 0: the config, every step's metrics, "
        "the export; evaluate logs its numbers and plots to the same tracker run.",
    )
    dir: str = Field(
        "",
        description="Local directory for TensorBoard events, the MLflow file store and W&B files; default "
        "<run_dir>/tracking.",
    )
    experiment: str = Field("dpo-ray", description="MLflow experiment and W&B project name.")
    name: str = Field(
        "", description="Tracker run name; default: the parent directory of the export (train) or policy (evaluate)."
    )

    @model_validator(mode="after")
    def _local_tracking(self) -> TrackingConfig:
        if self.report_to and "://" in self.dir and not self.dir.startswith("file://"):
            raise ValueError(
                f"tracking.dir {self.dir} is not a local directory: TensorBoard event files, the MLflow file "
                "store and W&B's run files are written as they come; set tracking.dir to a local path (an "
                "object-store run_dir gives no local default)"
            )
        return self


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation like `X`, `X | None` or `Optional[X]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = model_of(arg)
            if found is not None:
                return found
    return None
