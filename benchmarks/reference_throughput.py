"""Reference scoring throughput: vLLM (prompt log-probs) vs a transformers forward, same model and pairs.

Builds a ~30M-parameter Llama (random weights; speed does not depend on them) with a BPE tokenizer
trained on the HH-RLHF sample, tokenizes the sample's pairs with the project's tokenization rule, and
scores the same completions with both backends of the reference stage (dpo_ray.models.engine.score_completions
and dpo_ray.compute.batching.completion_logps), one after the other in this process. Prints a Markdown table.

    .venv/bin/python benchmarks/reference_throughput.py --pairs 300
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hh_llama import build_hh_llama, hh_records

from dpo_ray.compute.batching import completion_logps
from dpo_ray.data.tokenization import PairTokenizer, RowRejected, record_to_pair
from dpo_ray.models.engine import EngineSpec, make_engine, score_completions
from dpo_ray.models.loading import load_causal_lm, load_tokenizer

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test-1500.jsonl.gz"
COLS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--token-budget", type=int, default=8192, help="HF backend: padded tokens per forward")
    args = ap.parse_args()

    records = hh_records()
    work = Path(tempfile.mkdtemp(prefix="refbench-"))
    model_dir = build_hh_llama(work / "model", records, args.hidden, args.layers)
    tok = load_tokenizer(model_dir)
    pt = PairTokenizer(tok, args.max_length, args.max_length * 3 // 4)
    prompts, completions = [], []
    for r in records:
        try:
            p = record_to_pair(r, pt, COLS)
        except RowRejected:
            continue
        prompts += [p.prompt_ids, p.prompt_ids]
        completions += [p.chosen_ids, p.rejected_ids]
        if len(prompts) >= 2 * args.pairs:
            break
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    model = load_causal_lm(model_dir)
    n_params = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    hf = completion_logps(model, prompts, completions, tok.pad_token_id, args.token_budget)
    hf_s = time.perf_counter() - t0
    del model

    t0 = time.perf_counter()
    llm = make_engine(EngineSpec(model=str(model_dir), max_model_len=args.max_length + 1, gpu_memory_utilization=0.1))
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl = score_completions(llm, prompts, completions)
    vllm_s = time.perf_counter() - t0

    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(hf, vl, strict=True))
    print(
        f"\nmodel: Llama {n_params / 1e6:.1f}M params, float32; {args.pairs} HH pairs = {len(prompts)} sequences, "
        f"{tokens} tokens; {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    print("\n| backend | seconds | tokens/s | ratio |\n|---|---|---|---|")
    print(f"| transformers forward (`backend: hf`) | {hf_s:.1f} | {tokens / hf_s:,.0f} | 1.00 |")
    print(f"| vLLM prompt log-probs (`backend: vllm`) | {vllm_s:.1f} | {tokens / vllm_s:,.0f} | {hf_s / vllm_s:.2f} |")
    print(f"\nvLLM engine start (not included above): {start_s:.1f}s; max per-token |vLLM - HF|: {diff:.2e}")


if __name__ == "__main__":
    main()
