"""Typed configuration: one pydantic model per stage, nested in PipelineConfig.

Configs are frozen and reject unknown keys; they are validated once, at the edge (YAML + dotted
`key=value` overrides), and the resolved stage config is written into each artifact's manifest.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dpo_ray.errors import UserError
from dpo_ray.loss_spec import ENTRIES, SFT, LossSpec

__all__ = [
    "ColumnMap",
    "ConfigError",
    "PipelineConfig",
    "PrepareConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "ReferenceConfig",
    "TrainConfig",
    "load_config",
]


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key."""


def reference_free(loss: Any) -> bool:
    """Whether a raw `train.loss` section (a dict, before validation) needs no reference log-probs."""
    raw = loss.get("name", "sigmoid") if isinstance(loss, dict) else None
    names = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    known = all(isinstance(n, str) and (n == SFT or n in ENTRIES) for n in names)
    return bool(known and names) and all(n == SFT or ENTRIES[n].reference_free for n in names)


# (section, key, artifact name under run_dir) filled in when a config leaves the path empty.
_DEFAULT_PATHS = [
    ("demo", "assets", "assets"),
    ("prepare", "output", "pairs"),
    ("reference", "pairs", "pairs"),
    ("reference", "output", "scored"),
    ("train", "scored", "scored"),
    ("train", "output", "train"),
    ("train", "export", "export"),
    ("train", "checkpoint.storage_path", "checkpoints"),
    ("generate", "prompts", "pairs"),
    ("generate", "generations", "generations"),
    ("generate", "output", "generated_pairs"),
    ("evaluate", "policy", "export"),
    ("evaluate", "prompts", "pairs"),
    ("evaluate", "scored", "scored"),
    ("evaluate", "train_metrics", "train"),
    ("evaluate", "output", "eval"),
    ("train", "tracking.dir", "tracking"),
    ("evaluate", "tracking.dir", "tracking"),
]


# Per section: keys that are always local paths or URIs, and model/data references (maybe hub ids).
_PATH_KEYS = {
    "demo": {"paths": {"assets"}, "refs": set()},
    "prepare": {"paths": {"output"}, "refs": {"tokenizer"}},
    "reference": {"paths": {"pairs", "output"}, "refs": {"model"}},
    "train": {"paths": {"scored", "output", "export", "checkpoint.storage_path", "tracking.dir"}, "refs": {"model"}},
    "generate": {"paths": {"prompts", "generations", "output"}, "refs": {"policy"}},
    "evaluate": {
        "paths": {"prompts", "scored", "train_metrics", "output", "tracking.dir"},
        "refs": {"policy", "reference"},
    },
}


def _absolute(path: str) -> str:
    """A local path made absolute; URIs (scheme://) unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _absolute_ref(ref: str) -> str:
    """Like _absolute for a reference that is a local path (dpo_ray.models.ref_kind); URIs and hub ids unchanged."""
    from dpo_ray.models import ref_kind

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


class ColumnMap(StrictModel):
    prompt: str | None = Field(
        "prompt",
        description="Input column holding the prompt (text or message list); null: no prompt column, the prompt "
        "is what chosen and rejected share (implicit and conversational formats).",
    )
    chosen: str = Field("chosen", description="Input column holding the preferred completion or dialog.")
    rejected: str = Field("rejected", description="Input column holding the dispreferred completion or dialog.")


class PrepareConfig(StrictModel):
    inputs: list[str] = Field(
        description="Files, directories or globs (local or fsspec URIs: s3://, gs://), a dataset saved with "
        "datasets' save_to_disk, or a hub dataset name (with input_type: hf_hub).",
        min_length=1,
    )
    input_type: Literal["auto", "jsonl", "json", "parquet", "csv", "hf_disk", "hf_hub"] = Field(
        "auto", description="How to read inputs; auto decides from file extensions and directory contents."
    )
    hf_split: str = Field("train", description="Split to read from a hub dataset or a saved DatasetDict.")
    format: Literal["auto", "explicit", "implicit", "conversational"] = Field(
        "auto",
        description="explicit: prompt/chosen/rejected text; implicit: HH-style full dialogs in chosen/rejected; "
        "conversational: message lists. auto decides per record.",
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Maps prompt/chosen/rejected to input columns.")
    implicit_marker: str = Field(
        "\n\nAssistant:", description="Implicit format: the prompt ends with the last occurrence of this text."
    )
    tokenizer: str = Field(description="Tokenizer: a local dir, fsspec URI or hub id (the policy's tokenizer).")
    trust_remote_code: bool = Field(False, description="Allow custom tokenizer code from the model repo.")
    max_length: int = Field(1024, gt=1, description="Max prompt + completion tokens of one sequence.")
    max_prompt_length: int = Field(512, ge=1, description="Max prompt tokens.")
    truncation: Literal["keep_start", "keep_end", "drop"] = Field(
        "keep_end",
        description="Over-long prompts keep their start or end (BOS kept); completions keep their start; "
        "drop rejects the pair as too_long.",
    )
    max_text_chars: int = Field(1_000_000, ge=1, description="Reject a text field longer than this (text_too_long).")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of pairs in the eval split (by hash).")
    dedup: bool = Field(True, description="Drop exact duplicate pairs (same pair_id); they go to rejects.")
    rows_per_shard: int = Field(100_000, ge=1, description="Upper bound on rows per output Parquet shard.")
    num_actors: int = Field(1, ge=1, description="Tokenizer actors (Ray Data actor pool size).")
    batch_size: int = Field(512, ge=1, description="Records per tokenization batch.")
    output: str = Field("", description="Output artifact directory; default <run_dir>/pairs.")

    @model_validator(mode="after")
    def _lengths(self) -> PrepareConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        return self


class VllmConfig(StrictModel):
    """vLLM engine and actor-pool settings shared by the stages that run vLLM (reference, generate)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Model precision.")
    max_model_len: int = Field(2048, ge=2, description="Longest sequence (prompt + completion).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM memory fraction for weights + KV cache (on CPU: of host memory; use ~0.1)."
    )
    max_num_batched_tokens: int | None = Field(None, ge=1, description="vLLM scheduler token budget per step.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans.")
    num_actors: int = Field(1, ge=1, description="vLLM actors (one engine each).")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs each actor requests (>= tensor_parallel_size on GPU).")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs each actor requests.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type for the actors, e.g. H100.")
    start_timeout_s: float = Field(
        900,
        gt=0,
        description="On a cluster: how long to wait for the first actor to be placed (nodes take minutes to "
        "launch) before failing with the resources asked for and the cluster's node types.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model repo.")
    seed: int = Field(0, description="Engine seed (generate: also the base of per-prompt sampling seeds).")
    enforce_eager: bool | None = Field(
        None,
        description="Skip vLLM's torch.compile and graph capture. Default: true without a GPU (compiling costs "
        "~30 s per engine start on CPU), false on GPU.",
    )
    in_process: bool | None = Field(
        None,
        description="Run vLLM's engine core inside the actor process instead of spawning its own processes "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0). Default: true without a GPU (saves ~25 s of process start per "
        "engine), false on GPU (the separate core overlaps scheduling with the forward).",
    )

    @model_validator(mode="after")
    def _gpus(self) -> VllmConfig:
        # A fraction of one GPU is fine for one engine (two engines can share a card, each with its
        # gpu_memory_utilization); an engine spanning several GPUs needs them all.
        if self.tensor_parallel_size > 1 and 0 < self.num_gpus_per_actor < self.tensor_parallel_size:
            raise ValueError(
                f"num_gpus_per_actor ({self.num_gpus_per_actor}) < tensor_parallel_size ({self.tensor_parallel_size})"
            )
        return self


class ReferenceConfig(VllmConfig):
    model: str = Field(description="Frozen reference model: local dir, fsspec URI or hub id (safetensors).")
    pairs: str = Field("", description="Input `pairs` artifact; default <run_dir>/pairs.")
    output: str = Field("", description="Output `scored` artifact; default <run_dir>/scored.")
    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm, or a transformers forward (no vLLM needed).")
    rows_per_unit: int = Field(1024, ge=1, description="Pairs per unit of work; a unit is the resume granularity.")
    hf_token_budget: int = Field(16_384, ge=1, description="hf backend / parity: padded tokens per forward.")
    parity_samples: int = Field(32, ge=0, description="Pairs re-scored with a transformers forward (0: skip).")
    parity_tolerance: float | None = Field(
        None, gt=0, description="Max per-token |vLLM - HF| log-prob; default 1e-4 (float32), 0.15 (bf16/fp16)."
    )

    @property
    def tolerance(self) -> float:
        if self.parity_tolerance is not None:
            return self.parity_tolerance
        return 1e-4 if self.dtype == "float32" else 0.15

    @model_validator(mode="after")
    def _backend_keys(self) -> ReferenceConfig:
        # Keys of the vLLM engine and its parity gate, set for a transformers forward, would change nothing. By
        # value, not by whether they were set: the handlers validate the dumped config (every key set) again.
        fields = type(self).model_fields
        ignored = [k for k in _VLLM_ONLY if getattr(self, k) != fields[k].default] if self.backend == "hf" else []
        if ignored:
            raise ValueError(
                f"reference.backend hf runs a transformers forward: {', '.join(ignored)} apply to backend vllm "
                "only; remove them or use backend: vllm"
            )
        return self


# ReferenceConfig keys that only the vLLM backend reads (the engine, its seed, and the parity gate against hf).
_VLLM_ONLY = (
    "gpu_memory_utilization", "max_num_batched_tokens", "tensor_parallel_size", "enforce_eager", "in_process",
    "seed", "parity_samples", "parity_tolerance",
)  # fmt: skip


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
    train stage before any work, from the device and the model (pipeline.train._batching)."""

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
        "logits at a time (never tokens x vocab; dpo_ray.fused_head).",
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
    fault_injection: str | None = Field(
        None,
        pattern=r"^\d+:\d+(:node)?$",
        description="Testing only: 'STEP:RANK' exits that rank once; 'STEP:RANK:node' kills its node (raylet) once.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
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


class GenerateConfig(VllmConfig):
    policy: str = Field(description="Policy that samples: an HF dir (e.g. the train stage's export) or hub id.")
    prompts: str = Field(
        "", description="`pairs` artifact whose unique train prompts are used; default <run_dir>/pairs."
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many prompts (the first by prompt_id).")
    n: int = Field(4, ge=2, description="Samples per prompt.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int = Field(64, ge=1, description="Max completion tokens.")
    reward: str = Field("lexicon", description="lexicon | model:<dir> | <module>:<function>.")
    strategy: Literal["best_vs_worst", "margin", "all_pairs"] = Field("best_vs_worst", description="Pairing.")
    margin: float = Field(0.0, ge=0, description="margin strategy: minimum reward gap.")
    max_pairs_per_prompt: int = Field(1, ge=1, description="margin/all_pairs: at most this many pairs per prompt.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of new pairs in the eval split.")
    prompts_per_unit: int = Field(64, ge=1, description="Prompts per unit of work; a unit is the resume granularity.")
    generations: str = Field("", description="Output `generations` artifact; default <run_dir>/generations.")
    output: str = Field("", description="Output `pairs` artifact; default <run_dir>/generated_pairs.")

    @model_validator(mode="after")
    def _strategy_keys(self) -> GenerateConfig:
        # Keys of another pairing strategy would change nothing (dpo_ray.pairing); by value, as reference's.
        fields = type(self).model_fields
        ignored = [k for k in ("margin",) if self.strategy != "margin" and self.margin != fields[k].default]
        if self.strategy == "best_vs_worst" and self.max_pairs_per_prompt != fields["max_pairs_per_prompt"].default:
            ignored.append("max_pairs_per_prompt")
        if ignored:
            raise ValueError(
                f"generate.strategy {self.strategy} does not read {', '.join(ignored)} (margin: strategy margin; "
                "max_pairs_per_prompt: margin or all_pairs); remove them or change the strategy"
            )
        return self


class EvaluateConfig(VllmConfig):
    policy: str = Field("", description="Policy to evaluate (HF dir); default <run_dir>/export.")
    reference: str = Field(description="Reference model (the KL anchor and the baseline of the win rate).")
    prompts: str = Field(
        "", description="`pairs` artifact whose eval-split prompts are sampled; default <run_dir>/pairs."
    )
    scored: str = Field(
        "", description="`scored` artifact for preference accuracy on eval pairs; default <run_dir>/scored."
    )
    max_prompts: int = Field(64, ge=1, description="Held-out prompts sampled.")
    max_eval_pairs: int = Field(256, ge=0, description="Eval pairs for preference accuracy (0: skip).")
    n: int = Field(1, ge=1, description="Samples per prompt from each model.")
    temperature: float = Field(
        1.0, ge=0, description="Sampling temperature; 1.0 only: KL(π‖πref) is estimated from π's own samples."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; 1.0 only, as temperature.")
    max_tokens: int = Field(48, ge=1, description="Max completion tokens.")
    reward: str = Field("lexicon", description="lexicon | model:<dir> | <module>:<function>.")
    train_metrics: str = Field("", description="metrics.jsonl of the train stage, plotted; default <run_dir>/train.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment trackers.")
    output: str = Field("", description="Directory for eval.json, samples and plots; default <run_dir>/eval.")

    @model_validator(mode="after")
    def _unmodified_sampling(self) -> EvaluateConfig:
        # KL(π‖πref) = E_{y~π}[log π(y) − log πref(y)]: the mean log-ratio is that only for samples of π itself.
        # Tempered or truncated samples would give another number, still plotted and gated on as KL.
        for key, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if value != 1.0:
                raise ValueError(
                    f"evaluate.{key} {value}: the KL(π‖πref) estimate (the mean log-ratio of the policy's samples) "
                    f"is unbiased only for samples of the policy itself; use {key}: 1.0"
                )
        return self


class DemoConfig(StrictModel):
    assets: str = Field("", description="Where the generated data and tiny model go; default <run_dir>/assets.")
    pairs: int = Field(2000, ge=10, description="Generated review preference pairs.")
    seed: int = Field(0, description="Seed of the generated data and the tiny model's initialisation.")
    sft_steps: int = Field(0, ge=0, description="SFT steps of the tiny model on the review corpus (0: random init).")
    model: dict[str, int] = Field(
        default_factory=dict, description="build_tiny_llama overrides: hidden_size, num_layers, num_heads, ..."
    )


class PipelineConfig(StrictModel):
    run_dir: str = Field("runs/default", description="Root directory (or URI) of this run's artifacts.")
    demo: DemoConfig | None = Field(None, description="Generate demo data and a tiny model before the stages.")
    prepare: PrepareConfig | None = Field(None, description="Prepare stage settings.")
    reference: ReferenceConfig | None = Field(None, description="Reference stage settings.")
    train: TrainConfig | None = Field(None, description="Train stage settings.")
    generate: GenerateConfig | None = Field(None, description="Generate (on-policy) stage settings.")
    evaluate: EvaluateConfig | None = Field(None, description="Evaluate stage settings.")
    rounds: int = Field(1, ge=1, description="`run`: rounds of [prepare|generate] -> reference -> train -> evaluate.")
    round_reference: Literal["initial", "previous"] = Field(
        "initial", description="Reference model of rounds >= 1: the initial one, or the previous round's policy."
    )
    on_policy_first_round: bool = Field(
        False, description="Round 0 trains on pairs sampled by generate.policy (else on prepare's pairs)."
    )
    beta_sweep: list[float] = Field(
        default_factory=list,
        description="`run`: also train round 0's pairs with each of these β (under <run_dir>/beta-<β>/) and "
        "evaluate it: the points of the reward-vs-KL plot beside the main run's.",
    )

    @model_validator(mode="after")
    def _loop_needs(self) -> PipelineConfig:
        if (self.rounds > 1 or self.on_policy_first_round) and self.generate is None:
            raise ValueError("rounds > 1 and on_policy_first_round need a 'generate:' section")
        if self.rounds > 1 and self.train is None:
            raise ValueError("rounds > 1 needs a 'train:' section")
        if self.rounds > 1 and self.reference is None and self.train is not None:
            if not self.train.reference_free:
                label = self.train.loss.label
                raise ValueError(f"rounds > 1 needs a 'reference:' section (train.loss {label} uses one)")
        if self.beta_sweep and (self.train is None or self.evaluate is None):
            raise ValueError("beta_sweep needs 'train:' and 'evaluate:' sections")
        if any(b <= 0 for b in self.beta_sweep):
            raise ValueError(f"beta_sweep: every β must be > 0, found {self.beta_sweep}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_outputs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        run_dir = _absolute(str(data.get("run_dir", "runs/default")).rstrip("/"))
        data = {**data, "run_dir": run_dir}
        train = data.get("train")
        free = isinstance(train, dict) and reference_free(train.get("loss"))
        for section, key, name in _DEFAULT_PATHS:
            stage = data.get(section)
            if isinstance(stage, dict) and not _get(stage, key):
                if free and key == "scored":  # a reference-free loss trains (and is evaluated) on the pairs
                    name = "pairs"
                data = {**data, section: _set(stage, key, f"{run_dir}/{name}")}
        # Ray workers run in other directories: relative local paths are made absolute here, at the edge.
        for section, keys in _PATH_KEYS.items():
            stage = data.get(section)
            if not isinstance(stage, dict):
                continue
            for key in keys["paths"] | keys["refs"]:
                value = _get(stage, key)
                if isinstance(value, str):
                    stage = _set(stage, key, _absolute(value) if key in keys["paths"] else _absolute_ref(value))
            if isinstance(stage.get("inputs"), list):
                stage = {**stage, "inputs": [_absolute_ref(v) if isinstance(v, str) else v for v in stage["inputs"]]}
            data = {**data, section: stage}
        return data


def _get(section: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a raw section ("checkpoint.storage_path"), None where absent."""
    node: Any = section
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(section: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of a raw section with `value` at a dotted key (sub-sections created as needed, none mutated)."""
    head, _, rest = key.partition(".")
    if not rest:
        return {**section, head: value}
    child = section.get(head)
    return {**section, head: _set(child if isinstance(child, dict) else {}, rest, value)}


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


_TRACKING_MOVES = {"report_to": "report_to", "tracking_dir": "dir", "experiment": "experiment", "tracking_name": "name"}
# Keys of the flat train config that moved into its sections: refused with the new key, never read as aliases.
MOVED_KEYS: dict[str, str] = {
    **{f"train.{k}": f"train.loss.{k}" for k in LossSpec.model_fields if k not in ("name", "weights")},
    "train.loss_weights": "train.loss.weights",
    "train.optimizer": "train.optim.name",
    **{f"train.{k}": f"train.optim.{k}" for k in OptimConfig.model_fields if k != "name"},
    **{f"train.{k}": f"train.batching.{k}" for k in BatchingConfig.model_fields if k != "mode"},
    "train.num_workers": "train.workers.count",
    "train.resources_per_worker": "train.workers.resources",
    **{f"train.{k}": f"train.workers.{k}" for k in ("use_gpu", "accelerator_type", "parallelism", "max_failures")},
    "train.storage_path": "train.checkpoint.storage_path",
    "train.checkpoint_every": "train.checkpoint.every",
    "train.keep_checkpoints": "train.checkpoint.keep",
    **{f"{s}.{old}": f"{s}.tracking.{new}" for s in ("train", "evaluate") for old, new in _TRACKING_MOVES.items()},
}
# Sections that once were a single value: the key the value now goes to.
_SECTION_VALUE = {"train.loss": "name", "train.batching": "mode"}


def _check_keys(data: Any, model: type[BaseModel], prefix: str = "") -> None:
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if f"{prefix}{key}" in MOVED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' is now '{MOVED_KEYS[f'{prefix}{key}']}'")
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        sub = model_of(fields[key].annotation)
        if sub is not None and f"{prefix}{key}" in _SECTION_VALUE and not isinstance(value, dict | None):
            moved = f"{prefix}{key}.{_SECTION_VALUE[f'{prefix}{key}']}"
            raise ConfigError(f"'{prefix}{key}' is a section: its value {value!r} is now '{moved}'")
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.")


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value, e.g. prepare.max_length=512")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """PipelineConfig from a YAML file (or nothing) plus dotted key=value overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config {path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level, found {type(loaded).__name__}")
        data = loaded or {}
    for assignment in overrides:
        _apply_override(data, assignment)
    _check_keys(data, PipelineConfig)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            found = f" (found {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{loc or '<root>'}: {err['msg']}{found}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
