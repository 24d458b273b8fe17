"""Peak memory of the reference stage's log-probs of one long sequence, by backend and length (CPU).

One sequence of T tokens (prompt T/2, completion T/2) scored as the reference stage scores it: with vLLM's
prompt log-probs (dpo_ray.models.engine.score_completions; its scheduler's token budget per step,
max_num_batched_tokens, with chunked prefill at the values given; 0: the engine as the reference stage builds
it, which on CPU holds whole prompts: dpo_ray.models.engine.step_tokens) and with the transformers backend
(dpo_ray.compute.batching.completion_logps, also the parity gate's forward). The model is the tiny Llama of the
tests (2 layers, hidden 64) with its vocabulary padded to --vocab rows, so that a [tokens × vocab] tensor shows:
at 32,768 tokens and a 32,000 vocabulary one float32 copy is 4,000 MiB. Each measurement runs in a fresh
process: the growth of its peak resident memory (VmHWM, reset after a warm-up on a short sequence) over
scoring the long one.

    .venv/bin/python benchmarks/long_reference_memory.py [--tokens 8192 16384 32768] [--vocab 32000]
        [--budgets 4096 2048]    # 0: unset

Prints one table (MiB added; seconds).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from peak_memory import peak_mib, reset_peak, rss_mib  # benchmarks/, the script's directory

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test-1500.jsonl.gz"


def build_model(out: Path, vocab: int, positions: int) -> Path:
    """A tiny Llama (BPE trained on HH-RLHF dialogs, 2 layers), `vocab` embedding and head rows, `positions` long."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_ray.models.tiny import build_tiny_llama
    from dpo_ray.testing.long_context import read_hh

    corpus = [d["chosen"] for d in read_hh(HH)[:300]]
    build_tiny_llama(out, corpus, vocab_size=512, max_position_embeddings=positions, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _sequence(tokens: int, seed: int = 0) -> tuple[list[int], list[int]]:
    g = random.Random(seed)
    ids = [g.randrange(3, 500) for _ in range(tokens)]
    return [1, *ids[: tokens // 2 - 1]], ids[tokens // 2 :]


def _measure(model: str, backend: str, tokens: int, budget: int, queue: Any) -> None:
    prompt, completion = _sequence(tokens)
    warm_p, warm_c = _sequence(64, seed=1)
    if backend == "vllm":
        from dpo_ray.models.engine import EngineSpec, make_engine, score_completions

        spec = EngineSpec(model, max_model_len=tokens + 8, gpu_memory_utilization=0.1)
        if budget:  # vLLM's chunked prefill at this many tokens a step (scoring draws no samples: no seed)
            from vllm import LLM

            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            llm = LLM(
                model=model, load_format="safetensors", dtype="float32", max_model_len=spec.max_model_len,
                gpu_memory_utilization=0.1, enforce_eager=True, enable_prefix_caching=False,
                enable_chunked_prefill=True, max_num_batched_tokens=budget,
            )  # fmt: skip
        else:  # as the reference stage builds it (dpo_ray.models.engine.make_engine)
            llm = make_engine(spec)
        used = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens

        def score(p: list[int], c: list[int]) -> list[float]:
            return score_completions(llm, [p], [c])[0]
    else:
        import torch

        from dpo_ray.compute.batching import completion_logps
        from dpo_ray.models.loading import load_causal_lm

        torch.set_num_threads(1)
        lm = load_causal_lm(model, "float32")
        used = 0

        def score(p: list[int], c: list[int]) -> list[float]:
            return completion_logps(lm, [p], [c], pad_token_id=0)[0]

    score(warm_p, warm_c)
    before = rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    got = score(prompt, completion)
    seconds = time.perf_counter() - t0
    queue.put({"added": peak_mib() - before, "seconds": seconds, "budget": used, "n": len(got)})


def measure(model: str, backend: str, tokens: int, budget: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(model, backend, tokens, budget, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = str(build_model(Path(d) / "model", args.vocab, max(args.tokens) + 64))
        columns = [("vllm", b) for b in args.budgets if "vllm" in args.backends]
        columns += [("hf", 0)] if "hf" in args.backends else []
        rows = {t: [measure(model, backend, t, budget) for backend, budget in columns] for t in args.tokens}
    names = [
        ("transformers" if b == "hf" else f"vLLM, chunked, {budget} a step" if budget else "vLLM as the stage runs it")
        for b, budget in columns
    ]
    print(f"vocabulary {args.vocab}; one float32 [tokens x vocab] copy at {max(args.tokens)} tokens: "
          f"{max(args.tokens) * args.vocab * 4 / 2**20:.0f} MiB")  # fmt: skip
    print("| tokens | " + " | ".join(f"{n}: MiB added (s)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for t, found in rows.items():
        assert all(r["n"] == t - t // 2 for r in found), found
        print(f"| {t} | " + " | ".join(f"{r['added']:.0f} ({r['seconds']:.1f})" for r in found) + " |", flush=True)


if __name__ == "__main__":
    main()
