"""The training order (dpo_ray.data.order): a function of the artifact's content and the seed only."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import ShardInfo
from dpo_ray.data.order import epoch_batches, read_split, split_counts
from tests.counted_s3 import counted_s3


def _shards(tmp_path, n: int = 50, per_shard: int = 7) -> list[ShardInfo]:
    rng = random.Random(0)
    rows = [
        {
            "pair_id": f"{rng.getrandbits(64):016x}",
            "split": "eval" if i % 5 == 0 else "train",
            "prompt_ids": [1, i],
            "chosen_ids": [i, 2],
            "rejected_ids": [i, i, 2],
            "ref_chosen_logp": -float(i),
            "ref_rejected_logp": -2.0 * i,
        }
        for i in range(n)
    ]
    for k in range(0, n, per_shard):
        artifacts.write_table(pa.Table.from_pylist(rows[k : k + per_shard]), str(tmp_path), f"part-{k:05d}.parquet")
    return artifacts.shard_infos(str(tmp_path))


def test_read_split_is_sorted_by_pair_id_whatever_the_shard_order(tmp_path):
    shards, uri = _shards(tmp_path), str(tmp_path)
    a = read_split(uri, shards, "train")
    b = read_split(uri, list(reversed(shards)), "train")
    assert list(a["pair_id"]) == sorted(a["pair_id"]) == list(b["pair_id"])
    assert len(a["pair_id"]) == 40 and split_counts(uri, shards) == {"train": 40, "eval": 10}
    i = list(a["pair_id"]).index(a["pair_id"][3])
    assert a["chosen_ids"][i] == b["chosen_ids"][i] and a["ref_chosen_logp"][i] == b["ref_chosen_logp"][i]
    assert all(len(x) == 2 for x in a["prompt_ids"])


def test_epoch_batches_are_seeded_per_epoch_and_drop_a_different_remainder():
    e0, again, e1 = epoch_batches(103, 10, 5, 0), epoch_batches(103, 10, 5, 0), epoch_batches(103, 10, 5, 1)
    assert e0.shape == (10, 10)
    np.testing.assert_array_equal(e0, again)
    assert not np.array_equal(e0, e1)
    assert len(set(e0.ravel())) == 100  # each row at most once an epoch
    dropped0, dropped1 = set(range(103)) - set(e0.ravel()), set(range(103)) - set(e1.ravel())
    assert dropped0 != dropped1
    assert not np.array_equal(epoch_batches(103, 10, 6, 0), e0)


def test_read_splits_reads_each_shard_once_and_matches_the_python_lists(tmp_path, monkeypatch):
    from dpo_ray.data import order
    from dpo_ray.data.order import RaggedColumn, read_splits

    shards, uri = _shards(tmp_path), str(tmp_path)
    reads = []
    real = order.read_shard
    monkeypatch.setattr(order, "read_shard", lambda u, s, c=None: reads.append(s.file) or real(u, s, c))
    both = read_splits(uri, shards, ["train", "eval"])
    assert sorted(reads) == sorted(s.file for s in shards)  # one read per shard for both splits
    table = pa.concat_tables([artifacts.read_shard(uri, s) for s in shards])
    for split in ("train", "eval"):
        rows = sorted((r for r in table.to_pylist() if r["split"] == split), key=lambda r: r["pair_id"])
        got = both[split]
        assert list(got["pair_id"]) == [r["pair_id"] for r in rows]
        ids = got["chosen_ids"]
        assert isinstance(ids, RaggedColumn) and len(ids) == len(rows)
        assert [ids[i] for i in range(len(ids))] == [r["chosen_ids"] for r in rows]
        pick = np.array([len(rows) - 1, 0, 2])
        assert [list(map(int, x)) for x in ids[pick]] == [rows[i]["chosen_ids"] for i in pick]
        assert len(ids[np.array([], dtype=np.int64)]) == 0


def test_split_counts_fetch_the_split_column_only(tmp_path, monkeypatch):
    """train's driver counts the splits of an artifact require_complete already verified whole: it fetches the
    `split` column's pages, not every shard a second time; a shard of another size, or a damaged page, is refused."""
    import pyarrow.parquet as pq
    import pytest

    rng = np.random.default_rng(0)
    uri = str(tmp_path)
    for k in range(4):  # shards of 2,000 pairs with 200 token ids each: the split column is a small part of them
        ids = pa.ListArray.from_arrays(pa.array(np.arange(0, 2001 * 200, 200, dtype=np.int32)),
                                       pa.array(rng.integers(0, 2**31 - 1, 2000 * 200, dtype=np.int32)))  # fmt: skip
        split = ["eval" if i % 5 == 0 else "train" for i in range(2000)]
        table = pa.table({"pair_id": [f"{k}-{i}" for i in range(2000)], "split": split, "chosen_ids": ids})
        artifacts.write_table(table, uri, f"part-{k:05d}.parquet")
    shards = artifacts.shard_infos(uri)
    expected: dict[str, int] = {}
    for shard in shards:
        for s in pq.read_table(tmp_path / shard.file, columns=["split"])["split"].to_pylist():
            expected[s] = expected.get(s, 0) + 1
    real_fs = artifacts.artifact_fs
    read = [0]

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, *args):
            data = self.f.read(*args)
            read[0] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    class CountingFs:
        def __init__(self, fs):
            self.fs = fs

        def open(self, *args, **kwargs):
            return Counted(self.fs.open(*args, **kwargs))

        def __getattr__(self, name):
            return getattr(self.fs, name)

    monkeypatch.setattr(artifacts, "artifact_fs", lambda u: (CountingFs(real_fs(u)[0]), real_fs(u)[1]))
    assert split_counts(uri, shards) == expected == {"train": 6400, "eval": 1600}
    # What is fetched: the footers (pyarrow reads up to 64 KiB at a file's end) and the split columns' pages.
    column = sum(pq.ParquetFile(tmp_path / s.file).metadata.row_group(0).column(1).total_compressed_size
                 for s in shards)  # fmt: skip
    assert read[0] <= column + len(shards) * 2**16 < sum(s.size for s in shards) / 10, (read[0], column)
    path = tmp_path / shards[0].file
    data = path.read_bytes()
    path.write_bytes(data + b"x")
    with pytest.raises(artifacts.ArtifactError, match=f"{shards[0].file}: size expected {len(data)} bytes"):
        split_counts(uri, shards)
    meta = pq.ParquetFile(tmp_path / shards[1].file).metadata.row_group(0).column(1)
    assert meta.path_in_schema == "split"
    damaged = bytearray((tmp_path / shards[1].file).read_bytes())
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    at = start + meta.total_compressed_size - 4  # in the column chunk's last page
    damaged[at : at + 2] = bytes(b ^ 0xFF for b in damaged[at : at + 2])
    (tmp_path / shards[1].file).write_bytes(bytes(damaged))
    path.write_bytes(data)
    with pytest.raises(artifacts.ArtifactError, match=f"{shards[1].file}: not a readable Parquet shard"):
        split_counts(uri, shards)


def test_split_counts_on_object_storage_fetch_no_read_ahead(tmp_path, monkeypatch):
    """On S3 (moto, server mode, 127.0.0.1) the split column is fetched with ranged reads and nothing more: an
    object store's file read ahead a whole block (s3fs: 50 MB, the rest of each shard) before; the bytes are
    counted by the server."""
    import s3fs

    with counted_s3(monkeypatch, "/part-") as served:
        fs = s3fs.S3FileSystem()
        fs.mkdir("counted")
        rng = np.random.default_rng(0)
        ids = pa.ListArray.from_arrays(pa.array(np.arange(0, 3001 * 200, 200, dtype=np.int32)),
                                       pa.array(rng.integers(0, 2**31 - 1, 3000 * 200, dtype=np.int32)))  # fmt: skip
        split = ["eval" if i % 4 == 0 else "train" for i in range(3000)]
        artifacts.write_table(pa.table({"split": split, "chosen_ids": ids}), "s3://counted/a", "part-00000.parquet")
        shards = artifacts.shard_infos("s3://counted/a")
        served.clear()
        assert split_counts("s3://counted/a", shards) == {"train": 2250, "eval": 750}
        assert sum(served) <= 2**16 + 2**12 < shards[0].size / 20, (served, shards[0].size)
