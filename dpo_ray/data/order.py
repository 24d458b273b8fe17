"""The training order: a function of the artifact and the seed only.

Ray Data does not keep block order by default, so a many-shard artifact read twice came back in two
orders (two runs of one config differed from step 1, and a restarted job resumed its position in the
epoch against another order). Here a split is sorted by `pair_id` (the content hash: the base order does not
depend on shards, units or how they were written: read_splits reads a whole split so; a train worker holds
only its share, dpo_ray.train.rows, in the same order), and each worker takes
epoch e's order from a permutation seeded by (seed, e): identical on every rank, different every epoch
(so `drop_last` drops different pairs), and restored exactly on resume from (epoch, batch in epoch).

pyarrow and numpy only (no torch, Ray or transformers). Shards are read through dpo_ray.data.artifacts.read_shard:
size, sha256 and page checksums verified against the manifest on every read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray.data.artifacts import ShardInfo, read_columns, read_shard

__all__ = [
    "TRAIN_COLUMNS",
    "UNPAIRED_TRAIN_COLUMNS",
    "RaggedColumn",
    "as_columns",
    "epoch_batches",
    "read_split",
    "read_splits",
    "split_counts",
    "split_tables",
]

# What training reads of a `scored` and of a `scored_unpaired` artifact; the first column is the row's identity,
# the base order.
TRAIN_COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logp", "ref_rejected_logp"]
UNPAIRED_TRAIN_COLUMNS = [
    "row_id", "prompt_ids", "completion_ids", "kl_completion_ids", "label", "ref_completion_logp", "ref_kl_logp",
]  # fmt: skip


def split_counts(artifact: str, shards: Sequence[ShardInfo]) -> dict[str, int]:
    """Rows per split over the shards of an artifact verified whole (require_complete): only the `split` column
    is fetched (artifacts.read_columns), not the artifact a second time."""
    counts: dict[str, int] = {}
    for shard in shards:
        split = read_columns(artifact, shard, ["split"])["split"].to_numpy(zero_copy_only=False)
        for name, n in zip(*np.unique(split, return_counts=True), strict=True):
            counts[str(name)] = counts.get(str(name), 0) + int(n)
    return counts


class RaggedColumn:
    """A list<int> column held as flat values and row offsets (4 bytes a token), not Python lists (measured
    ~9 KB a pair of HH shape: benchmarks/worker_reads.py). Indexing with an int gives that row as a list;
    with an array of rows, a RaggedColumn of those rows; iterating gives each row as a numpy array."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, offsets

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> RaggedColumn:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(column)
        flat = (values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values).to_numpy()
        return cls(flat, np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.values[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int | np.integer):
            return self.values[self.offsets[index] : self.offsets[index + 1]].tolist()
        rows = np.asarray(index, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        pieces = [self.values[a:b] for a, b in zip(starts, ends, strict=True)]
        values = np.concatenate(pieces) if pieces else self.values[:0]
        return RaggedColumn(values, np.concatenate([np.zeros(1, np.int64), np.cumsum(ends - starts)]))


def split_tables(
    artifact: str, shards: Sequence[ShardInfo], splits: Sequence[str], columns: Sequence[str]
) -> dict[str, list[pa.Table]]:
    """The rows of each of `splits` in `shards` (each shard read once), a table per shard, unsorted, with the
    columns `columns` (the first must be the rows' identity: pair_id or row_id)."""
    key = columns[0]
    if key not in ("pair_id", "row_id"):
        raise ValueError(f"the first column must be the rows' identity (pair_id or row_id), found {key!r}")
    wanted = list(dict.fromkeys(columns))
    parts: dict[str, list[pa.Table]] = {s: [] for s in splits}
    for shard in shards:
        table = read_shard(artifact, shard, [*wanted, "split"])
        for s in splits:
            parts[s].append(table.filter(pc.equal(table["split"], s)).drop_columns(["split"]))
    return parts


def as_columns(table: pa.Table, columns: Sequence[str]) -> dict[str, Any]:
    """A table as the step's columns: list columns as RaggedColumn, the others as numpy arrays."""
    return {
        c: RaggedColumn.from_arrow(table[c]) if pa.types.is_list(table[c].type) else table[c].to_numpy()
        for c in columns
    }


def read_splits(
    artifact: str, shards: Sequence[ShardInfo], splits: Sequence[str], columns: Sequence[str] = TRAIN_COLUMNS
) -> dict[str, dict[str, Any]]:
    """The rows of each of `splits` from all the artifact's shards (each shard read once), sorted by the identity
    column (`columns[0]`: pair_id or row_id), as {split: {column: array}}: list columns as RaggedColumn, the others
    as numpy arrays."""
    parts = split_tables(artifact, shards, splits, columns)
    wanted = list(dict.fromkeys(columns))
    out: dict[str, dict[str, Any]] = {}
    for s in splits:
        table = pa.concat_tables(parts[s]).sort_by(columns[0]) if parts[s] else pa.table({c: [] for c in wanted})
        out[s] = as_columns(table, columns)
    return out


def read_split(
    artifact: str, shards: Sequence[ShardInfo], split: str, columns: Sequence[str] = TRAIN_COLUMNS
) -> dict[str, Any]:
    """One split (see read_splits)."""
    return read_splits(artifact, shards, [split], columns)[split]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of epoch `epoch`'s global batches, (n // batch_size, batch_size): a permutation of
    range(n) seeded by (seed, epoch), cut into full batches (the last n % batch_size rows of that
    permutation are dropped, a different set each epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    perm = np.random.default_rng([seed % 2**32, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)
