"""Each train worker reads its own shards and gets its rows from the others (dpo_ray.train.rows), against the reading
before it: every worker reads every shard (dpo_ray.data.order.read_splits) and slices each global batch. Gloo
processes at several world sizes, with sequence-parallel groups, a rank without shards, a resumed position and
epochs that cross, for pairs and unpaired rows: the same rows, in the same order, for every step and every eval
batch, so the same weights."""

from __future__ import annotations

import json
import os
import random
import socket
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from dpo_ray.data import artifacts
from dpo_ray.data.order import TRAIN_COLUMNS, UNPAIRED_TRAIN_COLUMNS
from dpo_ray.data.schema import KINDS


def _artifact(path: str, unpaired: bool, n: int, shards: int) -> None:
    rng = random.Random(7)
    rows = []
    for i in range(n):
        ids = [[rng.randrange(50) for _ in range(rng.randrange(1, 9))] for _ in range(3)]
        row = {"split": "eval" if rng.random() < 0.2 else "train", "prompt_ids": ids[0]}
        if unpaired:
            row |= {"row_id": f"{rng.getrandbits(128):032x}", "completion_ids": ids[1],
                    "kl_completion_ids": ids[2], "label": bool(i % 3), "ref_completion_logp": -rng.random(),
                    "ref_kl_logp": -rng.random()}  # fmt: skip
        else:
            row |= {"pair_id": f"{rng.getrandbits(128):032x}", "chosen_ids": ids[1], "rejected_ids": ids[2],
                    "ref_chosen_logp": -rng.random(), "ref_rejected_logp": -rng.random()}  # fmt: skip
        rows.append(row)
    kind = KINDS["scored_unpaired" if unpaired else "scored"]
    schema = pa.schema([kind.field(c) for c in rows[0] if c != "split"] + [kind.field("split")])
    cuts = sorted(rng.sample(range(1, n), shards - 1))  # shards of uneven sizes
    for k, (a, b) in enumerate(zip([0, *cuts], [*cuts, n], strict=True)):
        artifacts.write_table(pa.Table.from_pylist(rows[a:b], schema=schema), path, f"part-{k:05d}.parquet")


def _plain(columns: dict) -> dict:
    return {k: [list(map(int, x)) for x in v] if hasattr(v, "offsets") else np.asarray(v).tolist()
            for k, v in columns.items()}  # fmt: skip


def _cfg(unpaired: bool, steps: int) -> SimpleNamespace:
    return SimpleNamespace(scored="", batch_size=8, total_steps=steps, seed=3, reference_logps=True, eval_every=1,
                           settings=SimpleNamespace(loss=SimpleNamespace(unpaired=unpaired)))  # fmt: skip


def _rank(
    rank: int, world: int, port: int, path: str, out: str, unpaired: bool, group: int, start: list, free: bool
) -> None:
    import torch.distributed as dist

    from dpo_ray.data import artifacts as art
    from dpo_ray.data import order
    from dpo_ray.train import loop, rows
    from dpo_ray.train.checkpoint import LoopState

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    reads = []
    real = art.read_shard
    order.read_shard = lambda u, s, c=None: reads.append(s.file) or real(u, s, c)
    rows.FETCH_ROWS = 3 if world == 3 else 1 << 15  # several exchange rounds, different counts per rank (eval)
    cfg = _cfg(unpaired, steps=0)
    cfg.scored, cfg.scored_shards = path, art.shard_infos(path)
    train, evals = loop._read_rows(cfg)
    replica, replicas = rank // group, world // group
    state = LoopState()
    state.epoch, state.batch_in_epoch, state.step = start[0], start[1], 4  # a restored step count
    cfg.total_steps = state.step + start[2]
    cfg.reference_logps = not free
    steps = []
    for batch, columns in loop._batches(train, cfg, state, replica, replicas):
        state.step += 1
        steps.append({"epoch": state.epoch, "rows": batch.tolist(), "names": train.names(batch),
                      "columns": _plain(columns)})  # fmt: skip
    result = {
        "reads": reads,
        "steps": steps,
        "eval": [_plain(c) for c in loop._eval_batches(cfg, evals, replica, replicas)],
        "check": _plain(loop._fetch(cfg, train, loop.check_positions(train))),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()  # no rank tears the group down while another still talks to it (rank 0 holds the store)
        dist.destroy_process_group()


def _expected(path: str, unpaired: bool, world: int, group: int, start: list, free: bool) -> list[dict]:
    """The reading before: every shard, read_splits, and each global batch sliced per replica (a reference-free
    loss: no reference columns read, zeros in their place)."""
    from dpo_ray.data.order import epoch_batches, read_splits

    columns = UNPAIRED_TRAIN_COLUMNS if unpaired else TRAIN_COLUMNS
    if free:
        columns = [c for c in columns if not c.startswith("ref_")]
    splits = read_splits(path, artifacts.shard_infos(path), ["train", "eval"], columns)
    if free:
        for rows in splits.values():
            rows |= {c: np.zeros(len(rows["pair_id"])) for c in ("ref_chosen_logp", "ref_rejected_logp")}
    train, evals = splits["train"], splits["eval"]
    n, n_eval = len(train[columns[0]]), len(evals[columns[0]])
    first, second = (columns[2], columns[3])
    sides = zip(train["prompt_ids"], train[first], train[second], strict=True)
    longest = [len(p) + max(len(a), len(b)) for p, a, b in sides]
    check = sorted(np.argsort(-np.asarray(longest), kind="stable")[:3])
    out = []
    for rank in range(world):
        replica, replicas = rank // group, world // group
        epoch, batch, steps = start
        got = []
        while len(got) < steps:
            order = epoch_batches(n, 8, 3, epoch)
            for rows in order[batch:]:
                per = 8 // replicas
                mine = rows[replica * per : (replica + 1) * per]
                got.append({"epoch": epoch, "rows": rows.tolist(), "names": [str(x) for x in train[columns[0]][rows]],
                            "columns": _plain({k: v[mine] for k, v in train.items()})})  # fmt: skip
                if len(got) == steps:
                    break
            epoch, batch = epoch + 1, 0
        evals_out = []
        for s in range(0, n_eval, 8):
            rows = np.arange(s, min(s + 8, n_eval))
            mine = rows[replica::replicas] if len(rows) >= replicas else (rows if replica == 0 else rows[:0])
            evals_out.append(_plain({k: v[mine] for k, v in evals.items()}))
        check_rows = _plain({k: v[np.array(check)] for k, v in train.items()})
        out.append({"steps": got, "eval": evals_out, "check": check_rows})
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "world,group,unpaired,shards,start,free",
    [
        (1, 1, False, 5, [0, 0, 9], False),  # one process: no exchange
        (2, 1, False, 9, [0, 0, 9], False),  # 9 steps of 8 over ~32 train rows: epochs 0, 1 and 2
        (4, 2, False, 9, [1, 2, 6], False),  # sequence-parallel groups of 2; resumed at epoch 1, batch 2
        (3, 1, True, 2, [0, 1, 5], False),  # unpaired; 2 shards for 3 ranks: one reads none; exchanges of 3 rows
        (2, 1, False, 4, [0, 3, 4], True),  # a reference-free loss: no reference columns read
    ],
)
def test_each_rank_gets_the_rows_of_reading_every_shard(tmp_path, world, group, unpaired, shards, start, free):
    import torch.multiprocessing as mp

    path, out = str(tmp_path / "scored"), str(tmp_path)
    _artifact(path, unpaired, n=50, shards=shards)
    if world == 1:
        _rank(0, 1, 0, path, out, unpaired, group, start, free)
    else:
        mp.spawn(_rank, args=(world, _port(), path, out, unpaired, group, start, free), nprocs=world, join=True)
    expected = _expected(path, unpaired, world, group, start, free)
    read = []
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["steps"] == expected[rank]["steps"], rank
        assert got["eval"] == expected[rank]["eval"], rank
        assert got["check"] == expected[rank]["check"], rank
        read += got["reads"]
    # every shard read once, by one rank
    assert sorted(read) == sorted(s.file for s in artifacts.shard_infos(path))
    if world == 3:
        assert any(not json.load(open(tmp_path / f"rank{r}.json"))["reads"] for r in range(world))


def test_shards_are_cut_by_bytes_into_runs():
    from dpo_ray.data.artifacts import ShardInfo
    from dpo_ray.train.rows import owned_shards

    def owners(sizes, world):
        shards = [ShardInfo(f"part-{i:05d}.parquet", 1, "", s) for i, s in enumerate(sizes)]
        return [owned_shards(shards, r, world) for r in range(world)]

    assert owners([100, 101, 99, 100], 4) == [[0], [1], [2], [3]]  # near-equal shards: one each
    assert owners([100] * 8, 3) == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert owners([700, 100, 100, 100], 2) == [[0], [1, 2, 3]]
    assert owners([5, 5], 3) == [[0], [], [1]]  # fewer shards than ranks: a rank reads none
    assert owners([], 2) == [[], []]
