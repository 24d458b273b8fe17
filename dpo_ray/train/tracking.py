"""Experiment tracking: TensorBoard, MLflow and Weights & Biases, any subset, through their own libraries
(optional extras: `pip install 'dpo-ray[tracking]'`).

One tracker run per `key` (train: its export URI; evaluate: its policy, which is that export): a train stage
restarted from a checkpoint, and the evaluate stage of the same policy, write into the same run.

- TensorBoard: event files under `<directory>/tensorboard/<name>` (a restart adds an event file there).
- MLflow: `MLFLOW_TRACKING_URI` when set (a server, a database), else a file store at `<directory>/mlruns`
  (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true for it; set when unset); experiment `experiment`; the run is
  found again by its `dpo_ray.key` tag.
- W&B: project `experiment`, run id derived from `key` (resume="allow"), files under `<directory>/wandb`;
  `WANDB_MODE=offline` keeps everything local (`wandb sync` uploads it later).

Metric names follow what TRL users see in their trackers: `train/loss`, `train/rewards/chosen`,
`eval/rewards/margins`, ...; evaluate's numbers are `evaluate/...`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "Tracker", "TrackingSettings", "flatten", "missing_backends", "train_names"]

BACKENDS = ("tensorboard", "mlflow", "wandb")
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


@dataclass(frozen=True)
class TrackingSettings:
    """Where and as what one tracker run is written (see the module docstring)."""

    report_to: tuple[str, ...]
    directory: str
    experiment: str
    key: str
    name: str
    mlflow_uri: str = ""  # "": MLFLOW_TRACKING_URI of the process, else the file store under `directory`
    wandb_mode: str | None = None  # None: WANDB_MODE of the process (online by default)

    @classmethod
    def from_env(
        cls, report_to: Sequence[str], directory: str, experiment: str, key: str, name: str
    ) -> TrackingSettings:
        """Settings with the tracker environment of this process (the driver's) fixed in them, so that Ray
        workers, started with another environment, write where the driver would."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(os.path.abspath(directory), "mlruns")
        return cls(tuple(report_to), directory, experiment, key, name, uri, os.environ.get("WANDB_MODE"))


def missing_backends(report_to: Sequence[str]) -> list[str]:
    """The requested trackers whose library is not installed (checked before any work starts)."""
    import importlib.util

    return [b for b in report_to if importlib.util.find_spec(_MODULES[b]) is None]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"train.beta": "0.1", ...} (values as JSON text, lists included)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def train_names(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A train step's metrics under their tracker names: `eval/...` as is, the rest under `train/`; the step
    itself (the x axis) and non-numbers left out."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue
        out[k if k.startswith("eval/") else f"train/{k}"] = float(v)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


class Tracker:
    """The tracker run of `settings.key` in every requested backend, opened (or resumed) on construction."""

    def __init__(self, settings: TrackingSettings) -> None:
        self.settings = settings
        self._tb: Any = None
        self._mlflow: Any = None
        self._mlflow_run: str | None = None
        self._wandb: Any = None
        os.makedirs(settings.directory, exist_ok=True)
        if "tensorboard" in settings.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(settings.directory, "tensorboard", _slug(settings.name)))
        if "mlflow" in settings.report_to:
            self._open_mlflow()
        if "wandb" in settings.report_to:
            import wandb

            digest = hashlib.sha256(settings.key.encode()).hexdigest()[:16]
            self._wandb = wandb.init(
                project=settings.experiment,
                name=settings.name,
                id=f"dpo-{digest}",
                resume="allow",
                dir=settings.directory,
                reinit="create_new",
                mode=settings.wandb_mode or os.environ.get("WANDB_MODE") or "online",  # type: ignore[arg-type]
            )

    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow_run

    @property
    def wandb_run_id(self) -> str | None:
        return None if self._wandb is None else str(self._wandb.id)

    def _open_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient

        s = self.settings
        uri = (
            s.mlflow_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or "file:" + os.path.join(os.path.abspath(s.directory), "mlruns")
        )
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch (a database is preferred)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(s.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(s.experiment)
        key = s.key.replace("'", "\\'")
        found = client.search_runs([experiment_id], filter_string=f"tags.`dpo_ray.key` = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(
                experiment_id, run_name=s.name, tags={"dpo_ray.key": s.key, "mlflow.runName": s.name}
            ).info.run_id
        self._mlflow, self._mlflow_run = client, run_id

    def params(self, params: Mapping[str, Any]) -> None:
        """Config values (nested dicts flattened to dotted keys): MLflow params, W&B config, TensorBoard text."""
        flat = flatten(params)
        if self._mlflow is not None:
            from mlflow.entities import Param

            items = [Param(k, v[:6000]) for k, v in flat.items()]
            for i in range(0, len(items), 100):  # the file store takes at most 100 params per batch
                self._mlflow.log_batch(self._mlflow_run, params=items[i : i + 100])
        if self._wandb is not None:
            self._wandb.config.update(dict(params), allow_val_change=True)
        if self._tb is not None:
            table = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
            self._tb.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if not values:
            return
        self._scalars(values, step)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def summary(self, values: Mapping[str, float], step: int) -> None:
        """Final numbers (evaluate's, the run summary's): metrics at `step`, and W&B's run summary (W&B drops a
        history row whose step is below one it has seen, so there they go to the summary only)."""
        self._scalars(values, step)
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def _scalars(self, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars and MLflow metrics at `step`."""
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._mlflow is not None and values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            ms = [Metric(_mlflow_name(k), float(v), now, step) for k, v in values.items()]
            self._mlflow.log_batch(self._mlflow_run, metrics=ms)

    def tag(self, key: str, value: str) -> None:
        """A string attached to the run (e.g. the export path): MLflow tag, W&B summary, TensorBoard text."""
        if self._mlflow is not None:
            self._mlflow.set_tag(self._mlflow_run, key, value)
        if self._wandb is not None:
            self._wandb.summary[key] = value
        if self._tb is not None:
            self._tb.add_text(key, value, 0)

    def text(self, name: str, text: str) -> None:
        """A document (e.g. the summary table in Markdown)."""
        if self._mlflow is not None:
            self._mlflow.log_text(self._mlflow_run, text, name)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Html(f"<pre>{text}</pre>")}, commit=False)
        if self._tb is not None:
            self._tb.add_text(name, text, 0)

    def image(self, name: str, path: str, step: int) -> None:
        """A PNG file (a plot)."""
        if self._mlflow is not None:
            self._mlflow.log_artifact(self._mlflow_run, path, "plots")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(path)}, commit=False)
        if self._tb is not None:
            import matplotlib.image

            pixels = matplotlib.image.imread(path)[..., :3]
            self._tb.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run)
        if self._wandb is not None:
            self._wandb.finish()


def _mlflow_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces; anything else becomes _."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)
