"""The training order: a function of the artifact and the seed only.

Ray Data does not keep block order by default, so a many-shard artifact read twice came back in two
orders (two runs of one config differed from step 1, and a restarted job resumed its position in the
epoch against another order). Here every worker reads the split itself, sorts it by `pair_id` (the
content hash: the base order does not depend on shards, units or how they were written), and takes
epoch e's order from a permutation seeded by (seed, e): identical on every rank, different every epoch
(so `drop_last` drops different pairs), and restored exactly on resume from (epoch, batch in epoch).

pyarrow and numpy only (no torch, Ray or transformers). Shards are read through dpo_ray.artifacts.read_shard:
size, sha256 and page checksums verified against the manifest on every read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray.artifacts import ShardInfo, read_shard

__all__ = ["TRAIN_COLUMNS", "epoch_batches", "read_split", "split_counts"]

TRAIN_COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logp", "ref_rejected_logp"]


def split_counts(artifact: str, shards: Sequence[ShardInfo]) -> dict[str, int]:
    """Rows per split over the artifact's shards (decodes only the `split` column)."""
    counts: dict[str, int] = {}
    for shard in shards:
        split = read_shard(artifact, shard, ["split"])["split"].to_numpy(zero_copy_only=False)
        for name, n in zip(*np.unique(split, return_counts=True), strict=True):
            counts[str(name)] = counts.get(str(name), 0) + int(n)
    return counts


def read_split(
    artifact: str, shards: Sequence[ShardInfo], split: str, columns: Sequence[str] = TRAIN_COLUMNS
) -> dict[str, Any]:
    """The rows of `split` from all the artifact's shards, sorted by pair_id, as {column: numpy array} (list
    columns as object arrays of lists)."""
    wanted = list(dict.fromkeys(["pair_id", *columns]))
    tables = [
        t.filter(pc.equal(t["split"], split)).drop_columns(["split"])
        for t in (read_shard(artifact, shard, [*wanted, "split"]) for shard in shards)
    ]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in wanted})
    table = table.sort_by("pair_id")
    out: dict[str, Any] = {}
    for c in columns:
        col = table[c]
        if pa.types.is_list(col.type):
            # A 1-D object array of lists: np.array(lists) would make a 2-D array when the lengths agree.
            out[c] = np.empty(table.num_rows, dtype=object)
            out[c][:] = col.to_pylist()
        else:
            out[c] = col.to_numpy()
    return out


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of epoch `epoch`'s global batches, (n // batch_size, batch_size): a permutation of
    range(n) seeded by (seed, epoch), cut into full batches (the last n % batch_size rows of that
    permutation are dropped, a different set each epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    perm = np.random.default_rng([seed % 2**32, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)
