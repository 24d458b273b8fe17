"""Each train worker reads and holds its share of the `scored` artifact, not the whole of it.

The order is dpo_ray.data.order's (a split sorted by its identity column, epoch e a permutation seeded by (seed, e)),
and so is each rank's slice of a global batch; only where the rows come from changes. Before, every worker read
every shard (1.7 GB fetched at a million pairs, per worker, at every restart). Now:
- rank r reads only its own run of shards (`owned_shards`: consecutive shards, about 1/world of the bytes) and
  keeps them, the columns the step reads;
- the ranks all-gather each split's identities (and the lengths the pre-training check picks by): every rank
  knows the split's base order and, for each position in it, which rank holds the row and where;
- `SplitRows.fetch(positions)` (collective: every rank calls it together, each with the positions it needs)
  sends each holder the rows asked of it and returns them in the order asked. The loop fetches, at the start of
  each epoch (or where a restored checkpoint resumes one), the rows of its slices of that epoch's batches still
  to train: a worker holds its shards and one epoch's share.

The exchange runs on a gloo group of its own (CPU tensors, whatever backend the training uses); rows travel as
Arrow IPC bytes. In one process (no process group) a SplitRows reads every shard and fetch takes locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray.data.artifacts import ShardInfo
from dpo_ray.data.order import as_columns, split_tables
from dpo_ray.data.schema import KINDS

__all__ = ["FETCH_ROWS", "SplitRows", "owned_shards", "read_split_rows"]

FETCH_ROWS = 1 << 15  # positions a rank asks for in one round of an exchange


def owned_shards(shards: Sequence[ShardInfo], rank: int, world: int) -> list[int]:
    """The shards rank `rank` of `world` reads: a run of consecutive shards, those whose middle byte lies in the
    rank's 1/world of the artifact's bytes (a rank may read none when there are fewer shards than ranks)."""
    sizes = np.array([max(s.size, 1) for s in shards], dtype=np.float64)
    middles = (np.cumsum(sizes) - sizes / 2) / max(sizes.sum(), 1.0)
    owner = np.minimum((middles * world).astype(np.int64), world - 1)
    return np.flatnonzero(owner == rank).tolist()


def _group() -> Any:
    """A gloo group over every rank (created once per process), or None in one process."""
    import torch.distributed as dist

    global _GLOO
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _GLOO is None:
        _GLOO = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _GLOO


_GLOO: Any = None


class SplitRows:
    """One split of the artifact across the ranks (see the module docstring). `n`: rows in the split; `ids`:
    their identities in base order as bytes (every rank holds them: 32 bytes a row; `names` decodes some);
    `longest`: each row's longest sequence in tokens (prompt + the longer completion), in base order."""

    def __init__(self, table: pa.Table, columns: Sequence[str], group: Any) -> None:
        import torch.distributed as dist

        # One chunk: a take from a table of several chunks (one per shard) first copies all of it.
        self.columns, self.group, self.table = list(columns), group, table.combine_chunks()
        key = self.columns[0]
        ids = np.array(table[key].to_pylist(), dtype="S")  # hex digests: ASCII, ordered as the strings
        longest = _longest(table)
        parts: list[Any]
        if group is None:
            parts = [(ids, longest)]
            self.rank, self.world = 0, 1
        else:
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
            parts = [None] * self.world
            dist.all_gather_object(parts, (ids, longest), group=group)
        all_ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(all_ids, kind="stable")
        self.ids = all_ids[order]
        self.longest = np.concatenate([p[1] for p in parts])[order]
        owner = np.concatenate([np.full(len(p[0]), r, dtype=np.int32) for r, p in enumerate(parts)])
        local = np.concatenate([np.arange(len(p[0]), dtype=np.int64) for p in parts])
        self.owner, self.local = owner[order], local[order]
        self.n = len(self.ids)

    def names(self, positions: np.ndarray) -> list[str]:
        """The identities at `positions`, as strings."""
        return [bytes(x).decode() for x in self.ids[positions]]

    def fetch(self, positions: np.ndarray) -> dict[str, Any]:
        """The rows at `positions` (of the base order), in that order, as the step's columns. Collective: every rank
        calls it at the same point, each with its own positions (any number, repeats allowed). The exchange runs
        in rounds of at most FETCH_ROWS positions a rank, so its buffers stay small beside the rows fetched."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.group is None:
            return as_columns(self.table.take(pa.array(self.local[positions])), self.columns)
        import torch
        import torch.distributed as dist

        rounds = torch.tensor([-(-len(positions) // FETCH_ROWS)], dtype=torch.int64)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=self.group)  # every rank runs as many exchanges
        parts = [self._exchange_rows(positions[r * FETCH_ROWS : (r + 1) * FETCH_ROWS]) for r in range(int(rounds))]
        table = pa.concat_tables(parts) if parts else self.table.slice(0, 0)
        columns = as_columns(table, self.columns)
        del table, parts
        return columns

    def _exchange_rows(self, positions: np.ndarray) -> pa.Table:
        """One round of fetch: the rows at `positions`, in that order, as a table."""
        owners = self.owner[positions]
        by_owner = [np.flatnonzero(owners == o) for o in range(self.world)]  # where each holder's rows go
        asked = _exchange([self.local[positions[w]].astype(np.int64).view(np.uint8) for w in by_owner], self.group)
        sent = []
        for request in asked:  # each rank's indices into this rank's rows
            wanted = request.view(np.int64)
            rows = self.table.take(pa.array(wanted)) if len(wanted) else self.table.slice(0, 0)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, rows.schema) as writer:
                writer.write_table(rows)
            sent.append(np.frombuffer(sink.getvalue(), dtype=np.uint8))
        received = _exchange(sent, self.group)
        del sent
        got = [pa.ipc.open_stream(pa.py_buffer(b)).read_all() for b in received]
        table = pa.concat_tables([t for t in got if t.num_rows] or got[:1])  # a rank holding no rows sends none
        back = np.empty(len(positions), dtype=np.int64)  # the row of `table` for each asked position
        back[np.concatenate(by_owner)] = np.arange(len(positions))
        return table.take(pa.array(back))  # new buffers: nothing refers to the received bytes after this


def _longest(table: pa.Table) -> np.ndarray:
    names = table.column_names
    first, second = ("chosen_ids", "rejected_ids") if "chosen_ids" in names else ("completion_ids", "kl_completion_ids")
    lengths = [pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in ("prompt_ids", first, second)]
    return (lengths[0] + np.maximum(lengths[1], lengths[2])).astype(np.int64)


def _exchange(outgoing: list[np.ndarray], group: Any) -> list[np.ndarray]:
    """All-to-all of byte arrays (uint8): outgoing[r] goes to rank r; returns what each rank sent this one, as views of
    one receive buffer."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = torch.tensor([len(b) for b in outgoing], dtype=torch.int64)
    incoming = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(incoming, sizes, group=group)
    send = torch.from_numpy(np.concatenate(outgoing)) if outgoing else torch.empty(0, dtype=torch.uint8)
    recv = torch.empty(int(incoming.sum()), dtype=torch.uint8)
    dist.all_to_all_single(recv, send, incoming.tolist(), sizes.tolist(), group=group)
    data = recv.numpy()
    bounds = np.concatenate([[0], np.cumsum(incoming.numpy())])
    return [data[bounds[r] : bounds[r + 1]] for r in range(world)]


def read_split_rows(
    artifact: str, shards: Sequence[ShardInfo], splits: Sequence[str], columns: Sequence[str]
) -> dict[str, SplitRows]:
    """Each of `splits` as SplitRows: this rank reads its owned shards (each once, for every split), then the
    ranks gather the identities. Collective in a process group."""
    import torch.distributed as dist

    group = _group()
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    key, wanted = columns[0], list(dict.fromkeys(columns))
    parts = split_tables(artifact, [shards[i] for i in owned_shards(shards, rank, world)], splits, columns)
    out = {}
    for s in splits:
        if parts[s]:
            table = pa.concat_tables(parts[s])
        else:  # this rank holds no shard: an empty table of the artifact's types
            schema = KINDS["scored" if key == "pair_id" else "scored_unpaired"]
            table = pa.schema([schema.field(c) for c in wanted]).empty_table()
        out[s] = SplitRows(table, columns, group)
    return out
