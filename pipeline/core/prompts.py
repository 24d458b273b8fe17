"""The unique prompts of one split of a `pairs` (or `unpaired`) artifact, without holding them at the driver.

Generate samples the unique train prompts, evaluate the first eval prompts; both order them by prompt id (the
content hash of the text: `dpo_ray.data.tokenization.prompt_id`) and take the first `limit`. A million prompts
held as Python dicts cost the driver about 7 GB, so the driver keeps only an index here: per unique prompt its
id (32 bytes), the shard and the row that first holds it, as numpy arrays (`PromptIndex`, ~40 bytes a prompt,
read from the `prompt` and `split` columns one shard at a time). The prompts themselves go where they are used:
- `take`: a few prompts (evaluate's) as dicts, reading only the shards that hold them;
- `write_plan`: generate's units, written to storage in prompt-id order, `per_unit` prompts a Parquet row group,
  files of at most `PLAN_ROWS` prompts; a unit reads its row group (`read_unit`). The driver writes them in two
  linear passes with bounded memory: each shard's selected prompts go to a piece per plan file, then each plan
  file is its pieces sorted.

The prompts are those of reading every row in shard order and keeping a prompt text's first row: a prompt's
`prompt_ids` are its first row's.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpo_ray.data import artifacts

__all__ = ["PLAN_ROWS", "PromptIndex", "prompt_index", "read_unit", "take", "unit_names", "write_plan"]

COLUMNS = ["prompt_id", "prompt", "prompt_ids"]  # what a prompt is, for the stages
PLAN_ROWS = 1 << 14  # prompts a plan file holds at most (rounded down to whole units): the driver's bound


@dataclass(frozen=True)
class PromptIndex:
    """Unique prompts in prompt-id order: `ids` (32 hex chars as bytes), and where each first appears: `shard`
    (index into the manifest's shards) and `row` (within that shard)."""

    ids: np.ndarray
    shard: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, limit: int | None) -> PromptIndex:
        return self if not limit else PromptIndex(self.ids[:limit], self.shard[:limit], self.row[:limit])


def prompt_index(uri: str, manifest: Any, split: str, limit: int | None = None) -> PromptIndex:
    """The unique prompts (by text) of `split`, ordered by prompt id, the first `limit` of them (all when None);
    two columns of each shard are read, one shard at a time."""
    from dpo_ray.data.tokenization import prompt_id

    ids, shards, rows = [], [], []
    for number, shard in enumerate(manifest.shards):
        table = artifacts.read_shard(uri, shard, ["prompt", "split"])
        where = np.flatnonzero(pc.equal(table["split"], split).to_numpy(zero_copy_only=False))
        # each text's first row in the shard (Arrow's hash grouping), then its id
        first = (
            pa.table({"prompt": table["prompt"].take(pa.array(where)), "row": pa.array(where, pa.int64())})
            .group_by("prompt", use_threads=False)
            .aggregate([("row", "min")])
        )
        del table
        ids.append(np.array([prompt_id(t) for t in first["prompt"].to_pylist()], dtype="S32"))
        shards.append(np.full(first.num_rows, number, dtype=np.int32))
        rows.append(first["row_min"].to_numpy())
        del first
    all_ids = np.concatenate(ids) if ids else np.array([], dtype="S32")
    order = np.argsort(all_ids, kind="stable")  # ties (one text in several shards): the first shard's row first
    sorted_ids = all_ids[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = sorted_ids[1:] != sorted_ids[:-1]
    picked = order[keep]
    index = PromptIndex(
        sorted_ids[keep],
        (np.concatenate(shards) if shards else np.array([], np.int32))[picked],
        (np.concatenate(rows) if rows else np.array([], np.int64))[picked],
    )
    return index.head(limit)


def _rows(uri: str, manifest: Any, index: PromptIndex, rank: np.ndarray, shard: int) -> pa.Table:
    """The prompts of `index` held by `shard` (rank: their positions in the index) as a table with a rank column."""
    mine = np.flatnonzero(index.shard[rank] == shard)
    table = artifacts.read_shard(uri, manifest.shards[shard], ["prompt", "prompt_ids"])
    table = table.take(pa.array(index.row[rank[mine]]))
    return pa.table(
        {
            "rank": pa.array(rank[mine], pa.int64()),
            "prompt_id": pa.array(index.ids[rank[mine]].astype(str)),
            "prompt": table["prompt"],
            "prompt_ids": table["prompt_ids"],
        }
    )


def take(uri: str, manifest: Any, index: PromptIndex) -> list[dict[str, Any]]:
    """Every prompt of `index`, in its order, as {prompt_id, prompt, prompt_ids}; only the shards holding them are
    read. For a few prompts (evaluate's): the driver holds them all."""
    rank = np.arange(len(index))
    parts = [_rows(uri, manifest, index, rank, s) for s in np.unique(index.shard).tolist()]
    if not parts:
        return []
    table = pa.concat_tables(parts).sort_by("rank")
    return table.select(COLUMNS).to_pylist()


def plan_files(count: int, per_unit: int) -> list[tuple[str, int, int]]:
    """The plan's files for `count` prompts: (name, first prompt, prompts), each a whole number of units."""
    size = max(per_unit, PLAN_ROWS // per_unit * per_unit)
    return [(f"prompts-{i // size:05d}.parquet", i, min(size, count - i)) for i in range(0, count, size)]


def _unit_name(first: int, per_unit: int) -> str:
    return f"part-{first // per_unit:05d}.parquet"


def unit_names(count: int, per_unit: int) -> list[str]:
    """The names of the units (and of their output shards) of `count` prompts, in order."""
    return [_unit_name(first, per_unit) for first in range(0, count, per_unit)]


def write_plan(
    uri: str, manifest: Any, index: PromptIndex, per_unit: int, plan: str, done: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Write the prompts of `index` under `plan` (see the module docstring) and return the units in prompt-id
    order, but those named in `done` (a resumed run's finished units): {"name": "part-00000.parquet", "plan": file
    URI, "group": row group}: unit i holds prompts [i * per_unit, (i + 1) * per_unit). A plan file whose units are
    all done is not written, and a shard holding none of the other prompts is not read. Memory: one shard and one
    plan file's prompts."""
    files = plan_files(len(index), per_unit)
    needed = [
        f for f, (_, first, count) in enumerate(files)
        if any(_unit_name(u, per_unit) not in done for u in range(first, first + count, per_unit))
    ]  # fmt: skip
    starts = np.array([first for _, first, _ in files], dtype=np.int64)
    fs, path = artifacts.artifact_fs(plan)
    fs.makedirs(path, exist_ok=True)
    pieces = artifacts.join(plan, ".pieces")
    rank = np.concatenate([np.arange(files[f][1], files[f][1] + files[f][2]) for f in needed] or [np.zeros(0, int)])
    for shard in np.unique(index.shard[rank]).tolist():  # pass 1: each shard's prompts, a piece per plan file
        rows = _rows(uri, manifest, index, rank, shard)
        which = np.searchsorted(starts, rows["rank"].to_numpy(), side="right") - 1
        for f in np.unique(which).tolist():
            artifacts.write_table(rows.filter(pa.array(which == f)), pieces, f"{f:05d}-{shard:06d}.parquet")
        del rows
    units = []
    for f in needed:  # pass 2: a plan file is its pieces, sorted
        name, first, count = files[f]
        names = artifacts.list_shards(pieces, f"{f:05d}-*.parquet")
        parts = []
        for piece in names:
            with fs.open(artifacts.join(path, ".pieces", piece), "rb") as fh:
                parts.append(pq.read_table(fh))
        table = pa.concat_tables(parts).sort_by("rank")
        if table.num_rows != count or table["rank"][0].as_py() != first:
            raise RuntimeError(f"{plan}/{name}: expected prompts {first}..{first + count - 1}, found {table.num_rows}")
        with fs.open(artifacts.join(path, name), "wb") as fh:
            pq.write_table(table.select(COLUMNS), fh, row_group_size=per_unit, write_page_checksum=True)
        for piece in names:
            fs.rm(artifacts.join(path, ".pieces", piece))
        del table, parts
        units += [
            {"name": _unit_name(first + g * per_unit, per_unit), "plan": artifacts.join(plan, name), "group": g}
            for g in range(-(-count // per_unit))
            if _unit_name(first + g * per_unit, per_unit) not in done
        ]
    if fs.exists(artifacts.join(path, ".pieces")):
        fs.rm(artifacts.join(path, ".pieces"), recursive=True)
    return units


def read_unit(unit: dict[str, Any]) -> list[dict[str, Any]]:
    """A unit's prompts from its plan file (page checksums verified)."""
    fs, path = artifacts.artifact_fs(unit["plan"])
    with fs.open(path, "rb") as fh:
        table = pq.ParquetFile(fh, page_checksum_verification=True).read_row_group(unit["group"])
    return table.to_pylist()
