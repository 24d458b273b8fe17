"""Manifests: written last, identity independent of timestamps, completeness and refusals."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import ArtifactError


def _write(uri: str, values: list[int]) -> None:
    artifacts.write_table(pa.table({"x": pa.array(values, pa.int32())}), uri, "part-00000.parquet")


def test_identity_ignores_time_and_follows_content(tmp_path):
    uri = str(tmp_path / "a")
    _write(uri, [1, 2, 3])
    m1 = artifacts.write_manifest(uri, "pairs", {"k": 1}, {"tokenizer": "t"}, {"in": "u"}, {"took": 1.0})
    first = artifacts.manifest_sha256(uri)
    time.sleep(1.1)
    m2 = artifacts.write_manifest(uri, "pairs", {"k": 1}, {"tokenizer": "t"}, {"in": "u"}, {"took": 2.0})
    assert m1.created_at != m2.created_at and artifacts.manifest_sha256(uri) == first
    assert m2.rows == 3 and m2.shards[0].rows == 3
    _write(uri, [1, 2, 4])
    artifacts.write_manifest(uri, "pairs", {"k": 1}, {"tokenizer": "t"}, {"in": "u"}, {})
    assert artifacts.manifest_sha256(uri) != first


def test_completeness_and_refusals(tmp_path):
    uri = str(tmp_path / "b")
    with pytest.raises(ArtifactError, match="does not exist"):
        artifacts.require_complete(uri, "pairs")
    _write(uri, [1])
    with pytest.raises(ArtifactError, match="is incomplete"):
        artifacts.require_complete(uri, "pairs")
    assert artifacts.complete_manifest(uri, {"k": 1}, {}) is None
    artifacts.write_manifest(uri, "scored", {"k": 1}, {}, {}, {})
    with pytest.raises(ArtifactError, match="expected a 'pairs' artifact, found 'scored'"):
        artifacts.require_complete(uri, "pairs")
    assert artifacts.complete_manifest(uri, {"k": 1}, {}) is not None
    assert artifacts.complete_manifest(uri, {"k": 2}, {}) is None  # another config
    assert artifacts.complete_manifest(uri, {"k": 1}, {"x": "y"}) is None  # another upstream
    (tmp_path / "b" / "part-00000.parquet").unlink()
    assert artifacts.complete_manifest(uri, {"k": 1}, {}) is None  # a listed shard is missing


def test_shard_schemas_are_checked_column_by_column(tmp_path):
    uri = str(tmp_path / "c")
    _write(uri, [1])
    artifacts.check_shard_schemas(uri, pa.schema([("x", pa.int32())]))
    with pytest.raises(ValueError, match=r"part-00000.parquet: column 'x': expected int64, found int32"):
        artifacts.check_shard_schemas(uri, pa.schema([("x", pa.int64())]))
    with pytest.raises(ValueError, match="missing column 'y'"):
        artifacts.check_shard_schemas(uri, pa.schema([("x", pa.int32()), ("y", pa.list_(pa.int32()))]))


def test_shard_infos_verify_a_shard_one_row_group_at_a_time(tmp_path, monkeypatch):
    """shard_infos' memory is one row group's, whatever the shard's size: write_table cuts a shard into row groups
    of ROW_GROUP_ROWS, and shard_infos reads them one by one (never the whole file at once), and still catches a
    damaged page in the last group."""
    import hashlib

    import pyarrow.parquet as pq

    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 100)
    uri = str(tmp_path / "a")
    _write(uri, list(range(1050)))
    path = tmp_path / "a" / "part-00000.parquet"
    assert pq.ParquetFile(path).num_row_groups == 11
    largest = [0]
    real = pq.ParquetFile.read_row_group

    def counted(self, i, *args, **kwargs):
        table = real(self, i, *args, **kwargs)
        largest[0] = max(largest[0], table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("shard_infos read a whole shard"))
    (info,) = artifacts.shard_infos(uri)
    data = path.read_bytes()
    assert (info.rows, info.size, info.sha256) == (1050, len(data), hashlib.sha256(data).hexdigest())
    assert largest[0] == 100
    # A damaged page in the last row group (the last column chunk's values, before the footer) is still refused.
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(meta.num_row_groups - 1).column(0)
    at = chunk.data_page_offset + chunk.total_compressed_size - 8
    path.write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at : at + 4]) + data[at + 4 :])
    with pytest.raises(ArtifactError, match=r"part-00000.parquet: not a readable Parquet shard"):
        artifacts.shard_infos(uri)
