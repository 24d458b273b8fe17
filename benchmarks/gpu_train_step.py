"""Train-step throughput and peak memory on one GPU: every path of dpo-ray's train step beside TRL's
DPOTrainer (precompute_ref_log_probs=True, and with its Liger option), same card, same run, same data,
same initial weights, bf16 autocast with float32 AdamW.

Self-contained: torch + transformers and this repository's dpo_ray (no Ray, no vLLM, no downloads); TRL
and Liger-Kernel rows run when those import (on the GPU machine they travel as wheels:
benchmarks/gpu_wheels.txt, and the one command below). Models are randomly initialised (speed does not
depend on the weights): `llama` a 0.79B-non-embedding Llama (hidden 2048, 16 layers, GQA 32/8, vocab
32000) and `qwen152k` a Qwen2 (hidden 1536, 16 layers, GQA 12/2, vocab 152064, tied embeddings). Pairs
have the prompt / chosen / rejected token lengths of the HH-RLHF sample at max_length 512
(benchmarks/hh_lengths.json, written by --write-lengths on a machine that has ../shared/data) with random
token ids; `--lengths 2048` scales every length by 4 (the longer-context variant: mean prompt / chosen /
rejected 480 / 168 / 208 tokens).

Each row: warm-up steps (compilation happens there), then timed optimizer steps; pairs/s, tokens/s (real
tokens of both sequences), model TFLOP/s = 6 · N · T_real / time (N = parameters without the input
embedding; the same numerator for every row, TRL's included) against the measured bf16 matmul peak, peak
GPU memory, and the first step's loss: every row starts with the policy equal to the reference (the
reference log-probs are the initial model's, computed once, not timed; TRL precomputes its own), so every
first loss is ln 2 to bf16 precision. Variants are a batching mode with +flags: +fused (fused LM head),
+flex (FlexAttention block masks), +compile (torch.compile per decoder layer), +liger (Liger-Kernel's fused
linear cross-entropy in place of the fused head, benchmark only: its per-token log-probs are compared with
ours on the first batch and the largest difference printed), +cudnn (cuDNN SDPA allowed, which training
excludes). Rows that fail print the error and the run
goes on; rows past --budget seconds are skipped, named.

    python benchmarks/gpu_train_step.py       # the whole suite; rows stop starting after --budget (450 s)
    python benchmarks/gpu_train_step.py --device cpu --models tiny --lengths 512 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_ray.compute.attention import enable_segment_attention  # noqa: E402
from dpo_ray.compute.batching import PairTokens, completion_logps  # noqa: E402
from dpo_ray.compute.fused_head import enable_fused_head  # noqa: E402
from dpo_ray.train.optim import make_optimizer, make_scheduler
from dpo_ray.train.parallel import compile_layers  # noqa: E402
from dpo_ray.train.step import StepBatch, TrainSettings, train_step  # noqa: E402

LENGTHS = Path(__file__).resolve().parent / "hh_lengths.json"
FLAGS = ("fused", "flex", "compile", "liger", "cudnn")
# (model, max_length) → variants, in the order run; "trl" / "trl+liger" are TRL's DPOTrainer rows.
SUITE: dict[tuple[str, int], list[str]] = {
    ("llama", 512): [
        "padded",
        "packed",
        "prefix_shared",
        "packed+fused",
        "prefix_shared+fused",
        "packed+flex",
        "prefix_shared+flex",
        "packed+compile",
        "packed+flex+fused+compile",
        "prefix_shared+flex+fused+compile",
        "packed+liger",
        "trl",
        "trl+liger",
    ],
    ("qwen152k", 512): ["packed", "packed+fused", "prefix_shared+flex+fused", "packed+liger", "trl", "trl+liger"],
    ("llama", 2048): ["padded", "packed", "packed+flex", "prefix_shared+flex", "prefix_shared+flex+fused", "trl"],
}
MODELS: dict[str, dict[str, Any]] = {
    "llama": {
        "class": "LlamaConfig",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 32000,
    },
    "qwen152k": {
        "class": "Qwen2Config",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 152064,
        "tie_word_embeddings": True,
    },
    # CPU rows (float32): the basis of `auto` on CPU, measured beside TRL on this machine's 2 cores
    "cpu": {
        "class": "LlamaConfig",
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 8000,
    },
    # for checking the script on a CPU
    "tiny": {
        "class": "LlamaConfig",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 1000,
    },
}


def write_lengths(max_length: int) -> None:
    """Prompt/chosen/rejected token counts of the HH sample under the project's tokenization rule."""
    import gzip

    from dpo_ray.data.tokenization import PairTokenizer, RowRejected, record_to_pair
    from dpo_ray.models.loading import load_tokenizer
    from dpo_ray.models.tiny import train_bpe_tokenizer

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


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak(device: str, n: int, dtype: torch.dtype, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - t0)


def build_model(name: str, device: str) -> Any:
    import transformers

    spec = dict(MODELS[name])
    config = getattr(transformers, spec.pop("class"))(
        **spec, max_position_embeddings=8192, attn_implementation="sdpa", use_cache=False
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def make_batches(vocab: int, batch: int, steps: int, scale: int) -> list[list[PairTokens]]:
    lengths = json.loads(LENGTHS.read_text())
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    out = []
    for _ in range(steps):
        triples = [rng.choice(lengths) for _ in range(batch)]
        out.append([PairTokens(ids(p * scale), ids(c * scale), ids(r * scale)) for p, c, r in triples])
    return out


def reference_sums(
    model_name: str, batches: list[list[PairTokens]], device: str, precision: str
) -> list[tuple[Any, Any]]:
    """The initial model's summed completion log-probs (padded, no grad): the reference."""
    model = build_model(model_name, device).eval()
    out = []
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for pairs in batches:
            prompts = [p.prompt_ids for p in pairs] * 2
            comps = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
            sums = torch.tensor([sum(x) for x in completion_logps(model, prompts, comps, 0, token_budget=16_384)])
            out.append((sums[: len(pairs)].double(), sums[len(pairs) :].double()))
    del model
    return out


def enable_liger_head(model: Any) -> Any:
    """Benchmark only: the fused-head forward with Liger-Kernel's fused linear cross-entropy (reduction none;
    log-prob = −cross-entropy) in place of dpo_ray.compute.fused_head's chunks. No logit soft-capping (Llama, Qwen2)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    original = model.forward

    def forward(self: Any, *args: Any, dpo_logps_labels: Any = None, dpo_logps_chunk: int = 0, **kwargs: Any) -> Any:
        if dpo_logps_labels is None:
            return original(*args, **kwargs)
        keep = kwargs.pop("logits_to_keep")
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state[0, keep]
        weight = self.get_output_embeddings().weight
        if torch.is_autocast_enabled(hidden.device.type):  # as autocast runs our head's matmul (Triton ignores it)
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return -loss(weight, hidden, dpo_logps_labels).float()

    model.forward = types.MethodType(forward, model)
    return model


def run_ours(variant: str, model_name: str, batches: list, refs: list, args: argparse.Namespace) -> dict:
    mode, *flags = variant.split("+")
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown flags {sorted(unknown)} in {variant!r}; expected {FLAGS}")
    model = build_model(model_name, args.device)
    if mode != "padded":
        enable_segment_attention(model)
    if "fused" in flags:
        enable_fused_head(model)
    liger_diff = None
    if "liger" in flags:
        from dpo_ray.compute.layouts import collate_packed, segment_token_logps

        ours = enable_fused_head(build_model(model_name, args.device))
        enable_segment_attention(ours)
        enable_liger_head(model)
        row = collate_packed(batches[0][:8]).to(args.device)
        with torch.no_grad():
            a = segment_token_logps(ours, row, fused=True)
            b = segment_token_logps(model, row, fused=True)
        liger_diff = float((a - b).abs().max())
        del ours
    if "compile" in flags:
        compile_layers(model)
    opt = make_optimizer(model, "adamw", 1e-6, 0.0)
    sched = make_scheduler(opt, 0, len(batches), "constant")
    settings = TrainSettings(
        token_budget=args.token_budget,
        batching=mode,
        autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
        fused_head="fused" in flags or "liger" in flags,
        attention="flex" if "flex" in flags else "blocks",
        cudnn_attention="cudnn" in flags,
    )
    reset_peak(args.device)
    times, first_loss = [], None
    for k, (pairs, (rc, rr)) in enumerate(zip(batches, refs, strict=True)):
        sync(args.device)
        t0 = time.perf_counter()
        metrics = train_step(
            model, opt, sched, StepBatch(pairs, rc, rr), settings, global_batch_size=len(pairs)
        ).metrics
        sync(args.device)
        times.append(time.perf_counter() - t0)
        first_loss = metrics["loss"] if k == 0 else first_loss
    out = {"times": times, "first_loss": first_loss, "peak_gib": peak_gib(args.device)}
    if liger_diff is not None:
        out["liger_max_abs_logp_diff"] = liger_diff
    del model, opt
    return out


def run_trl(liger: bool, model_name: str, batches: list, args: argparse.Namespace, max_length: int) -> dict:
    import datasets
    import transformers
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.models.loading import load_tokenizer
    from dpo_ray.models.tiny import train_bpe_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    train_bpe_tokenizer(["a b c d e f"] * 8, vocab_size=64).save_pretrained(work / "tok")
    tok = load_tokenizer(work / "tok")
    rows = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
        for pairs in batches
        for p in pairs
    ]
    config = DPOConfig(
        output_dir=str(work / "out"),
        per_device_train_batch_size=len(batches[0]),
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_steps=len(batches),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        beta=0.1,
        max_length=max_length * 2,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=len(batches[0]),
        use_liger_kernel=liger,
        bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = build_model(model_name, args.device)
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=model, args=config, train_dataset=placeholder, processing_class=tok)
    data = Dataset.from_list(rows)  # exactly our token ids
    t_pre = time.perf_counter()
    trainer.train_dataset = trainer._precompute_ref_logps(data, "train", len(batches[0]))
    precompute = time.perf_counter() - t_pre
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)  # type: ignore[method-assign]
    times: list[float] = []
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            sync(args.device)
            marks["t"] = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            sync(args.device)
            times.append(time.perf_counter() - marks["t"])

    trainer.add_callback(Timer())
    reset_peak(args.device)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"times": times, "first_loss": losses[0] if losses else None, "peak_gib": peak_gib(args.device)}
    out["precompute_seconds"] = precompute
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, choices=list(MODELS), help="default: the suite's")
    ap.add_argument("--lengths", nargs="*", type=int, default=None, choices=[512, 2048])
    ap.add_argument("--variants", nargs="*", default=None, help="override the suite's rows, e.g. packed packed+flex")
    ap.add_argument("--batch", type=int, default=32, help="pairs per optimizer step")
    ap.add_argument("--token-budget", type=int, default=16_384, help="computed tokens per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; rows that would start later are skipped")
    ap.add_argument("--device", default="cuda", help="cuda; cpu to check the script (--models tiny)")
    ap.add_argument("--precision", choices=["bf16", "float32"], help="default: bf16 on cuda, else float32")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--write-lengths", action="store_true", help="(CPU machine) write hh_lengths.json and exit")
    args = ap.parse_args()
    if args.write_lengths:
        write_lengths(512)
        return
    started = time.perf_counter()
    dev = args.device
    args.precision = args.precision or ("bf16" if dev == "cuda" else "float32")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dev, 8192 if dev == "cuda" else 1024, dtype)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    import transformers

    print(
        f"{name}: {args.precision} matmul peak {peak / 1e12:.2f} TFLOP/s (measured); torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        flush=True,
    )
    plan = [
        (m, n, args.variants or variants)
        for (m, n), variants in SUITE.items()
        if (args.models is None or m in args.models) and (args.lengths is None or n in args.lengths)
    ]
    if args.models and not plan:  # a model outside the suite (tiny): the llama-512 rows
        plan = [(m, n, args.variants or SUITE[("llama", 512)]) for m in args.models for n in (args.lengths or [512])]
    results: dict[str, dict[str, Any]] = {}
    for model_name, max_length, variants in plan:
        scale = max_length // 512
        vocab = MODELS[model_name]["vocab_size"]
        batches = make_batches(vocab, args.batch, args.warmup + args.steps, scale)
        refs = reference_sums(model_name, batches, dev, args.precision)
        probe = build_model(model_name, dev)
        n_params = sum(p.numel() for p in probe.parameters()) - probe.get_input_embeddings().weight.numel()
        del probe
        key = f"{model_name}@{max_length}"
        results[key] = {"n_params": n_params, "rows": {}}
        print(f"\n== {key}: {n_params / 1e9:.2f}B non-embedding parameters", flush=True)
        for variant in variants:
            if time.perf_counter() - started > args.budget:
                results[key]["rows"][variant] = {"skipped": "time budget"}
                print(f"{variant}: skipped (time budget)", flush=True)
                continue
            try:
                if variant.startswith("trl"):
                    row = run_trl("liger" in variant, model_name, batches, args, max_length)
                else:
                    row = run_ours(variant, model_name, batches, refs, args)
            except Exception as e:  # a row that cannot run says why; the others still run
                row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            reset_peak(dev)
            if "times" in row:
                timed = row["times"][args.warmup :]
                tokens = sum(p.num_tokens for b in batches[args.warmup :] for p in b)
                seconds = sum(timed)
                row |= {
                    "pairs_per_s": args.batch * len(timed) / seconds,
                    "tokens_per_s": tokens / seconds,
                    "tflops": 6 * n_params * tokens / seconds / 1e12,
                }
                print(f"{variant}: {row['pairs_per_s']:.1f} pairs/s, peak {row['peak_gib']:.1f} GiB", flush=True)
            else:
                print(f"{variant}: {row['error']}", flush=True)
            results[key]["rows"][variant] = row
    print(
        f"\n{name}, {'bf16 autocast' if args.precision == 'bf16' else 'float32'}, float32 AdamW, "
        f"{args.batch} pairs/step, token budget {args.token_budget}, "
        f"{args.steps} timed steps after {args.warmup} warm-up; "
        f"measured {args.precision} matmul peak {peak / 1e12:.2f} TFLOP/s; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    for key, res in results.items():
        rows = res["rows"]
        trl = rows.get("trl", {}).get("pairs_per_s")
        trl_mem = rows.get("trl", {}).get("peak_gib")
        print(f"\n{key} ({res['n_params'] / 1e9:.2f}B non-embedding)\n")
        print(
            "| variant | pairs/s | tokens/s | model TFLOP/s (% of peak) | peak GiB | vs TRL | memory vs TRL "
            "| first loss |\n|---|---|---|---|---|---|---|---|"
        )
        for variant, row in rows.items():
            if "pairs_per_s" not in row:
                print(f"| {variant} | {row.get('error') or row.get('skipped')} | | | | | | |")
                continue
            vs = f"{row['pairs_per_s'] / trl:.2f}x" if trl else ""
            mem = f"{row['peak_gib'] / trl_mem:.2f}" if trl_mem and not math.isnan(row["peak_gib"]) else ""
            first = "" if row["first_loss"] is None else f"{row['first_loss']:.4f}"
            print(
                f"| {variant} | {row['pairs_per_s']:.1f} | {row['tokens_per_s']:.0f} | {row['tflops']:.2f} "
                f"({100 * row['tflops'] * 1e12 / peak:.0f}%) | {row['peak_gib']:.1f} | {vs} | {mem} | {first} |"
            )
        for variant, row in rows.items():
            if "liger_max_abs_logp_diff" in row:
                diff = row["liger_max_abs_logp_diff"]
                print(f"{variant}: Liger vs fused head, max |per-token log-prob diff| {diff:.2e}")
            if "precompute_seconds" in row:
                print(f"{variant}: TRL's reference precompute pass {row['precompute_seconds']:.1f} s (not timed)")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_tflops": peak / 1e12, "results": results}, indent=1))


if __name__ == "__main__":
    main()
