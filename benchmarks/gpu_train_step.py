"""Train-step throughput of each batching mode on one GPU: a ~1B-parameter Llama in bf16 autocast.

Self-contained: torch + transformers and this repository's dpo_ray (no Ray, no vLLM, no downloads).
The model is randomly initialised (speed does not depend on the weights); pairs have the prompt and
completion lengths of the HH-RLHF sample tokenized at max_length 512 (benchmarks/hh_lengths.json,
written by --write-lengths on a machine that has ../shared/data) with random token ids. For each mode:
warm-up steps, then timed optimizer steps (AdamW, float32 master weights, bf16 autocast), reporting
pairs/s, tokens/s (real tokens of both sequences), peak GPU memory, model FLOP/s (6 · N · T over real
tokens, N = parameters without the input embedding) against the measured bf16 matmul peak, and each
mode's first-step loss (modes must agree to bf16 precision).

    python benchmarks/gpu_train_step.py            # ~3-5 minutes on one H100
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_ray.batching import PairTokens, plan  # noqa: E402
from dpo_ray.fused_head import enable_fused_head  # noqa: E402
from dpo_ray.packing import enable_segment_attention  # noqa: E402
from dpo_ray.step import StepBatch, TrainSettings, make_optimizer, make_scheduler, train_step  # noqa: E402

LENGTHS = Path(__file__).resolve().parent / "hh_lengths.json"
MODES = ["padded", "packed", "prefix_shared"]
# padded with cuDNN attention allowed (train_step excludes it); the segment modes with the fused LM head
VARIANTS = [*MODES, "padded-cudnn", "packed-fused", "prefix_shared-fused"]


def write_lengths(max_length: int) -> None:
    """Prompt/chosen/rejected token counts of the HH sample under the project's tokenization rule."""
    import gzip

    from dpo_ray.models import load_tokenizer, train_bpe_tokenizer
    from dpo_ray.tokenization import PairTokenizer, RowRejected, record_to_pair

    hh = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test-1500.jsonl.gz"
    records = [json.loads(line) for line in gzip.open(hh, "rt")]
    tok = train_bpe_tokenizer([r["chosen"] for r in records] + [r["rejected"] for r in records], vocab_size=8000)
    tmp = Path("/tmp/hh-lengths-tok")
    tok.save_pretrained(tmp)
    pt = PairTokenizer(load_tokenizer(tmp), max_length, max_length * 3 // 4)
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    out = []
    for r in records:
        try:
            got = record_to_pair(r, pt, cols, "implicit")
        except RowRejected:
            continue
        out.append([len(got.prompt_ids), len(got.chosen_ids), len(got.rejected_ids)])
    LENGTHS.write_text(json.dumps(out))
    print(f"wrote {len(out)} length triples to {LENGTHS}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str, n: int = 8192, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32, help="pairs per optimizer step")
    ap.add_argument("--token-budget", type=int, default=16_384, help="computed tokens per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", nargs="*", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--profile", action="store_true", help="print the top ops (torch.profiler) of one step per mode")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script with a tiny --hidden")
    ap.add_argument("--write-lengths", action="store_true", help="(CPU machine) write hh_lengths.json and exit")
    args = ap.parse_args()
    if args.write_lengths:
        write_lengths(512)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    lengths = json.loads(LENGTHS.read_text())
    rng = random.Random(0)
    steps = args.warmup + args.steps

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, args.vocab) for _ in range(n)]

    batches = []
    for _ in range(steps):
        triples = [rng.choice(lengths) for _ in range(args.batch)]
        pairs = [PairTokens(ids(p), ids(c), ids(r)) for p, c, r in triples]
        ref = torch.tensor([-1.5 * (c + r) for _, c, r in triples], dtype=torch.float64)
        batches.append(StepBatch(pairs, ref, ref - 1.0))

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    dev = args.device
    peak = matmul_peak(torch.bfloat16, dev, n=8192 if dev == "cuda" else 512)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"{name}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (measured)", flush=True)
    rows, first_losses = [], {}
    for variant in args.modes:
        mode = variant.removesuffix("-cudnn").removesuffix("-fused")
        fused = variant.endswith("-fused")
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(config)
        if mode != "padded":
            enable_segment_attention(model)
        if fused:
            enable_fused_head(model)
        n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        opt = make_optimizer(model, "adamw", 1e-6, 0.0)
        sched = make_scheduler(opt, 0, steps, "constant")
        settings = TrainSettings(
            token_budget=args.token_budget,
            batching=mode,
            autocast_dtype=torch.bfloat16,
            cudnn_attention=variant.endswith("-cudnn"),
            fused_head=fused,
        )
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, waste = [], []
        for k, batch in enumerate(batches):
            waste.append(plan(batch.pairs, args.token_budget, mode).padding_fraction)
            sync(dev)
            t0 = time.perf_counter()
            metrics = train_step(model, opt, sched, batch, settings, global_batch_size=args.batch)
            sync(dev)
            times.append(time.perf_counter() - t0)
            if k == 0:
                first_losses[variant] = metrics["loss"]
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
            with profile(activities=acts) as prof:
                train_step(model, opt, sched, batches[-1], settings, global_batch_size=args.batch)
                sync(dev)
            key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
            print(f"--- profile {variant}\n" + prof.key_averages().table(sort_by=key, row_limit=12), flush=True)
        seconds = sum(times[args.warmup :])
        timed = batches[args.warmup :]
        real = sum(b.tokens for b in timed)
        flops = 6 * n_params * real / seconds
        rows.append(
            (
                variant,
                args.batch * len(timed) / seconds,
                real / seconds,
                flops,
                torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0,
                sum(waste) / len(waste),
            )
        )
        print(f"{variant}: {rows[-1][1]:.1f} pairs/s", flush=True)
        del model, opt
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(
        f"\n{name}; Llama {n_params / 1e9:.2f}B non-embedding params (hidden {args.hidden}, {args.layers} layers, "
        f"GQA {args.hidden // 64}/{max(1, args.hidden // 256)} heads), bf16 autocast, {args.batch} pairs/step, "
        f"token budget {args.token_budget}, {args.steps} timed steps after {args.warmup} warm-up\n"
    )
    base = rows[0][1] if rows and rows[0][0] == "padded" else None
    print("| mode | pairs/s | tokens/s | model TFLOP/s (% of bf16 matmul peak) | peak GPU GiB | padding | vs padded |")
    print("|---|---|---|---|---|---|---|")
    for mode, pps, tps, flops, mem, pad in rows:
        rel = f"{pps / base:.2f}x" if base else ""
        print(
            f"| {mode} | {pps:.1f} | {tps:.0f} | {flops / 1e12:.0f} ({100 * flops / peak:.0f}%) | {mem:.1f} "
            f"| {100 * pad:.0f}% | {rel} |"
        )
    print("\nfirst-step loss by mode:", {m: round(v, 5) for m, v in first_losses.items()})


if __name__ == "__main__":
    main()
