"""Typed configuration: one pydantic model per stage, nested in PipelineConfig.

Configs are frozen and reject unknown keys; they are validated once, at the edge (YAML + dotted
`key=value` overrides), and the resolved stage config is written into each artifact's manifest.
base: the shared pieces; stages: prepare, reference, generate, evaluate, demo; train: the train section and its
sub-sections; load: PipelineConfig and load_config. docs/reference/config.md is generated from these models.
"""

from pipeline.config.base import ConfigError, StrictModel, TrackingConfig, model_of
from pipeline.config.load import (
    MOVED_KEYS,
    REMOVED_KEYS,
    GateConfig,
    PipelineConfig,
    current_identity,
    load_config,
    reference_free,
)
from pipeline.config.stages import (
    ColumnMap,
    DemoConfig,
    EvaluateConfig,
    GenerateConfig,
    PrepareConfig,
    ReferenceConfig,
    VllmConfig,
)
from pipeline.config.train import (
    BatchingConfig,
    CheckpointConfig,
    LoraConfig,
    OptimConfig,
    TrainConfig,
    WorkersConfig,
)

__all__ = [
    "MOVED_KEYS",
    "REMOVED_KEYS",
    "BatchingConfig",
    "CheckpointConfig",
    "ColumnMap",
    "ConfigError",
    "DemoConfig",
    "EvaluateConfig",
    "GateConfig",
    "GenerateConfig",
    "LoraConfig",
    "OptimConfig",
    "PipelineConfig",
    "PrepareConfig",
    "ReferenceConfig",
    "StrictModel",
    "TrackingConfig",
    "TrainConfig",
    "VllmConfig",
    "WorkersConfig",
    "current_identity",
    "load_config",
    "model_of",
    "reference_free",
]
