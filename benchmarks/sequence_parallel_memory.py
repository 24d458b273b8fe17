"""Per-worker peak memory of one training forward and backward over a long pair, with its row's tokens shared by
k = 1, 2, 4 workers (train.sequence_parallel; dpo_ray.compute.sequence_parallel), on CPU with gloo.

One pair of T tokens (prompt T/4, chosen and rejected 3T/8 each) in the prefix-shared layout, a Llama of
8 layers (hidden 256, 8 heads of 32, vocabulary 512), float32; each worker is a process. Measured per worker:
its peak resident memory during the step (VmHWM, reset just before it) minus its resident memory just before it
(the model, its gradients' buffers after a warm-up step, the libraries): what the length costs. With gradient
checkpointing on and off.

    .venv/bin/python benchmarks/sequence_parallel_memory.py [--tokens 4096 8192 16384] [--k 1 2 4]
    .venv/bin/python benchmarks/sequence_parallel_memory.py --cap-mib 1024 [--k 1 2 4]
    .venv/bin/python benchmarks/sequence_parallel_memory.py --data hh --tokens 16384 --checkpointing on

Prints one table (MiB per worker); the length-proportional part should fall near 1/k. With --cap-mib: the
longest pair (a multiple of --step tokens, found by bisection) whose step adds at most that much to every
worker, for each k, with gradient checkpointing. With --data hh the pair is a long conversation made from the
HH-RLHF sample (dpo_ray.testing.long_context): a long prompt and two short answers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from peak_memory import peak_mib, reset_peak, rss_mib  # benchmarks/, the script's directory


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


HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test-1500.jsonl.gz"


def hh_pair(tokens: int) -> tuple[list[int], list[int], list[int]]:
    """A long-context pair of about `tokens` tokens from the HH-RLHF sample (dpo_ray.testing.long_context: dialogs
    joined into one conversation), tokenized by a 512-token BPE trained on the sample: the shared prompt and the
    two final answers."""
    from dpo_ray.models.tiny import train_bpe_tokenizer
    from dpo_ray.testing.long_context import long_conversations, read_hh

    dialogs = read_hh(HH)
    tok = train_bpe_tokenizer([d["chosen"] for d in dialogs[:300]], vocab_size=512)
    record = long_conversations(dialogs, lambda t: len(tok(t).input_ids), [tokens], seed=0)[0]
    chosen, rejected = tok(record["chosen"]).input_ids, tok(record["rejected"]).input_ids
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), None)
    n = min(n if n is not None else len(chosen), len(chosen) - 1, len(rejected) - 1)
    assert max(chosen + rejected) < 512
    return chosen[:n], chosen[n:], rejected[n:]


def _worker(
    rank: int, k: int, port: int, out: str, tokens: int, checkpointing: bool, pair: tuple | None = None
) -> None:
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
        from dpo_ray.compute.batching import PairTokens

        row = PairTokens(*pair) if pair is not None and n == tokens else _pair(n)
        lp = sequence_parallel_logps(model, collate_prefix_shared([row]), sp)
        (lp.chosen - lp.rejected).sum().backward()
        return time.perf_counter() - t0

    step(64 * k)  # warm-up: gradient buffers, kernels, the collectives' buffers
    before = rss_mib()
    reset_peak()
    seconds = step(tokens)
    peak = peak_mib()
    result = {"rank": rank, "before": before, "peak": peak, "seconds": seconds}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    os._exit(0)


def measure(tokens: int, k: int, checkpointing: bool, pair: tuple | None = None) -> dict[str, float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "rank")
        mp.spawn(_worker, args=(k, port, out, tokens, checkpointing, pair), nprocs=k, join=True)
        found = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(k)]
    added = [r["peak"] - r["before"] for r in found]
    return {
        "added_max": max(added),
        "before": max(r["before"] for r in found),
        "seconds": max(r["seconds"] for r in found),
    }


def longest_within(cap_mib: float, k: int, step: int, limit: int) -> tuple[int, float]:
    """The longest pair (a multiple of `step` tokens, at most `limit`) whose step adds at most cap_mib to every
    worker of k, with gradient checkpointing, and what it adds. Bisection: the cost grows with the length."""
    lo, hi, found = 0, limit // step, 0.0  # lo: a known fit (0: none yet); hi: the largest candidate
    while lo < hi:
        mid = (lo + hi + 1) // 2
        added = measure(mid * step, k, True)["added_max"]
        print(f"  k = {k}: {mid * step} tokens add {added:.0f} MiB", flush=True)
        if added <= cap_mib:
            lo, found = mid, added
        else:
            hi = mid - 1
    return lo * step, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cap-mib", type=float, default=None)
    parser.add_argument("--step", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=65_536)
    parser.add_argument(
        "--data",
        choices=["random", "hh"],
        default="random",
        help="random: prompt T/4, answers 3T/8 of random ids; hh: a long HH-RLHF conversation (long prompt)",
    )
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    args = parser.parse_args()
    if args.cap_mib is not None:
        rows = [(k, *longest_within(args.cap_mib, k, args.step, args.limit)) for k in args.k]
        print(f"| k | longest pair within {args.cap_mib:.0f} MiB a worker (multiple of {args.step}) | MiB added |")
        print("|---|---|---|")
        for k, tokens, added in rows:
            print(f"| {k} | {tokens} | {added:.0f} |")
        return
    print(
        "| tokens per pair | gradient checkpointing | "
        + " | ".join(f"k = {k}: MiB added per worker (s)" for k in args.k)
        + " |"
    )
    print("|---|---|" + "---|" * len(args.k))
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    for tokens in args.tokens:
        pair = hh_pair(tokens) if args.data == "hh" else None
        if pair is not None:
            print(f"HH conversation: prompt {len(pair[0])}, answers {len(pair[1])} and {len(pair[2])} tokens")
        for checkpointing in modes:
            cells = []
            for k in args.k:
                m = measure(tokens, k, checkpointing, pair)
                cells.append(f"{m['added_max']:.0f} ({m['seconds']:.1f})")
            print(f"| {tokens} | {'on' if checkpointing else 'off'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
