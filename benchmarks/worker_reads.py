"""What each train worker reads at start, measured: bytes fetched and memory held per worker, before and after.

Before (dpo_ray.data.order.read_splits): every worker read every shard (fetched whole to check its sha256,
then the training columns decoded; token ids kept as flat arrays) and kept the whole of both splits, so the
bytes read per worker were the artifact's size, whatever the number of workers. After (dpo_ray.train.rows, what
worker_loop runs): each worker reads its own run of shards, the workers exchange their rows over gloo, and each
holds its shards' rows plus its slices of one epoch's batches. This script builds a `scored` artifact of
HH-RLHF shape (the sample's texts; the token counts of benchmarks/hh_lengths.json: the sample tokenized at
max_length 512 with an 8k BPE trained on it; random ids below 128k and random log-probs), runs both readings
for each rank (the after one in real gloo processes, one epoch fetched), and counts the bytes fetched from
storage and the bytes of the rows held.

    .venv/bin/python benchmarks/worker_reads.py [--pairs 20000] [--workers 4] [--rows-per-shard 5000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpo_ray.data import artifacts, order
from dpo_ray.data.schema import SCORED_SCHEMA
from dpo_ray.data.tokenization import pair_id, split_of

HERE = Path(__file__).resolve().parent


def build(uri: str, pairs: int, rows_per_shard: int) -> artifacts.Manifest:
    sys.path.insert(0, str(HERE))
    from hh_llama import hh_records

    records = hh_records()
    lengths = json.loads((HERE / "hh_lengths.json").read_text())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(pairs):
        rec, (lp, lc, lr) = records[i % len(records)], lengths[i % len(lengths)]
        cut = rec["chosen"].rfind("Assistant:") + len("Assistant:")
        prompt, chosen, rejected = rec["chosen"][:cut] + f" #{i}", rec["chosen"][cut:], rec["rejected"][cut:]
        pid = pair_id(prompt, chosen, rejected)
        c_logps = rng.normal(-2, 1, lc).astype(np.float32)
        r_logps = rng.normal(-2, 1, lr).astype(np.float32)
        rows.append(
            {
                "pair_id": pid,
                "split": split_of(prompt, 0.05),
                "prompt_ids": rng.integers(0, 128_000, lp).tolist(),
                "chosen_ids": rng.integers(0, 128_000, lc).tolist(),
                "rejected_ids": rng.integers(0, 128_000, lr).tolist(),
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "source": "hh",
                "ref_chosen_logps": c_logps.tolist(),
                "ref_rejected_logps": r_logps.tolist(),
                "ref_chosen_logp": float(c_logps.sum()),
                "ref_rejected_logp": float(r_logps.sum()),
            }
        )
    for k in range(0, pairs, rows_per_shard):
        table = pa.Table.from_pylist(rows[k : k + rows_per_shard], schema=SCORED_SCHEMA)
        artifacts.write_table(table, uri, f"part-{k // rows_per_shard:05d}.parquet")
    return artifacts.write_manifest(uri, "scored", {}, {}, {}, {}, shards=artifacts.shard_infos(uri))


def _nbytes(column: object) -> int:
    """Bytes a held column takes: flat values + offsets, numeric arrays, or object arrays with their strings."""
    if isinstance(column, order.RaggedColumn):
        return int(column.values.nbytes + column.offsets.nbytes)
    assert isinstance(column, np.ndarray)
    if column.dtype == object:
        return int(column.nbytes + sum(sys.getsizeof(x) for x in column))
    return int(column.nbytes)


def _after(rank: int, world: int, port: int, uri: str, batch: int, out: str) -> None:
    """One gloo rank of the reading worker_loop runs: its shards, the identities, one epoch's slices fetched."""
    import torch.distributed as dist

    from dpo_ray.train import rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    manifest = artifacts.read_manifest(uri)
    assert manifest is not None
    fetched = [0]
    verified_read = order.read_shard

    def counting(uri: str, shard: artifacts.ShardInfo, columns: list[str] | None = None) -> pa.Table:
        fetched[0] += shard.size
        return verified_read(uri, shard, columns)

    order.read_shard = counting  # type: ignore[assignment]
    t0 = time.perf_counter()
    splits = rows.read_split_rows(uri, manifest.shards, ["train", "eval"], order.TRAIN_COLUMNS)
    train = splits["train"]
    batches = order.epoch_batches(train.n, batch, 0, 0)
    per = batch // world
    epoch = train.fetch(np.concatenate([b[rank * per : (rank + 1) * per] for b in batches]))
    seconds = time.perf_counter() - t0
    held_shards = sum(s.table.nbytes for s in splits.values())
    held_epoch = sum(_nbytes(v) for v in epoch.values())
    held_ids = sum(s.ids.nbytes + s.longest.nbytes + s.owner.nbytes + s.local.nbytes for s in splits.values())
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "bytes_fetched": fetched[0], "bytes_held_shards": held_shards,
                   "bytes_held_epoch": held_epoch, "bytes_held_index": held_ids, "seconds": seconds}, f)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rows-per-shard", type=int, default=5_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"{tmp}/scored"
        manifest = build(uri, args.pairs, args.rows_per_shard)
        size = sum(s.size for s in manifest.shards)
        fetched = [0]
        verified_read = order.read_shard

        def counting(uri: str, shard: artifacts.ShardInfo, columns: list[str] | None = None) -> pa.Table:
            fetched[0] += shard.size  # read_shard fetches the whole file (sha256) before decoding columns
            return verified_read(uri, shard, columns)

        order.read_shard = counting  # type: ignore[assignment]
        per_worker = []
        for rank in range(args.workers):
            fetched[0] = 0
            t0 = time.perf_counter()
            splits = order.read_splits(uri, manifest.shards, ["train", "eval"])
            seconds = time.perf_counter() - t0
            held = sum(_nbytes(v) for columns in splits.values() for v in columns.values())
            per_worker.append(
                {"rank": rank, "bytes_fetched": fetched[0], "python_bytes_held": held, "seconds": seconds}
            )
            del splits
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        mp.spawn(_after, args=(args.workers, port, uri, args.workers * 16, tmp), nprocs=args.workers, join=True)
        after = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(args.workers)]
    pair_bytes = size / args.pairs
    held_per_pair = np.mean([w["python_bytes_held"] for w in per_worker]) / args.pairs
    out = {
        "pairs": args.pairs,
        "shards": len(manifest.shards),
        "artifact_bytes": size,
        "artifact_bytes_per_pair": round(pair_bytes, 1),
        "before_workers": per_worker,
        "before_cluster_bytes_fetched": sum(w["bytes_fetched"] for w in per_worker),
        "after_workers": after,
        "after_cluster_bytes_fetched": sum(w["bytes_fetched"] for w in after),
        "before_held_bytes_per_pair_per_worker": round(float(held_per_pair), 1),
        "after_held_bytes_per_pair_per_worker": round(
            float(np.mean([w["bytes_held_shards"] + w["bytes_held_epoch"] + w["bytes_held_index"] for w in after]))
            / args.pairs,
            1,
        ),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
