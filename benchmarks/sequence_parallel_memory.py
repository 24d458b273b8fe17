"""Per-worker peak memory of one training forward and backward over a long pair, with its row's tokens shared by
k = 1, 2, 4 workers (train.sequence_parallel; dpo_ray.compute.sequence_parallel), on CPU with gloo.

One pair of T tokens (prompt T/4, chosen and rejected 3T/8 each) in the prefix-shared layout, a Llama of
8 layers (hidden 256, 8 heads of 32, vocabulary 512), float32; each worker is a process. Measured per worker:
its peak resident memory during the step (VmHWM, reset just before it) minus its resident memory just before it
(the model, its gradients' buffers after a warm-up step, the libraries): what the length costs. With gradient
checkpointing on and off.

    .venv/bin/python benchmarks/sequence_parallel_memory.py [--tokens 4096 8192 16384] [--k 1 2 4]

Prints one table (MiB per worker); the length-proportional part should fall near 1/k.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Set this process's peak resident memory (VmHWM) to its current one (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def _model(checkpointing: bool):  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_ray.compute.attention import enable_segment_attention

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, head_dim=32, max_position_embeddings=65536,
    )  # fmt: skip
    model = enable_segment_attention(LlamaForCausalLM(config))
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def _pair(tokens: int):  # type: ignore[no-untyped-def]
    from dpo_ray.compute.batching import PairTokens

    g = __import__("random").Random(tokens)
    p, c = tokens // 4, 3 * tokens // 8
    ids = [g.randrange(3, 512) for _ in range(tokens)]
    return PairTokens([1, *ids[: p - 1]], [*ids[p : p + c - 1], 2], [*ids[p + c : tokens - 1], 2])


def _worker(rank: int, k: int, port: int, out: str, tokens: int, checkpointing: bool) -> None:
    import torch
    import torch.distributed as dist

    from dpo_ray.compute.layouts import collate_prefix_shared
    from dpo_ray.compute.sequence_parallel import join_groups, sequence_parallel_logps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    sp = join_groups(k)
    model = _model(checkpointing)

    def step(n: int) -> float:
        t0 = time.perf_counter()
        lp = sequence_parallel_logps(model, collate_prefix_shared([_pair(n)]), sp)
        (lp.chosen - lp.rejected).sum().backward()
        return time.perf_counter() - t0

    step(64 * k)  # warm-up: gradient buffers, kernels, the collectives' buffers
    before = _rss_mib()
    _reset_peak()
    seconds = step(tokens)
    peak = _peak_mib()
    result = {"rank": rank, "before": before, "peak": peak, "seconds": seconds}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    os._exit(0)


def measure(tokens: int, k: int, checkpointing: bool) -> dict[str, float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "rank")
        mp.spawn(_worker, args=(k, port, out, tokens, checkpointing), nprocs=k, join=True)
        found = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(k)]
    added = [r["peak"] - r["before"] for r in found]
    return {
        "added_max": max(added),
        "before": max(r["before"] for r in found),
        "seconds": max(r["seconds"] for r in found),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(
        "| tokens per pair | gradient checkpointing | "
        + " | ".join(f"k = {k}: MiB added per worker (s)" for k in args.k)
        + " |"
    )
    print("|---|---|" + "---|" * len(args.k))
    for tokens in args.tokens:
        for checkpointing in (False, True):
            cells = []
            for k in args.k:
                m = measure(tokens, k, checkpointing)
                cells.append(f"{m['added_max']:.0f} ({m['seconds']:.1f})")
            print(f"| {tokens} | {'on' if checkpointing else 'off'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
