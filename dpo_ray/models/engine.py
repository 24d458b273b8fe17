"""The only vLLM-specific code: an engine spec, scoring of given token ids, and sampling.

Scoring feeds exactly the stored ids (`TokensPrompt(prompt_token_ids=prompt_ids + completion_ids)`) and
reads the log-prob vLLM assigns to each of them (`prompt_logprobs=0`), with prefix caching off: cached
prefixes can make prompt log-probs depend on request order. vLLM is imported lazily so this module can be
imported (for EngineSpec) on machines without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["EngineSpec", "SampleResult", "make_engine", "sample", "score_completions", "shared_engine"]


@dataclass(frozen=True)
class EngineSpec:
    """Settings of one vLLM engine (one per Ray actor)."""

    model: str
    dtype: str = "float32"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    trust_remote_code: bool = False
    enable_prefix_caching: bool = False
    enforce_eager: bool | None = None  # None: eager without CUDA (no compile), compiled on GPU
    in_process: bool | None = None  # None: engine core in this process without CUDA, its own process on GPU
    # with max_num_batched_tokens unset: vLLM's default tokens a step, lowered to this where it is larger (the
    # step's prompt log-probs are [tokens x vocab]: pipeline.core.engines.step_budget)
    step_tokens_cap: int | None = None


def make_engine(spec: EngineSpec) -> Any:
    """A vllm.LLM for `spec` (safetensors weights only).

    Without a GPU the engine defaults to eager mode with its core in the calling process: on CPU, vLLM's
    compile and its two spawned processes (engine core, worker; each re-imports torch and vLLM) are ~90% of
    an engine start (48 s -> 4 s for the demo model on 2 cores). The forward is the same either way.
    """
    import os

    import torch

    on_gpu = torch.cuda.is_available()
    in_process = (not on_gpu) if spec.in_process is None else spec.in_process
    eager = (not on_gpu) if spec.enforce_eager is None else spec.enforce_eager
    if in_process:  # read by vLLM when the engine is built; one engine per actor process, so set once
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    kwargs = {k: v for k, v in asdict(spec).items() if v is not None and k not in ("in_process", "step_tokens_cap")}
    kwargs["enforce_eager"] = eager
    budget = step_tokens(spec, on_gpu)
    if budget is not None:
        kwargs["max_num_batched_tokens"] = budget
    if not on_gpu:  # no prompt split across steps on CPU (step_tokens): a step holds whole prompts only
        kwargs["enable_chunked_prefill"] = False
    logger.info("starting vLLM engine (%s): %s", "in process" if in_process else "own process", kwargs)
    from vllm import LLM

    return LLM(load_format="safetensors", **kwargs)


def step_tokens(spec: EngineSpec, on_gpu: bool) -> int | None:
    """max_num_batched_tokens for an engine of `spec` (None: vLLM's default).

    On a GPU: a configured one as it is; unset, vLLM's default lowered to spec.step_tokens_cap
    (lowered_step_budget). On CPU make_engine turns chunked prefill off, so a step must hold a whole prompt:
    vLLM 0.32's CPU backend cannot sample with a seed after a prompt split across steps (after a partial prefill
    it rewinds the request's generator, and a CPU generator has no offset: 'CPU Generator does not use offset';
    64 prompts of 200 tokens with 4 samples each were enough). So on CPU a configured budget below max_model_len
    is refused (ValueError, naming both), and an unset one is vLLM's default, lowered to the cap, but at least
    max_model_len. vLLM then warns that the model does not officially support disabling chunked prefill; the
    parity gate and the sampling tests run this way."""
    if on_gpu:
        if spec.max_num_batched_tokens is not None:
            return spec.max_num_batched_tokens
        return lowered_step_budget(spec.step_tokens_cap, spec.tensor_parallel_size) if spec.step_tokens_cap else None
    if spec.max_num_batched_tokens is not None:
        if spec.max_num_batched_tokens < spec.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens {spec.max_num_batched_tokens} < max_model_len {spec.max_model_len}: on CPU "
                "a vLLM step must hold a whole prompt (its seeded sampling fails after a prompt split across steps); "
                "leave max_num_batched_tokens unset or set it to at least max_model_len"
            )
        return spec.max_num_batched_tokens
    default = default_step_tokens(spec.tensor_parallel_size)
    return max(min(default, spec.step_tokens_cap or default), spec.max_model_len)


def default_step_tokens(world_size: int) -> int:
    """vLLM's default tokens a step for an offline engine on this machine (4096 a worker on CPU)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    return int(EngineArgs.get_batch_defaults(world_size)[0][UsageContext.LLM_CLASS])


def lowered_step_budget(cap: int, world_size: int) -> int | None:
    """`cap` where it is below vLLM's default tokens a step for this device and an offline engine (4096 on CPU,
    8192-16384 on GPUs), else None (the default stands). A model without chunked prefill needs a step to hold a
    whole sequence: vLLM refuses a budget below max_model_len for it, naming the setting."""
    default = default_step_tokens(world_size)
    return cap if cap < default else None


_held: tuple[EngineSpec, Any] | None = None  # this process's engine (shared_engine)


def shared_engine(spec: EngineSpec) -> Any:
    """This process's one engine: built on first use, returned again to later callers with the same spec (a
    later stage of one `run` on a reused actor, see pipeline.core.units). The spec's seed is not compared: every
    sampling request carries its own seed and scoring draws nothing, so no result depends on it. A process
    holds one engine for its lifetime (vLLM's in-process state is not torn down), so another spec is refused."""
    global _held
    if _held is None:
        _held = (spec, make_engine(spec))
    elif replace(_held[0], seed=0) != replace(spec, seed=0):
        raise RuntimeError(f"this process holds a vLLM engine for {_held[0]}; it cannot also load {spec}")
    return _held[1]


def score_completions(
    llm: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt: out[i][j] = log p(c_ij | p_i, c_i<j)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if len(prompts) != len(completions):
        raise ValueError(f"score_completions: {len(prompts)} prompts but {len(completions)} completions")
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=[*p, *c]) for p, c in zip(prompts, completions, strict=True)]
    outputs = llm.generate(requests, params, use_tqdm=False)
    result = []
    for p, c, out in zip(prompts, completions, outputs, strict=True):
        ids = [*p, *c]
        per_position = out.prompt_logprobs
        if per_position is None or len(per_position) != len(ids):
            raise RuntimeError(f"vLLM returned {len(per_position or [])} prompt log-probs for {len(ids)} tokens")
        result.append([per_position[t][ids[t]].logprob for t in range(len(p), len(ids))])
    return result


@dataclass(frozen=True)
class SampleResult:
    completion_ids: list[int]
    text: str
    logp: float
    finish_reason: str


def sample(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seeds: Sequence[int],
) -> list[list[SampleResult]]:
    """n samples per prompt (per-request seeds make reruns reproducible), with each sample's log-prob."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s, logprobs=0)
        for s in seeds
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    results = []
    for out in outputs:
        samples = []
        for c in out.outputs:
            logp = sum(step[tok].logprob for step, tok in zip(c.logprobs or [], c.token_ids, strict=True))
            samples.append(SampleResult(list(c.token_ids), c.text, float(logp), str(c.finish_reason)))
        results.append(samples)
    return results
