"""The sections of the stages that are not train: prepare, reference, generate, evaluate, and the demo."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel, TrackingConfig


class ColumnMap(StrictModel):
    prompt: str | None = Field(
        "prompt",
        description="Input column holding the prompt (text or message list); null: no prompt column, the prompt "
        "is what chosen and rejected share (implicit and conversational formats).",
    )
    chosen: str = Field("chosen", description="Input column holding the preferred completion or dialog.")
    rejected: str = Field("rejected", description="Input column holding the dispreferred completion or dialog.")
    completion: str = Field(
        "completion", description="prepare.unpaired records: input column holding the rated completion."
    )
    label: str = Field("label", description="prepare.unpaired records: input column holding the boolean label.")


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
    unpaired: Literal["records", "pairs"] | None = Field(
        None,
        description="Write an `unpaired` artifact (for an unpaired loss: kto) instead of pairs. records: the inputs "
        "are unpaired records (prompt, completion, label: true or false); pairs: the inputs are pairs, each split "
        "into its chosen completion (desirable) and its rejected one (undesirable), an input record counting as "
        "its two rows. Each row gets a KL completion: another prompt's completion of its shard and split.",
    )
    seed: int = Field(0, description="prepare.unpaired: the seed of the KL completions' assignment.")
    dedup: bool = Field(True, description="Drop exact duplicate pairs (same pair_id); they go to rejects.")
    rows_per_shard: int = Field(100_000, ge=1, description="Upper bound on rows per output Parquet shard.")
    num_actors: int = Field(1, ge=1, description="Tokenizer actors (Ray Data actor pool size).")
    batch_size: int = Field(512, ge=1, description="Records per tokenization batch.")
    output: str = Field("", description="Output artifact directory; default <run_dir>/pairs.")

    @model_validator(mode="after")
    def _lengths(self) -> PrepareConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        fields = type(self).model_fields
        unread = [k for k in ("seed",) if self.unpaired is None and getattr(self, k) != fields[k].default]
        defaults = ColumnMap.model_fields
        unread += [
            f"columns.{k}"
            for k in ("completion", "label")
            if self.unpaired != "records" and getattr(self.columns, k) != defaults[k].default
        ]
        if unread:
            raise ValueError(
                f"prepare: {', '.join(unread)} apply to unpaired data only (seed: prepare.unpaired; columns.completion "
                "and columns.label: unpaired: records); remove them or set prepare.unpaired"
            )
        if self.unpaired == "records" and self.format == "implicit":
            raise ValueError(
                "prepare.format implicit infers a prompt from two completions; unpaired records have one: use "
                "explicit, conversational or auto"
            )
        return self


class VllmConfig(StrictModel):
    """vLLM engine and actor-pool settings shared by the stages that run vLLM (reference, generate)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Model precision.")
    max_model_len: int = Field(2048, ge=2, description="Longest sequence (prompt + completion).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM memory fraction for weights + KV cache (on CPU: of host memory; use ~0.1)."
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="vLLM scheduler token budget per step. On GPU (chunked prefill: a longer prompt takes several "
        "steps) null is vLLM's default, lowered for a large vocabulary so that one step's prompt log-probs "
        "(tokens x vocab) stay within 4 GiB (4096 tokens at 128k; pipeline.core.engines.step_budget). On CPU "
        "chunked prefill is off (seeded sampling fails after a split prompt there): a step holds whole prompts, "
        "so a set value must be at least max_model_len.",
    )
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
    unpaired: Literal["pairs", "threshold"] | None = Field(
        None,
        description="Write an `unpaired` artifact (for an unpaired loss: kto) instead of pairs. pairs: each pair of "
        "the pairing strategy gives its chosen completion as desirable and its rejected one as undesirable; "
        "threshold: every sample, desirable when its reward >= desirable_threshold. Each row's KL completion is "
        "another prompt's completion of the same unit and split (dpo_ray.data.unpaired).",
    )
    desirable_threshold: float = Field(0.0, description="unpaired threshold: the reward a desirable sample reaches.")
    generations: str = Field("", description="Output `generations` artifact; default <run_dir>/generations.")
    output: str = Field("", description="Output `pairs` (or `unpaired`) artifact; default <run_dir>/generated_pairs.")

    @model_validator(mode="after")
    def _strategy_keys(self) -> GenerateConfig:
        # Keys of another pairing strategy would change nothing (dpo_ray.data.pairing); by value, as reference's.
        fields = type(self).model_fields
        ignored = [k for k in ("margin",) if self.strategy != "margin" and self.margin != fields[k].default]
        if self.strategy == "best_vs_worst" and self.max_pairs_per_prompt != fields["max_pairs_per_prompt"].default:
            ignored.append("max_pairs_per_prompt")
        if self.unpaired != "threshold" and self.desirable_threshold != fields["desirable_threshold"].default:
            raise ValueError("generate.desirable_threshold is read with unpaired: threshold only; remove it")
        if self.unpaired == "pairs" and self.strategy != "best_vs_worst":
            raise ValueError(
                f"generate.unpaired pairs with strategy {self.strategy}: a sample between two others would be chosen "
                "in one pair and rejected in another, one completion labelled both ways; use best_vs_worst, or "
                "unpaired: threshold for more rows per prompt"
            )
        if self.unpaired is not None and self.prompts_per_unit < 2:
            raise ValueError(
                "generate.unpaired needs prompts_per_unit >= 2: a row's KL completion is another prompt's of its unit"
            )
        if self.unpaired == "threshold":  # every sample is labelled by the threshold; no pairing strategy is read
            ignored = [
                k for k in ("strategy", "margin", "max_pairs_per_prompt") if getattr(self, k) != fields[k].default
            ]
            if ignored:
                raise ValueError(
                    f"generate.unpaired threshold labels every sample by its reward: {', '.join(ignored)} (pairing) "
                    "would change nothing; remove them or use unpaired: pairs"
                )
            return self
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
