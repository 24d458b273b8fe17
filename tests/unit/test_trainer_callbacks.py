"""On the embedded Ray, train's TorchTrainer runs without Ray Train's PlacementGroupCleaner (it needs the State API,
which the embedded Ray has no dashboard to serve: pipeline.stages.train._trainer_class); on a cluster it keeps it."""

from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from pipeline.stages.train import _trainer_class


def _callbacks(trainer_class) -> list[type]:
    trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    return [type(c) for c in trainer._create_default_callbacks()]


def test_embedded_ray_trains_without_the_placement_group_cleaner(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    embedded = _callbacks(_trainer_class())
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cluster = _callbacks(_trainer_class())
    # Ray Train still adds the cleaner (else this test no longer tests anything), and only it is left out.
    assert PlacementGroupCleanerCallback in cluster
    assert PlacementGroupCleanerCallback not in embedded
    assert [c for c in cluster if c is not PlacementGroupCleanerCallback] == embedded
