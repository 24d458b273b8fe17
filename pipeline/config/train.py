"""The train section: the loss (dpo_ray.objective.spec.LossSpec), optimizer, batching, workers, checkpoints,
tracking and LoRA, each validated where it lives."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dpo_ray.objective.health import HealthSpec
from dpo_ray.objective.spec import LossSpec
from pipeline.config.base import StrictModel, TrackingConfig


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names adapted."
    )
    save_adapter: bool = Field(False, description="Also save the adapter alone under <export>/adapter/.")


class OptimConfig(StrictModel):
    name: Literal["adamw", "rmsprop"] = Field("adamw", description="AdamW, or RMSprop (the DPO paper's).")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")


class BatchingConfig(StrictModel):
    """How the policy's log-probs are computed (docs/explanation/batching.md); `auto` is decided once, by the
    train stage before any work, from the device and the model (pipeline.stages.train._batching)."""

    mode: Literal["auto", "padded", "packed", "prefix_shared"] = Field(
        "auto",
        description="packed: padding-free rows of whole sequences; prefix_shared: padding-free, each pair as "
        "[prompt, chosen, rejected] with the prompt computed once; padded rows; auto: the fastest measured on "
        "the device (packed on GPU, prefix_shared on CPU), padded for a model the padding-free modes cannot "
        "compute exactly.",
    )
    attention: Literal["auto", "blocks", "flex"] = Field(
        "auto",
        description="packed / prefix_shared attention kernel: blocks (one SDPA call per sequence block) or flex "
        "(one FlexAttention call per row with a block mask; GPU only: torch has no FlexAttention backward on CPU); "
        "auto: blocks (the measured choice; benchmarks/RESULTS.md).",
    )
    fused_head: bool = Field(
        False,
        description="packed / prefix_shared: completion log-probs through a fused LM head that holds one chunk's "
        "logits at a time (never tokens x vocab; dpo_ray.compute.fused_head).",
    )
    fused_head_from: int = Field(
        8192,
        ge=0,
        description="packed / prefix_shared: a row (micro-batch) of at least this many tokens takes the fused head "
        "even with fused_head false, since its unfused logits would be the step's largest tensor; 0: never. Not "
        "for a model whose logits the fused head cannot compute (a logit scale): those rows stay unfused.",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (the padding-free attention runs eagerly inside)."
    )
    token_budget: int = Field(16_384, ge=1, description="Max computed tokens per micro-batch (accumulation).")

    @model_validator(mode="after")
    def _segment_only(self) -> BatchingConfig:
        for key, on in (("fused_head", self.fused_head), ("attention: flex", self.attention == "flex")):
            if on and self.mode == "padded":
                raise ValueError(f"batching.{key} works with mode packed, prefix_shared or auto, not padded")
        return self


class WorkersConfig(StrictModel):
    count: int = Field(1, ge=0, description="Ray Train workers (0: local mode in the driver process).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU with gloo.")
    resources: dict[str, float] = Field(default_factory=dict, description="Per worker, e.g. {CPU: 8, GPU: 1}.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type for workers, e.g. H100.")
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="DDP, or FSDP2 (fully_shard) per layer.")
    max_failures: int = Field(2, ge=-1, description="Worker-failure restarts from the last checkpoint (-1: no limit).")


class CheckpointConfig(StrictModel):
    storage_path: str = Field("", description="Ray Train storage for checkpoints; default <run_dir>/checkpoints.")
    every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept (the latest K).")


class TrainConfig(StrictModel):
    model: str = Field(description="Initial policy: local dir, URI or hub id (usually the reference model).")
    scored: str = Field(
        "",
        description="Input `scored` artifact; default <run_dir>/scored. A reference-free loss (simpo, orpo) also "
        "takes a `pairs` artifact (default <run_dir>/pairs): no reference stage needed.",
    )
    output: str = Field("", description="Run directory for metrics.jsonl; default <run_dir>/train.")
    export: str = Field("", description="Exported HF model dir; default <run_dir>/export.")
    run_name: str = Field("dpo", description="Ray Train run name; a restart with the same name resumes.")
    loss: LossSpec = Field(default_factory=LossSpec, description="The loss: docs/reference/losses.md.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and learning-rate schedule.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="How log-probs are computed.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Ray Train workers and resources.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints (resume).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment trackers.")
    batch_size: int = Field(32, ge=1, description="Global batch: pairs per optimizer step, across workers.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; default: epochs over the train split.")
    epochs: int = Field(1, ge=1, description="Passes over the train split when max_steps is not set.")
    seed: int = Field(0, description="Seed for initialisation order, dropout and RNG state.")
    log_every: int = Field(1, ge=1, description="Log and record metrics every N steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the eval split every N steps (0: at the end only).")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, float32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    health: HealthSpec = Field(
        default_factory=HealthSpec, description="Training-health guards (docs/explanation/health.md)."
    )
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters only (peft); the export is merged (vLLM loads it as a plain model)."
    )
    initial_check_tolerance: float | None = Field(
        None,
        gt=0,
        description="Step-0 check when policy == reference: bound on |margins| (the loss's bound is scaled by its "
        "slope); default 1e-3 in float32, 5e-2 under bf16 autocast.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model repo.")
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="Workers that share each micro-batch's tokens (Ulysses sequence parallelism: an all-to-all "
        "around attention, dpo_ray.compute.sequence_parallel); workers.count / k groups train disjoint pairs. "
        "packed or prefix_shared batching only, without an AOT loss; k must divide the model's query heads and "
        "either divide its key-value heads or be a multiple of them (each key-value head is then repeated).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        k = self.sequence_parallel
        if k > 1:
            problems = [
                what
                for what, on in (
                    (f"workers.count {self.workers.count} is not a multiple of it", self.workers.count % k != 0),
                    ("batching.mode padded (a padding-free mode shards one row)", self.batching.mode == "padded"),
                    (f"loss {self.loss.label} (AOT sorts a batch gathered from every worker)", self.loss.sorting),
                )
                if on
            ]
            if problems:
                raise ValueError(f"sequence_parallel {k}: {'; '.join(problems)}")
        if self.batch_size % max(1, self.workers.count):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by workers.count ({self.workers.count})"
            )
        if self.batching.attention == "flex" and not self.workers.use_gpu:
            raise ValueError(
                "batching.attention: flex needs workers.use_gpu: true (torch has no FlexAttention backward on CPU); "
                "use blocks or auto"
            )
        return self

    @property
    def reference_free(self) -> bool:
        """No member of the loss needs reference log-probs (simpo, orpo, sft)."""
        return self.loss.reference_free
