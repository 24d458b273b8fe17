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
