"""The cost curve in the number of pairs: each measured step at several sizes, its growth exponent between sizes.

Steps (each in a fresh child process, so that its peak resident memory is its own):
- `prepare`: the prepare stage on an embedded Ray, on HH-RLHF rows made unique (benchmarks/prepare_throughput.py's
  inputs: 4 JSONL files unless --input-files, every 50th row a duplicate) with an 8k BPE trained on the sample, then
  `status` over the run. Measured: wall time, the driver's growth, the largest peak RSS of a Ray worker process
  (sampled every 0.2 s), the object store's largest use and what it spilled (sampled from Ray's memory summary),
  the bytes written; status's time and growth.
- `reference-hf` / `reference-vllm`: the reference stage (one actor: a transformers forward, or a vLLM engine) on a
  synthetic `pairs` artifact of HH shape (below) with the tiny model (a 1-layer Llama, hidden 64, the same BPE).
  Above --reference-max it runs --reference-box seconds only (then not at all if 0): its steady rate (the pairs of
  the units written after the first, over the time since) and its peaks so far.
- `train`: the train stage, 2 Ray Train workers (gloo), TRAIN_STEPS steps of 32 pairs, the eval split's
  EVAL_PAIRS pairs at the end, the export: what grows with the pairs is the workers' reading and the driver's
  checks (the steps are a few).
- `plan-before` / `plan-after`: generate's and evaluate's handling of the prompts at the driver, on a synthetic
  `scored` artifact: before, the prompts as Python dicts (the code before pipeline.core.prompts, kept here to
  measure it) and each unit's prompts as JSON; after, the index and the units' plan written to storage
  (pipeline.core.prompts). Measured: wall time, the driver's growth, bytes written.
- `read-before` / `read-after`: the train workers' reading, `--workers` gloo processes, on the same artifact:
  before, each reads every shard (dpo_ray.data.order.read_splits); after, dpo_ray.train.rows (its own shards, the
  rows of one epoch's slices exchanged). Measured: wall time, each worker's growth, bytes fetched.

The synthetic artifacts: the sample's texts made unique, benchmarks/hh_lengths.json's token counts, random ids
and log-probs, 50,000 rows a shard, an eval split of EVAL_PAIRS pairs at every size.

Memory: `*_growth_mib` is a process's peak resident memory (sampled every 20 ms) over its resident memory when the
step began (imports, Ray and the tokenizer already there); `worker_peak_mib` is the largest resident memory of any
Ray worker process during the step (sampled every 0.2 s, imports included).

    .venv/bin/python benchmarks/scale.py [--pairs 10000 100000 1000000] [--steps prepare train ...]
        [--prepare-max 100000] [--reference-max 30000] [--workers 2] [--input-files 4]
        [--reference-box 0]

prepare's "before" is the same step run on another checkout's code: PYTHONPATH=<checkout> (the step prints the
file of the prepare stage it ran). `summary` reads the `eval` artifacts' manifests only, whose size does not
depend on the pairs; it is not measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
STEPS = ["prepare", "reference-hf", "reference-vllm", "train", "plan-before", "plan-after", "read-before", "read-after"]
TRAIN_STEPS = 8
ROWS_PER_SHARD = 50_000
EVAL_PAIRS = 512


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Polled:
    """A background thread calling `_poll` every `interval` seconds while the block runs."""

    interval = 1.0

    def __enter__(self) -> Any:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        raise NotImplementedError


class _Own(_Polled):
    """This process's resident memory sampled every 20 ms while the block runs: `growth` is its peak over its
    resident memory at the start (MiB)."""

    interval = 0.02

    def __enter__(self) -> _Own:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss / 2**20
        return super().__enter__()

    def _poll(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss / 2**20)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._poll()

    @property
    def growth(self) -> float:
        return self.peak - self.start


def _du(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build_artifact(
    uri: str, pairs: int, kind: str = "scored", tokenizer: str = "", rows_per_shard: int = ROWS_PER_SHARD
) -> None:
    """A synthetic `scored` (or `pairs`: without the reference log-probs) artifact of HH shape, written shard by
    shard (bounded memory). Its eval split is EVAL_PAIRS pairs at every size (every (pairs // EVAL_PAIRS)-th), so
    that train's evaluation at its end costs the same at every size. `tokenizer`: the fingerprint recorded as the
    artifact's tokenizer (the stages refuse an artifact made with another tokenizer than their model's)."""
    import pyarrow as pa
    from hh_llama import hh_records

    from dpo_ray.data import artifacts
    from dpo_ray.data.schema import PAIRS_SCHEMA, SCORED_SCHEMA
    from dpo_ray.data.tokenization import pair_id

    records = hh_records()
    lengths = np.array(json.loads((HERE / "hh_lengths.json").read_text()), dtype=np.int64)
    rng = np.random.default_rng(0)
    stride = max(1, pairs // EVAL_PAIRS)
    schema = SCORED_SCHEMA if kind == "scored" else PAIRS_SCHEMA

    def ragged(counts: np.ndarray, values: np.ndarray) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    for start in range(0, pairs, rows_per_shard):
        idx = np.arange(start, min(start + rows_per_shard, pairs))
        lp, lc, lr = (lengths[idx % len(lengths), k] for k in range(3))
        texts = []
        for i in idx.tolist():
            rec = records[i % len(records)]
            cut = rec["chosen"].rfind("Assistant:") + len("Assistant:")
            texts.append((rec["chosen"][:cut] + f" #{i}", rec["chosen"][cut:], rec["rejected"][cut:]))
        c_logps = rng.normal(-2, 1, int(lc.sum())).astype(np.float32)
        r_logps = rng.normal(-2, 1, int(lr.sum())).astype(np.float32)
        cb, rb = np.concatenate([[0], np.cumsum(lc)]), np.concatenate([[0], np.cumsum(lr)])
        table = pa.table(
            {
                "pair_id": [pair_id(*t) for t in texts],
                "split": ["eval" if i % stride == 0 and i // stride < EVAL_PAIRS else "train" for i in idx.tolist()],
                "prompt_ids": ragged(lp, rng.integers(0, 8000, int(lp.sum()), dtype=np.int32)),
                "chosen_ids": ragged(lc, rng.integers(0, 8000, int(lc.sum()), dtype=np.int32)),
                "rejected_ids": ragged(lr, rng.integers(0, 8000, int(lr.sum()), dtype=np.int32)),
                "prompt": [t[0] for t in texts],
                "chosen": [t[1] for t in texts],
                "rejected": [t[2] for t in texts],
                "source": ["hh"] * len(idx),
                "ref_chosen_logps": ragged(lc, c_logps),
                "ref_rejected_logps": ragged(lr, r_logps),
                "ref_chosen_logp": np.add.reduceat(c_logps, cb[:-1]).astype(np.float64) if len(idx) else [],
                "ref_rejected_logp": np.add.reduceat(r_logps, rb[:-1]).astype(np.float64) if len(idx) else [],
            }
        )
        artifacts.write_table(
            table.select(schema.names).cast(schema), uri, f"part-{start // rows_per_shard:05d}.parquet"
        )
    fingerprints = {"tokenizer": tokenizer} if tokenizer else {}
    artifacts.write_manifest(uri, kind, {}, fingerprints, {}, {}, shards=artifacts.shard_infos(uri))


def _old_unique_prompts(uri: str, manifest: Any, split: str, limit: int | None) -> list[dict[str, Any]]:
    """The driver's prompt list before pipeline.core.prompts (as it was in pipeline/core/inputs.py)."""
    from dpo_ray.data import artifacts
    from dpo_ray.data.tokenization import prompt_id

    seen: dict[str, dict[str, Any]] = {}
    for shard in manifest.shards:
        for row in artifacts.read_shard(uri, shard, ["prompt", "prompt_ids", "split"]).to_pylist():
            if row["split"] == split and row["prompt"] not in seen:
                seen[row["prompt"]] = {"prompt_id": prompt_id(row["prompt"]), "prompt": row["prompt"],
                                       "prompt_ids": row["prompt_ids"]}  # fmt: skip
    prompts = sorted(seen.values(), key=lambda r: r["prompt_id"])
    return prompts[:limit] if limit else prompts


def child_plan(uri: str, work: str, after: bool) -> dict[str, Any]:
    from dpo_ray.data import artifacts
    from dpo_ray.data.tokenization import prompt_id
    from pipeline.core.prompts import prompt_index, take, write_plan

    prompt_id("")  # the imports' memory is the base, not the step's
    manifest = artifacts.read_manifest(uri)
    own = _Own().__enter__()
    t0 = time.perf_counter()
    if after:
        index = prompt_index(uri, manifest, "train")
        units = write_plan(uri, manifest, index, 64, f"{work}/plan")
        evaluated = take(uri, manifest, prompt_index(uri, manifest, "eval", 64))
        prompts = len(index)
    else:
        listed = _old_unique_prompts(uri, manifest, "train", None)
        units = [{"name": f"part-{i // 64:05d}.parquet", "prompts": json.dumps(listed[i : i + 64])}
                 for i in range(0, len(listed), 64)]  # fmt: skip
        evaluated = _old_unique_prompts(uri, manifest, "eval", 64)
        prompts = len(listed)
    seconds = time.perf_counter() - t0
    own.__exit__()
    written = _du(f"{work}/plan") if after else 0
    return {"seconds": seconds, "driver_growth_mib": own.growth, "driver_peak_mib": _peak_mib(), "prompts": prompts,
            "units": len(units), "eval_prompts": len(evaluated), "bytes_written": written}  # fmt: skip


def _read_rank(rank: int, world: int, port: int, uri: str, after: bool, out: str) -> None:
    import torch.distributed as dist

    from dpo_ray.data import artifacts, order
    from dpo_ray.train import rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dist.barrier()
    manifest = artifacts.read_manifest(uri)
    assert manifest is not None
    fetched = [0]
    module = order  # both readings read through dpo_ray.data.order.read_shard
    verified = module.read_shard

    def counting(u: str, shard: artifacts.ShardInfo, columns: list[str] | None = None) -> Any:
        fetched[0] += shard.size  # read_shard fetches the whole file (sha256) before decoding columns
        return verified(u, shard, columns)

    module.read_shard = counting  # type: ignore[attr-defined]
    own = _Own().__enter__()
    t0 = time.perf_counter()
    batch = 64
    if after:
        splits = rows.read_split_rows(uri, manifest.shards, ["train", "eval"], order.TRAIN_COLUMNS)
        n = splits["train"].n
        per = batch // world
        mine = [b[rank * per : (rank + 1) * per] for b in order.epoch_batches(n, batch, 0, 0)]
        held = splits["train"].fetch(np.concatenate(mine))
    else:
        both = order.read_splits(uri, manifest.shards, ["train", "eval"])
        n = len(both["train"]["pair_id"])
        held = both["train"]
    seconds = time.perf_counter() - t0
    own.__exit__()
    result = {"rank": rank, "seconds": seconds, "growth_mib": own.growth, "bytes_fetched": fetched[0],
              "rows_held": len(held["pair_id"]), "train_rows": n}  # fmt: skip
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def child_read(uri: str, work: str, after: bool, workers: int) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    t0 = time.perf_counter()
    mp.spawn(_read_rank, args=(workers, port, uri, after, work), nprocs=workers, join=True)
    ranks = [json.loads(Path(f"{work}/rank{r}.json").read_text()) for r in range(workers)]
    return {"seconds": time.perf_counter() - t0, "worker_growth_mib": max(r["growth_mib"] for r in ranks),
            "bytes_fetched_per_worker": max(r["bytes_fetched"] for r in ranks), "ranks": ranks}  # fmt: skip


class _Sampler(_Polled):
    """Every 0.2 s: the largest RSS of any Ray worker process, and the object store's use and spill."""

    interval = 0.2

    def __init__(self) -> None:
        self.worker_mib = 0.0
        self.store_mib: float | None = None  # None: Ray's memory summary never answered
        self.spilled_mib: float | None = None
        self._address: str | None = None

    def _poll(self) -> None:
        import re

        import psutil
        import ray
        from ray._private.internal_api import memory_summary

        self._address = self._address or ray.get_runtime_context().gcs_address
        for p in psutil.process_iter(["name", "memory_info"]):
            name = p.info.get("name") or ""
            if name.startswith("ray::") and p.info.get("memory_info") is not None:
                self.worker_mib = max(self.worker_mib, p.info["memory_info"].rss / 2**20)
        try:
            text = memory_summary(address=self._address, stats_only=True)
        except Exception:  # the summary is best effort while Ray starts or stops
            return
        used = re.search(r"Plasma memory usage (\d+) MiB", text)
        spilled = re.search(r"Spilled (\d+) MiB", text)
        if used:
            self.store_mib = max(self.store_mib or 0.0, float(used.group(1)))
            self.spilled_mib = max(self.spilled_mib or 0.0, float(spilled.group(1)) if spilled else 0.0)


def _warm(model: str) -> None:
    """What a stage imports and loads first (torch, transformers, the tokenizer), so that a step's growth is its own."""
    import torch  # noqa: F401
    import transformers

    from dpo_ray.models.loading import load_tokenizer

    load_tokenizer(model)
    transformers.AutoConfig.from_pretrained(model)
    _ = transformers.AutoModelForCausalLM  # the lazy module's import


def child_prepare(work: str, rows: int, model: str, files: int) -> dict[str, Any]:
    """prepare into <run_dir>/pairs, then `status` over that run (its prepare output complete)."""
    from prepare_throughput import write_inputs

    from pipeline.cli import status
    from pipeline.config import load_config
    from pipeline.core.plan import plan
    from pipeline.core.runtime import ensure_ray
    from pipeline.stages import prepare

    data = Path(work) / "data"
    data.mkdir()
    inputs = write_inputs(data, rows, files)
    ensure_ray()
    _warm(model)
    run = load_config(None, [f"run_dir={work}", f"prepare.inputs={json.dumps(inputs)}", f"prepare.tokenizer={model}",
                             f"reference.model={model}", "reference.backend=hf", f"train.model={model}",
                             f"evaluate.reference={model}"])  # fmt: skip
    (cfg,) = [p.config for p in plan(run) if p.stage == "prepare"]
    with _Sampler() as sampled, _Own() as own:
        t0 = time.perf_counter()
        manifest = prepare.run(cfg)
        seconds = time.perf_counter() - t0
    with _Own() as own_status:
        t0 = time.perf_counter()
        rows_seen = status.collect(run)
        status_seconds = time.perf_counter() - t0
    assert any(r["state"] == "complete" for r in rows_seen), rows_seen
    return {"seconds": seconds, "driver_growth_mib": own.growth, "pairs": manifest.rows,
            "worker_peak_mib": sampled.worker_mib, "object_store_peak_mib": sampled.store_mib,
            "spilled_mib": sampled.spilled_mib, "bytes_written": _du(cfg.output),
            "status_seconds": status_seconds, "status_growth_mib": own_status.growth,
            "code": prepare.__file__}  # fmt: skip


def child_reference(pairs: str, work: str, backend: str, model: str, box: float = 0.0) -> dict[str, Any]:
    """The reference stage on a synthetic `pairs` artifact, one actor (the hf forward, or a vLLM engine), and its
    steady rate (_Units). box > 0: stopped after `box` seconds (the process prints its RESULT then exits)."""
    from pipeline.config import ReferenceConfig
    from pipeline.core.runtime import ensure_ray
    from pipeline.stages import reference

    ensure_ray()
    _warm(model)
    engine = {"gpu_memory_utilization": 0.1, "parity_samples": 8} if backend == "vllm" else {}
    cfg = ReferenceConfig(model=model, pairs=pairs, output=f"{work}/scored", backend=backend, **engine)
    with _Sampler() as sampled, _Own() as own, _Units(cfg.output) as units:
        t0 = time.perf_counter()

        def result() -> dict[str, Any]:
            return {"seconds": time.perf_counter() - t0, "driver_growth_mib": own.growth,
                    "worker_peak_mib": sampled.worker_mib, "object_store_peak_mib": sampled.store_mib,
                    "spilled_mib": sampled.spilled_mib, **units.rate(t0)}  # fmt: skip

        if box:

            def stop() -> None:
                time.sleep(box)
                print("RESULT " + json.dumps({**result(), "boxed": True}), flush=True)
                os._exit(0)

            threading.Thread(target=stop, daemon=True).start()
        manifest = reference.run(cfg)
        out = result()
    return {**out, "pairs": manifest.rows, "bytes_written": _du(cfg.output)}


class _Units(_Polled):
    """Every second, the reference's units written so far (their pairs): `rate` is the steady rate, the pairs of
    the units written after the first over the time since the first (the start, the engine's included, left out)."""

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.seen: dict[str, int] = {}
        self.first: tuple[float, int] | None = None  # (when, pairs) at the first unit written

    def _scan(self) -> None:
        import pyarrow.parquet as pq

        for f in sorted(self.output.glob("part-*.parquet")):
            if f.name not in self.seen:
                self.seen[f.name] = pq.read_metadata(f).num_rows
        if self.first is None and self.seen:
            self.first = (time.perf_counter(), sum(self.seen.values()))

    def _poll(self) -> None:
        self._scan()

    def rate(self, t0: float) -> dict[str, Any]:
        self._scan()
        now, scored = time.perf_counter(), sum(self.seen.values())
        steady = (scored - self.first[1]) / (now - self.first[0]) if self.first and now > self.first[0] else None
        return {"pairs_scored": scored, "units_written": len(self.seen), "steady_pairs_per_s": steady,
                "first_unit_seconds": self.first[0] - t0 if self.first else None}  # fmt: skip


def child_train(scored: str, work: str, model: str, workers: int) -> dict[str, Any]:
    """The train stage on a synthetic `scored` artifact: `workers` Ray Train workers (gloo), TRAIN_STEPS steps of
    batches of 32, the eval split (EVAL_PAIRS pairs) at the end, the export."""
    from pipeline.config import TrainConfig
    from pipeline.core.runtime import ensure_ray
    from pipeline.stages import train

    ensure_ray()
    _warm(model)
    cfg = TrainConfig.model_validate({
        "model": model, "scored": scored, "output": f"{work}/train", "export": f"{work}/export",
        "max_steps": TRAIN_STEPS, "batch_size": 32, "workers": {"count": workers},
        "checkpoint": {"storage_path": f"{work}/checkpoints"},
    })  # fmt: skip
    with _Sampler() as sampled, _Own() as own:
        t0 = time.perf_counter()
        train.run(cfg)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "driver_growth_mib": own.growth, "worker_peak_mib": sampled.worker_mib,
            "object_store_peak_mib": sampled.store_mib, "spilled_mib": sampled.spilled_mib,
            "bytes_written": _du(work)}  # fmt: skip


def _child(args: argparse.Namespace) -> None:
    step, work = args.child, args.work
    if step == "prepare":
        out = child_prepare(work, args.n, args.model, args.input_files)
    elif step.startswith("plan"):
        out = child_plan(args.artifact, work, step.endswith("after"))
    elif step.startswith("reference"):
        out = child_reference(args.artifact, work, step.removeprefix("reference-"), args.model, args.box)
    elif step == "train":
        out = child_train(args.artifact, work, args.model, args.workers)
    else:
        out = child_read(args.artifact, work, step.endswith("after"), args.workers)
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(
    step: str, n: int, artifact: str, root: Path, workers: int, model: str, files: int, box: float = 0.0
) -> dict[str, Any]:
    work = tempfile.mkdtemp(dir=root, prefix=f"{step}-{n}-")
    cmd = [sys.executable, __file__, "--child", step, "--n", str(n), "--artifact", artifact, "--work", work,
           "--workers", str(workers), "--model", model, "--input-files", str(files), "--box", str(box)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{step} at {n}: exit {done.returncode}\n{done.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", work], check=False)
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


KEYS = [
    "seconds", "driver_growth_mib", "status_seconds", "status_growth_mib", "worker_growth_mib", "worker_peak_mib",
    "object_store_peak_mib", "spilled_mib", "bytes_written", "bytes_fetched_per_worker", "steady_pairs_per_s",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    ap.add_argument("--prepare-max", type=int, default=100_000, help="prepare runs up to this size only")
    ap.add_argument("--reference-max", type=int, default=30_000, help="the reference runs up to this size only")
    ap.add_argument("--workers", type=int, default=2, help="train workers of the read and train steps")
    ap.add_argument("--input-files", type=int, default=4, help="prepare's JSONL input files (the rows split evenly)")
    ap.add_argument("--reference-box", type=float, default=0.0,
                    help="seconds: a reference above --reference-max runs this long")  # fmt: skip
    ap.add_argument("--box", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    from hh_llama import build_hh_llama, hh_records

    from dpo_ray.models.loading import load_tokenizer, tokenizer_fingerprint

    results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in args.steps}
    limits = {"prepare": args.prepare_max, "reference-hf": args.reference_max, "reference-vllm": args.reference_max}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(build_hh_llama(root / "model", hh_records(), hidden=64, layers=1))
        fingerprint = tokenizer_fingerprint(load_tokenizer(model))
        for n in args.pairs:
            boxed = {s for s in args.steps if s.startswith("reference") and n > limits[s] and args.reference_box > 0}
            steps = [s for s in args.steps if n <= limits.get(s, n) or s in boxed]
            built = {}
            for kind, needed in (("scored", {"train", *STEPS[4:]}), ("pairs", {"reference-hf", "reference-vllm"})):
                if needed & set(steps):
                    t0 = time.perf_counter()
                    built[kind] = str(root / f"{kind}-{n}")
                    build_artifact(built[kind], n, kind, fingerprint)
                    print(f"# built {n} {kind} in {time.perf_counter() - t0:.0f} s ({_du(built[kind])} bytes)",
                          flush=True)  # fmt: skip
            for step in steps:
                artifact = built.get("pairs" if step.startswith("reference") else "scored", "")
                box = args.reference_box if step in boxed else 0.0
                results[step][n] = r = _run_child(step, n, artifact, root, args.workers, model, args.input_files, box)
                shown = {k: r[k] for k in [*KEYS, "code"] if k in r}
                print(json.dumps({"step": step, "pairs": n, **shown}), flush=True)
            for uri in built.values():
                subprocess.run(["rm", "-rf", uri], check=False)
    print(f"\ncores: {os.cpu_count()}\n")
    print("| step | pairs | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for step, by_n in results.items():
        sizes = sorted(by_n)
        for n in sizes:
            cells = [
                f"{by_n[n][k]:.1f}" if isinstance(by_n[n].get(k), float) else str(by_n[n].get(k, "")) for k in KEYS
            ]
            print(f"| {step} | {n} | " + " | ".join(cells) + " |")
        full = [n for n in sizes if not by_n[n].get("boxed")]  # a time-boxed step's seconds are its box
        for a, b in zip(full, full[1:], strict=False):
            exps = []
            for k in KEYS:
                va, vb = by_n[a].get(k), by_n[b].get(k)
                ok = isinstance(va, int | float) and isinstance(vb, int | float) and va > 0 and vb > 0
                exps.append(f"{math.log(vb / va) / math.log(b / a):.2f}" if ok else "")
            print(f"| {step} | exponent {a}->{b} | " + " | ".join(exps) + " |")


if __name__ == "__main__":
    main()
