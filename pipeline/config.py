"""Typed configuration: one pydantic model per stage, nested in PipelineConfig.

Configs are frozen and reject unknown keys; they are validated once, at the edge (YAML + dotted
`key=value` overrides), and the resolved stage config is written into each artifact's manifest.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dpo_ray.errors import UserError

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


# The losses of the policy alone (dpo_ray.losses.REFERENCE_FREE, kept equal by a test; not imported here,
# so that loading a config needs no torch): train reads a `pairs` artifact and run has no reference stage.
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
LossName = Literal[
    "sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
    "apo_down", "discopop", "dpop", "simpo", "orpo", "bco_pair", "aot", "aot_unpaired", "aot_pair",
]  # fmt: skip
CombinedLoss = LossName | Literal["sft"]  # a member of a list of losses: "sft" is the chosen's NLL


def reference_free(loss: Any) -> bool:
    """Whether train.loss (a name or a list of names, "sft" included) needs no reference log-probs."""
    names = [loss] if isinstance(loss, str) else list(loss or [])
    return bool(names) and all(n in REFERENCE_FREE_LOSSES or n == "sft" for n in names)


# (section, key, artifact name under run_dir) filled in when a config leaves the path empty.
_DEFAULT_PATHS = [
    ("demo", "assets", "assets"),
    ("prepare", "output", "pairs"),
    ("reference", "pairs", "pairs"),
    ("reference", "output", "scored"),
    ("train", "scored", "scored"),
    ("train", "output", "train"),
    ("train", "export", "export"),
    ("train", "storage_path", "checkpoints"),
    ("generate", "prompts", "pairs"),
    ("generate", "generations", "generations"),
    ("generate", "output", "generated_pairs"),
    ("evaluate", "policy", "export"),
    ("evaluate", "prompts", "pairs"),
    ("evaluate", "scored", "scored"),
    ("evaluate", "train_metrics", "train"),
    ("evaluate", "output", "eval"),
    ("train", "tracking_dir", "tracking"),
    ("evaluate", "tracking_dir", "tracking"),
]


# Per section: keys that are always local paths or URIs, and model/data references (maybe hub ids).
_PATH_KEYS = {
    "demo": {"paths": {"assets"}, "refs": set()},
    "prepare": {"paths": {"output"}, "refs": {"tokenizer"}},
    "reference": {"paths": {"pairs", "output"}, "refs": {"model"}},
    "train": {"paths": {"scored", "output", "export", "storage_path", "tracking_dir"}, "refs": {"model"}},
    "generate": {"paths": {"prompts", "generations", "output"}, "refs": {"policy"}},
    "evaluate": {
        "paths": {"prompts", "scored", "train_metrics", "output", "tracking_dir"},
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


class TrackingFields(StrictModel):
    """Experiment tracking keys (train and evaluate; `run` gives evaluate the train stage's when unset)."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] | None = Field(
        None,
        description="Experiment trackers to log to, any of tensorboard, mlflow, wandb (pip extra `tracking`); "
        "default none (evaluate under `run`: train's). Train logs from rank 0: the config, every step's metrics, "
        "the export; evaluate logs its numbers and plots to the same tracker run.",
    )
    tracking_dir: str = Field(
        "",
        description="Local directory for TensorBoard events, the MLflow file store and W&B files; default "
        "<run_dir>/tracking.",
    )
    experiment: str = Field("dpo-ray", description="MLflow experiment and W&B project name.")
    tracking_name: str = Field(
        "", description="Tracker run name; default: the parent directory of the export (train) or policy (evaluate)."
    )

    @model_validator(mode="after")
    def _local_tracking(self) -> TrackingFields:
        if self.report_to and "://" in self.tracking_dir and not self.tracking_dir.startswith("file://"):
            raise ValueError(
                f"tracking_dir {self.tracking_dir} is not a local directory: TensorBoard event files, the MLflow file "
                "store and W&B's run files are written as they come; set tracking_dir to a local path (an object-store "
                "run_dir gives no local default)"
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


class TrainConfig(TrackingFields):
    model: str = Field(description="Initial policy: local dir, URI or hub id (usually the reference model).")
    scored: str = Field(
        "",
        description="Input `scored` artifact; default <run_dir>/scored. A reference-free loss (simpo, orpo) also "
        "takes a `pairs` artifact (default <run_dir>/pairs): no reference stage needed.",
    )
    output: str = Field("", description="Run directory for metrics.jsonl; default <run_dir>/train.")
    export: str = Field("", description="Exported HF model dir; default <run_dir>/export.")
    storage_path: str = Field("", description="Ray Train storage for checkpoints; default <run_dir>/checkpoints.")
    run_name: str = Field("dpo", description="Ray Train run name; a restart with the same name resumes.")
    loss: LossName | list[CombinedLoss] = Field(
        "sigmoid",
        description='Loss variant (dpo_ray.losses; README: the loss table), or a list of them ("sft": the NLL of '
        "the chosen) combined with loss_weights (TRL's MPO form).",
    )
    loss_weights: list[float] | None = Field(
        None, description="Weights of a list of losses, one each (>= 0; default 1 each)."
    )
    beta: float = Field(0.1, gt=0, description="β: strength of the KL constraint.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="ε of cDPO (sigmoid), rDPO (robust) and EXO (exo_pair, which needs ε > 0)."
    )
    discopop_tau: float | None = Field(None, gt=0, description="τ of the discopop loss (default 0.05).")
    dpop_lambda: float | None = Field(None, ge=0, description="λ of the dpop loss's penalty (default 50).")
    simpo_gamma: float | None = Field(None, ge=0, description="γ, the target margin of the simpo loss (default 0.5).")
    orpo_lambda: float | None = Field(None, ge=0, description="λ of the orpo loss's odds-ratio term (default 0.1).")
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO (Wang et al. 2023): the divergence of the sigmoid loss (reverse_kl: DPO)."
    )
    f_alpha: float | None = Field(None, gt=0, description="α of alpha_divergence, TRL's convention (default 0.5).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen completion (RPO).")
    average_logps: bool = Field(False, description="Per-token mean log-probs instead of sums.")
    optimizer: Literal["adamw", "rmsprop"] = Field("adamw", description="AdamW, or RMSprop (the DPO paper's).")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    batch_size: int = Field(32, ge=1, description="Global batch: pairs per optimizer step, across workers.")
    batching: Literal["auto", "padded", "packed", "prefix_shared"] = Field(
        "auto",
        description="packed: padding-free rows of whole sequences; prefix_shared: padding-free, each pair as "
        "[prompt, chosen, rejected] with the prompt computed once; padded rows; auto: the fastest measured on "
        "the device (packed on GPU, prefix_shared on CPU).",
    )
    token_budget: int = Field(16_384, ge=1, description="Max computed tokens per micro-batch (accumulation).")
    fused_head: bool = Field(
        False,
        description="packed / prefix_shared: completion log-probs through a fused LM head that holds one chunk's "
        "logits at a time (never tokens x vocab; dpo_ray.fused_head).",
    )
    attention: Literal["auto", "blocks", "flex"] = Field(
        "auto",
        description="packed / prefix_shared attention kernel: blocks (one SDPA call per sequence block) or flex "
        "(one FlexAttention call per row with a block mask; GPU only: torch has no FlexAttention backward on CPU); "
        "auto: blocks (the measured choice; README).",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (the padding-free attention runs eagerly inside)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; default: epochs over the train split.")
    epochs: int = Field(1, ge=1, description="Passes over the train split when max_steps is not set.")
    seed: int = Field(0, description="Seed for initialisation order, dropout and RNG state.")
    log_every: int = Field(1, ge=1, description="Log and record metrics every N steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the eval split every N steps (0: at the end only).")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the latest K).")
    num_workers: int = Field(1, ge=0, description="Ray Train workers (0: local mode in the driver process).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU with gloo.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="e.g. {CPU: 8, GPU: 1}.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type for workers, e.g. H100.")
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="DDP, or FSDP2 (fully_shard) per layer.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, float32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters only (peft); the export is merged (vLLM loads it as a plain model)."
    )
    max_failures: int = Field(2, ge=-1, description="Worker-failure restarts from the last checkpoint (-1: no limit).")
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
    def _divisible(self) -> TrainConfig:
        if self.batch_size % max(1, self.num_workers):
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by num_workers ({self.num_workers})")
        if self.fused_head and self.batching == "padded":
            raise ValueError("fused_head works with batching packed, prefix_shared or auto, not padded")
        if self.attention == "flex" and self.batching == "padded":
            raise ValueError("attention: flex works with batching packed, prefix_shared or auto, not padded")
        if self.attention == "flex" and not self.use_gpu:
            raise ValueError(
                "attention: flex needs use_gpu: true (torch has no FlexAttention backward on CPU); use blocks or auto"
            )
        losses = self.losses
        if isinstance(self.loss, list):
            if not self.loss or len(set(self.loss)) != len(self.loss):
                raise ValueError(f"loss: a list names each loss once (at least one), found {self.loss}")
            if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
                raise ValueError(
                    f"loss_weights: {len(self.loss_weights)} weights for {len(self.loss)} losses {self.loss}"
                )
        elif self.loss_weights is not None:
            raise ValueError(f"loss_weights weighs a list of losses; loss is {self.loss!r}")
        if any(w < 0 or not math.isfinite(w) for w in self.loss_weights or []):
            raise ValueError(f"loss_weights: must be finite numbers >= 0, found {self.loss_weights}")
        aot = {"aot", "aot_unpaired", "aot_pair"}
        if self.label_smoothing and not set(losses) & {"sigmoid", "robust", "exo_pair", "simpo", *aot}:
            raise ValueError(
                f"label_smoothing applies to the sigmoid, robust, exo_pair, simpo and aot losses, not {self.loss!r}"
            )
        first = next((n for n in losses if n != "sft"), None)
        if "bco_pair" in losses and first in REFERENCE_FREE_LOSSES:
            # The loop updates δ from the batch's rewards, which a combination takes from its first member that
            # is not sft: a reference-free member's are β·mean log-probs, not the β·log-ratios δ averages.
            raise ValueError(
                f"loss: bco_pair's reward shift δ averages β·log-ratio rewards, which {first!r} (the first member, "
                "whose rewards the loop reads) does not give; put bco_pair or another reference-based loss first"
            )
        if len(aot & set(losses)) > 1:
            raise ValueError(f"loss: {sorted(aot & set(losses))} each sort the batch; combine at most one of them")
        if "exo_pair" in losses and not self.label_smoothing:
            raise ValueError("loss exo_pair needs label_smoothing > 0 (EXO's ε, e.g. 1e-3)")
        if self.f_divergence != "reverse_kl" and self.loss != "sigmoid":
            raise ValueError(
                f"f_divergence {self.f_divergence} applies to loss 'sigmoid' alone, but loss is {self.loss!r}"
            )
        if self.f_alpha is not None and self.f_divergence != "alpha_divergence":
            raise ValueError(f"f_alpha is a parameter of f_divergence alpha_divergence, not {self.f_divergence}")
        params = (
            ("discopop_tau", "discopop"),
            ("dpop_lambda", "dpop"),
            ("simpo_gamma", "simpo"),
            ("orpo_lambda", "orpo"),
        )
        for key, loss in params:
            if getattr(self, key) is not None and loss not in losses:
                raise ValueError(f"{key} is a parameter of loss {loss!r}, but loss is {self.loss!r}")
        return self

    @property
    def losses(self) -> tuple[str, ...]:
        """train.loss as a tuple of names (one for a single loss)."""
        return (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)

    @property
    def reference_free(self) -> bool:
        """No member of train.loss needs reference log-probs (simpo, orpo, sft)."""
        return reference_free(self.loss)


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


class EvaluateConfig(VllmConfig, TrackingFields):
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
                raise ValueError(f"rounds > 1 needs a 'reference:' section (train.loss {self.train.loss} uses one)")
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
            if isinstance(stage, dict) and not stage.get(key):
                if free and key == "scored":  # a reference-free loss trains (and is evaluated) on the pairs
                    name = "pairs"
                data = {**data, section: {**stage, key: f"{run_dir}/{name}"}}
        # Ray workers run in other directories: relative local paths are made absolute here, at the edge.
        for section, keys in _PATH_KEYS.items():
            stage = data.get(section)
            if not isinstance(stage, dict):
                continue
            fixed: dict[str, Any] = {
                k: _absolute(v) for k, v in stage.items() if k in keys["paths"] and isinstance(v, str)
            }
            fixed |= {k: _absolute_ref(v) for k, v in stage.items() if k in keys["refs"] and isinstance(v, str)}
            if isinstance(stage.get("inputs"), list):
                fixed["inputs"] = [_absolute_ref(v) if isinstance(v, str) else v for v in stage["inputs"]]
            data = {**data, section: {**stage, **fixed}}
        return data


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


def _check_keys(data: Any, model: type[BaseModel], prefix: str = "") -> None:
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        sub = model_of(fields[key].annotation)
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
