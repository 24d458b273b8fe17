"""The vLLM engine of a stage's VllmConfig, and when two stages' engines are the same one (shared actors)."""

from __future__ import annotations

from typing import Any

__all__ = ["PROMPT_LOGPROB_BYTES", "engine_key", "engine_spec", "step_budget"]


# The VllmConfig fields an engine is built from, besides the model and the seed (dpo_ray.models.engine.EngineSpec).
_ENGINE_FIELDS = (
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_batched_tokens",
    "tensor_parallel_size",
    "trust_remote_code",
    "enforce_eager",
    "in_process",
)


# What the prompt log-probs of one vLLM step may hold: vLLM 0.32 computes them for all of a step's scheduled
# prompt tokens at once, [tokens x vocab] logits plus their float32 log-softmax (8 bytes an entry in float32,
# 6 in bf16). Chunked prefill bounds a step by max_num_batched_tokens, not by the sequence, so a 32k-token
# sequence costs what its step does (benchmarks/long_reference_memory.py); vLLM's GPU default of 8192-16384
# tokens a step at a 128k vocabulary would be 8-16 GiB, which its memory profiling does not count.
PROMPT_LOGPROB_BYTES = 4 << 30


def step_budget(vocab_size: int) -> int:
    """The most tokens a step may schedule for its prompt log-probs to stay within PROMPT_LOGPROB_BYTES (a
    multiple of 256, at least 2048: vLLM needs a step to hold at least max_num_seqs tokens). An engine whose
    config leaves max_num_batched_tokens unset gets this as its cap: vLLM's own default for the device where it
    is lower (dpo_ray.models.engine.make_engine only ever lowers it)."""
    return max(2048, PROMPT_LOGPROB_BYTES // (8 * max(1, vocab_size)) // 256 * 256)


def _vocab_size(model_dir: Any) -> int | None:
    import json

    path = model_dir / "config.json"
    if not path.is_file():
        return None  # another layout (e.g. a GGUF or Mistral-format directory): vLLM's default stands
    config = json.loads(path.read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(vocab) if vocab else None


def engine_spec(cfg: Any, model: str) -> Any:
    """A dpo_ray.models.engine.EngineSpec from a stage's VllmConfig fields. Prefix caching is off in every stage:
    cached prefixes can make prompt log-probs depend on request order (scoring), and one spec for all stages
    lets a later stage reuse an earlier one's engine (generate pays one prefill per sample instead). An unset
    max_num_batched_tokens is capped by step_budget(the model's vocabulary)."""
    from dpo_ray.models.engine import EngineSpec
    from dpo_ray.models.loading import resolve_model_dir

    fields = {name: getattr(cfg, name) for name in _ENGINE_FIELDS}
    local = resolve_model_dir(model)
    vocab = _vocab_size(local) if fields["max_num_batched_tokens"] is None else None
    fields["step_tokens_cap"] = step_budget(vocab) if vocab else None
    return EngineSpec(model=str(local), seed=cfg.seed, enable_prefix_caching=False, **fields)


def engine_key(cfg: Any, model: str) -> tuple[Any, ...]:
    """What makes two stages' engines the same one (pipeline.core.units shares actors by it): the model as
    configured and every engine_spec field but the seed (requests carry their own seeds). Computed without
    resolving the model; kept actors never outlive a train stage, so a path names one model within a run."""
    return (model, *(getattr(cfg, name) for name in _ENGINE_FIELDS))
