"""Peak memory of one train forward + backward with and without the fused LM head (dpo_ray.compute.fused_head), on
CPU, for a 32k- and a 152k-vocab model: each configuration runs in a fresh process and reports the growth
of its peak resident set over the model and batch it starts with.

    .venv/bin/python benchmarks/fused_head_memory.py            # ~1 minute on 2 cores

A Llama with hidden 256, 2 layers (the LM head dominates at these vocabularies), float32, one packed row
of 32 pairs with the HH sample's lengths (benchmarks/hh_lengths.json), chunk_tokens 1024.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LENGTHS = Path(__file__).resolve().parent / "hh_lengths.json"


def one(vocab: int, mode: str, fused: bool, pairs: int, chunk: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.compute.fused_head import enable_fused_head
    from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_logps

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
    )  # fmt: skip
    model = enable_segment_attention(LlamaForCausalLM(config))
    if fused:
        enable_fused_head(model)
    rng = random.Random(0)
    lengths = json.loads(LENGTHS.read_text())
    triples = [rng.choice(lengths) for _ in range(pairs)]
    ids = [PairTokens(*[[rng.randrange(3, vocab) for _ in range(n)] for n in t]) for t in triples]
    batch = (collate_packed if mode == "packed" else collate_prefix_shared)(ids)
    completion = sum(c + r for _, c, r in triples)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lp = segment_logps(model, batch, chunk_tokens=chunk, fused=fused)
    (lp.chosen.sum() - lp.rejected.sum()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"growth_mib": (peak - base) / 1024, "completion_tokens": completion, "tokens": int(batch.input_ids.numel())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--one", nargs=3, metavar=("VOCAB", "MODE", "FUSED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        vocab, mode, fused = int(args.one[0]), args.one[1], args.one[2] == "1"
        print(json.dumps(one(vocab, mode, fused, args.pairs, args.chunk)))
        return
    print("| vocab | mode | fused head | peak growth, forward + backward | completion tokens × vocab × 4 B |")
    print("|---|---|---|---|---|")
    for vocab in (32_000, 152_064):
        for mode in ("packed", "prefix_shared"):
            for fused in (False, True):
                cmd = [sys.executable, __file__, "--pairs", str(args.pairs), "--chunk", str(args.chunk)]
                out = subprocess.run(
                    [*cmd, "--one", str(vocab), mode, "1" if fused else "0"], capture_output=True, text=True, check=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                logits = r["completion_tokens"] * vocab * 4 / 2**20
                print(
                    f"| {vocab} | {mode} | {'yes' if fused else 'no'} | {r['growth_mib']:.0f} MiB | {logits:.0f} MiB |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
