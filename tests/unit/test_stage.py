"""pipeline.stage: skip a complete output, resume an interrupted one of the same identity, start clean
otherwise; the manifest comes last and only after the row accounting holds."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dpo_ray import artifacts
from dpo_ray.artifacts import Manifest
from pipeline.config import ReferenceConfig
from pipeline.stage import Build, begin, finish


def _cfg(tmp_path, **kw) -> ReferenceConfig:
    return ReferenceConfig(model="m", pairs=str(tmp_path / "pairs"), output=str(tmp_path / "out"), **kw)


def _shard(out, name: str) -> None:
    artifacts.write_table(pa.table({"x": [1, 2]}), str(out), name)


def test_skip_resume_and_fresh(tmp_path, capsys):
    cfg, up = _cfg(tmp_path), {"pairs": "abc"}
    out = tmp_path / "out"
    first = begin("scored", cfg, up, cfg.output, resumable=True)
    assert isinstance(first, Build) and not first.resumed
    _shard(out, "part-00000.parquet")
    (out / ".tmp-unfinished").write_text("x")
    # Interrupted, then started again with the same identity: the finished shard is kept, the temp file goes.
    again = begin("scored", cfg, up, cfg.output, resumable=True)
    assert isinstance(again, Build) and again.resumed
    assert (out / "part-00000.parquet").exists() and not (out / ".tmp-unfinished").exists()
    with pytest.raises(RuntimeError, match="row accounting failed: 3 in != 2 out \\+ 0 rejected"):
        finish(again, {}, {}, accounting=(3, 2, 0))
    assert artifacts.read_manifest(cfg.output) is None
    m = finish(again, {"model": "f"}, {"extra": 1}, accounting=(2, 2, 0))
    assert m.rows == 2 and m.stats == {"rows_in": 2, "rows_out": 2, "rows_rejected": 0, "extra": 1}
    # Complete: skipped, nothing touched.
    skipped = begin("scored", cfg, up, cfg.output, resumable=True)
    assert isinstance(skipped, Manifest) and skipped == m
    assert "reference: " in capsys.readouterr().out
    # Another config (or other inputs): the old output is discarded, shards and all.
    other = begin("scored", _cfg(tmp_path, rows_per_unit=7), up, cfg.output, resumable=True)
    assert isinstance(other, Build) and not other.resumed and not (out / "part-00000.parquet").exists()
    fresh = begin("scored", cfg, {"pairs": "def"}, cfg.output)
    assert isinstance(fresh, Build) and not fresh.resumed
