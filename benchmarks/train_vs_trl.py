"""DPO training throughput: dpo-ray's train step (each batching mode) vs TRL's DPOTrainer, side by side.

Same Llama config and initial weights (saved once), same pairs (the HH-RLHF sample tokenized by the
project's rule, max_length 512; TRL gets exactly these token ids), same global batch, AdamW, constant
lr, float32, same data order (sequential), same number of steps, one process per configuration (run
one after another by this script, so each peak RSS is its own):

- dpo-ray `train_step` with batching padded, packed, prefix_shared (reference log-probs precomputed, as
  the reference stage does; not timed);
- TRL DPOTrainer (a) default: a reference model forward in every step;
- TRL DPOTrainer (b) precompute_ref_log_probs=True: its precompute pass is timed separately.

Also measured in the same run: the machine's float32 matmul peak (torch.mm). Two rates against it:
MFU, the model FLOPs of the work done, 6 · N · T_real / step time (N = parameters without the input
embedding, T_real = real tokens of both sequences of every pair: the same numerator for every
configuration, so it can pass 100% when a mode skips work, e.g. the prompt's second pass); and the
FLOPs each configuration's steps actually compute (computed_flops) over its step time. The first steps' losses
of every configuration are compared with TRL's (same data, same init): they must agree to 1e-3.

    .venv/bin/python benchmarks/train_vs_trl.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hh_llama import build_hh_llama, hh_records

CONFIGS = ["padded", "packed", "prefix_shared", "trl_default", "trl_precompute"]


def build(work: Path, args: argparse.Namespace) -> None:
    """The model (random init, seeded) and the tokenized pairs, written under `work`."""
    from dpo_ray.data.tokenization import PairTokenizer, RowRejected, record_to_pair
    from dpo_ray.models.loading import load_tokenizer

    records = hh_records()
    model_dir = build_hh_llama(work / "model", records, args.hidden, args.layers, args.vocab)
    tok = load_tokenizer(model_dir)
    pt = PairTokenizer(tok, args.max_length, args.max_length * 3 // 4)
    pairs = []
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    for r in records:
        try:
            got = record_to_pair(r, pt, cols, "implicit")
        except RowRejected:
            continue
        pairs.append({"prompt_ids": got.prompt_ids, "chosen_ids": got.chosen_ids, "rejected_ids": got.rejected_ids})
        if len(pairs) == args.batch * (args.steps + args.warmup):
            break
    (work / "pairs.json").write_text(json.dumps(pairs))


def reference_logps(model_dir: Path, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    from dpo_ray.compute.batching import completion_logps
    from dpo_ray.models.loading import load_causal_lm

    model = load_causal_lm(model_dir)
    prompts = [p["prompt_ids"] for p in pairs] * 2
    comps = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    sums = torch.tensor([sum(x) for x in completion_logps(model, prompts, comps, 0, token_budget=8192)])
    return sums[: len(pairs)].double(), sums[len(pairs) :].double()


def run_ours(mode: str, work: Path, args: argparse.Namespace) -> dict:
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    pairs = json.loads((work / "pairs.json").read_text())
    ref_c, ref_r = reference_logps(work / "model", pairs)
    model = load_causal_lm(work / "model")
    if mode != "padded":
        enable_segment_attention(model)
    opt = make_optimizer(model, "adamw", args.lr, 0.0)
    sched = make_scheduler(opt, 0, 10_000, "constant")
    pad = int(load_tokenizer(work / "model").pad_token_id)
    settings = TrainSettings(LossSpec(beta=0.1), token_budget=args.token_budget, batching=mode, pad_token_id=pad)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        lo, hi = step * args.batch, (step + 1) * args.batch
        batch = StepBatch(
            [PairTokens(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs[lo:hi]],
            ref_c[lo:hi],
            ref_r[lo:hi],
        )
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, sched, batch, settings, global_batch_size=args.batch).metrics["loss"])
        times.append(time.perf_counter() - t0)
    return {"losses": losses, "step_times": times}


def run_trl(precompute: bool, work: Path, args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.models.loading import load_causal_lm, load_tokenizer

    pairs = json.loads((work / "pairs.json").read_text())
    tok = load_tokenizer(work / "model")
    config = DPOConfig(
        output_dir=str(work / f"trl-{precompute}"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        beta=0.1,
        max_length=args.max_length,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.batch,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # replaced below
    trainer = DPOTrainer(model=load_causal_lm(work / "model"), args=config, train_dataset=text, processing_class=tok)
    trainer.train_dataset = Dataset.from_list(pairs)  # exactly our token ids
    precompute_seconds = None
    if precompute:  # TRL precomputes in __init__ (here on the placeholder): redo it on the real pairs, timed
        t_pre = time.perf_counter()
        trainer.train_dataset = trainer._precompute_ref_logps(trainer.train_dataset, "train", args.batch)
        precompute_seconds = time.perf_counter() - t_pre
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)  # type: ignore[method-assign]

    times: list[float] = []
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a, **k):  # type: ignore[no-untyped-def]
            marks["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter() - marks["t"])

    trainer.add_callback(Timer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out: dict = {"losses": losses, "step_times": times}
    if precompute_seconds is not None:
        out["precompute_seconds"] = precompute_seconds
    return out


def computed_flops(name: str, pairs: list[dict], batch: int, n_body: int, d: int, vocab: int, layers: int) -> float:
    """FLOPs a configuration's steps actually compute: 3 x forward (forward + backward), forward =
    2·N_body·tokens computed + 2·d·V·LM-head positions + 4·d·layers·causal attention score entries, laid
    out as each configuration lays out its batch (padded rows: 2B x longest, padding included; packed /
    prefix_shared and TRL's fused LM head: LM head only where a completion token is predicted; TRL (a)
    adds a forward-only reference pass)."""
    total = 0.0
    for lo in range(0, len(pairs), batch):
        ps = [(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs[lo : lo + batch]]
        if name in ("padded", "trl_default", "trl_precompute"):
            t = max(a + max(b, c) for a, b, c in ps)
            tokens = lm = 2 * len(ps) * t
            scores = 2 * len(ps) * t * (t + 1) // 2  # causal, padding included
            if name != "padded":  # TRL's fused LM head projects only positions with a completion label
                lm = sum(b + c for _, b, c in ps)
        else:
            lm = sum(b + c for _, b, c in ps)
            if name == "packed":
                tokens = sum(2 * a + b + c for a, b, c in ps)
                scores = sum((a + b) * (a + b + 1) // 2 + (a + c) * (a + c + 1) // 2 for a, b, c in ps)
            else:
                tokens = sum(a + b + c for a, b, c in ps)
                scores = sum((a + b) * (a + b + 1) // 2 + c * a + c * (c + 1) // 2 for a, b, c in ps)
        forward = 2 * n_body * tokens + 2 * d * vocab * lm + 4 * d * layers * scores
        total += 3 * forward + (forward if name == "trl_default" else 0)
    return total


def worker(name: str, work: Path, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if name.startswith("trl"):
        result = run_trl(name == "trl_precompute", work, args)
    else:
        result = run_ours(name, work, args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def matmul_peak(seconds: float = 3.0, n: int = 2048) -> float:
    """Measured float32 matmul FLOP/s (torch.mm of n x n, best of repeated runs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--token-budget", type=int, default=16_384)
    ap.add_argument("--only", nargs="*", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.work), args)
        return

    work = Path(tempfile.mkdtemp(prefix="trlbench-"))
    build(work, args)
    pairs = json.loads((work / "pairs.json").read_text())
    from dpo_ray.models.loading import load_causal_lm

    model = load_causal_lm(work / "model")
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    del model
    timed = pairs[args.warmup * args.batch :]
    real_tokens = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in timed)
    peak = matmul_peak()
    results = {}
    passthrough = [
        f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
        f"--max-length={args.max_length}", f"--batch={args.batch}", f"--steps={args.steps}",
        f"--warmup={args.warmup}", f"--lr={args.lr}", f"--token-budget={args.token_budget}",
    ]  # fmt: skip
    for name in args.only:
        cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), *passthrough]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT ") :])
        print(f"{name}: done", file=sys.stderr, flush=True)

    (work / "results.json").write_text(json.dumps(results))
    base = results.get("trl_precompute", results.get("trl_default"))
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; "
        f"Llama {n_params / 1e6:.1f}M non-embedding params (hidden {args.hidden}, {args.layers} layers), "
        f"{args.steps} timed steps of {args.batch} HH pairs (max_length {args.max_length}, "
        f"{real_tokens} real tokens), float32; matmul peak {peak / 1e9:.1f} GFLOP/s\n"
    )
    print(
        "| configuration | pairs/s | tokens/s | MFU: 6·N·T_real/s (% of peak) | computed FLOP/s (% of peak) "
        "| peak RSS MiB | vs TRL (a) | vs TRL (b) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    speed = {}
    for name, r in results.items():
        seconds = sum(r["step_times"][args.warmup :])
        speed[name] = len(timed) / seconds
    for name, r in results.items():
        seconds = sum(r["step_times"][args.warmup :])
        flops = computed_flops(name, timed, args.batch, n_params - head, args.hidden, head // args.hidden, args.layers)
        flops /= seconds
        vs_a = f"{speed[name] / speed['trl_default']:.2f}x" if "trl_default" in speed else ""
        vs_b = f"{speed[name] / speed['trl_precompute']:.2f}x" if "trl_precompute" in speed else ""
        label = {"trl_default": "TRL (a) default", "trl_precompute": "TRL (b) precompute_ref_log_probs"}.get(
            name, f"dpo-ray {name}"
        )
        useful = 6 * n_params * real_tokens / seconds
        print(
            f"| {label} | {speed[name]:.2f} | {real_tokens / seconds:.0f} | {useful / 1e9:.0f} G "
            f"({100 * useful / peak:.0f}%) | {flops / 1e9:.0f} G ({100 * flops / peak:.0f}%) "
            f"| {r['peak_rss_mib']:.0f} | {vs_a} | {vs_b} |"
        )
    if "trl_precompute" in results:
        pre = results["trl_precompute"]["precompute_seconds"]
        print(f"\nTRL (b) reference precompute pass: {pre:.1f} s (not in its pairs/s)")
    if base is not None:
        print("\nloss by step (all steps; must agree with TRL to 1e-3):")
        for name, r in results.items():
            diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=False)]
            shown = " ".join(f"{x:.6f}" for x in r["losses"])
            print(f"  {name:16s} [{shown}]  max |diff| vs TRL {max(diffs):.2e}")


if __name__ == "__main__":
    main()
