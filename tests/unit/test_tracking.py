"""dpo_ray.train.tracking writes what each library's own reader reads back: TensorBoard event files, an MLflow file
store, W&B offline runs; the same key resumes the same run."""

from __future__ import annotations

import pytest

from dpo_ray.train.tracking import Tracker, TrackingSettings, flatten, missing_backends, train_names
from tests.tracking_readers import mlflow_run, tensorboard_scalars, tensorboard_tags, wandb_offline

ALL = ("tensorboard", "mlflow", "wandb")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    if missing_backends(ALL):
        pytest.skip(f"tracking libraries not installed: {missing_backends(ALL)}")


def test_train_names_follow_trl():
    named = train_names({"loss": 0.5, "rewards/chosen": 0.1, "eval/loss": 0.6, "step": 3, "epoch": 0, "x": "a"})
    assert named == {"train/loss": 0.5, "train/rewards/chosen": 0.1, "eval/loss": 0.6, "train/epoch": 0.0}
    assert flatten({"train": {"beta": 0.1, "lora": None, "report_to": ["mlflow"]}, "run": "r"}) == {
        "train.beta": "0.1",
        "train.lora": "null",
        "train.report_to": '["mlflow"]',
        "run": "r",
    }


@pytest.mark.parametrize("same_second", [False, True])
def test_every_backend_reads_back_params_metrics_and_a_resumed_run(offline, tmp_path, monkeypatch, same_second):
    if same_second:  # W&B names offline runs by start second; a resume within it gets a "-1" directory
        from wandb.sdk import wandb_settings

        monkeypatch.setattr(wandb_settings.Settings, "timespec", property(lambda self: "20260101_000000"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = tmp_path / "plot.png"
    plt.figure(figsize=(2, 2))
    plt.plot([0, 1], [1, 0])
    plt.savefig(plot)
    plt.close()

    settings = TrackingSettings(ALL, str(tmp_path / "tracking"), "exp", "s3://bucket/run/export", "run/train")
    first = Tracker(settings)
    first.params({"train": {"beta": 0.1, "lr": 1e-3}})
    for step in (1, 2, 3):
        first.metrics(train_names({"loss": 1.0 / step, "rewards/margins": 0.1 * step}), step)
    first.close()
    second = Tracker(settings)  # a restart (or the evaluate stage of this policy): the same run
    assert second.wandb_run_id == first.wandb_run_id and second.mlflow_run_id == first.mlflow_run_id
    second.metrics(train_names({"loss": 0.2, "eval/loss": 0.3}), 4)
    second.summary({"evaluate/kl": 1.5}, 4)
    second.tag("export", "s3://bucket/run/export")
    second.text("summary.md", "| a | b |")
    second.image("evaluate/plot", str(plot), 4)
    second.close()

    tb = tensorboard_scalars(str(tmp_path / "tracking" / "tensorboard" / "run-train"))
    assert tb["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, pytest.approx(0.2))]
    assert tb["eval/loss"] == [(4, pytest.approx(0.3))] and tb["evaluate/kl"] == [(4, 1.5)]
    assert "evaluate/plot" in tensorboard_tags(str(tmp_path / "tracking" / "tensorboard" / "run-train"))["images"]

    ml = mlflow_run(f"file:{tmp_path / 'tracking' / 'mlruns'}", "exp", "s3://bucket/run/export")
    assert ml["params"]["train.beta"] == "0.1" and ml["params"]["train.lr"] == "0.001"
    assert [s for s, _ in ml["metrics"]["train/loss"]] == [1, 2, 3, 4]
    assert ml["metrics"]["train/rewards/margins"][2] == (3, pytest.approx(0.3))
    assert ml["metrics"]["evaluate/kl"] == [(4, 1.5)] and ml["tags"]["export"] == "s3://bucket/run/export"
    assert sorted(ml["artifacts"]) == ["plots/plot.png", "summary.md"]

    wb = wandb_offline(str(tmp_path / "tracking"), str(first.wandb_run_id))
    assert wb["config"]["train"] == {"beta": 0.1, "lr": 0.001}
    assert [s for s, _ in wb["history"]["train/loss"]] == [1, 2, 3, 4]
    assert wb["history"]["eval/loss"] == [(4, pytest.approx(0.3))]
    assert wb["summary"]["evaluate/kl"] == 1.5 and wb["summary"]["export"] == "s3://bucket/run/export"
