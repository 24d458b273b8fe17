"""pipeline.core.stage: skip a complete output, resume an interrupted one of the same identity, start clean
otherwise; the manifest comes last and only after the row accounting holds."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import Manifest
from pipeline.config import ReferenceConfig
from pipeline.core import stage
from pipeline.core.stage import Build, begin, finish


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


def test_claim_keeps_resumable_work_clears_outdated_work_and_refuses_another_configs(tmp_path, capsys):
    """Checkpoints of this config and inputs are kept (resume); of this config but older inputs (the stage is redone
    because a model it reads changed) removed with a line that says why; of another config refused.

    Failed before the inputs' fingerprints entered the identity in two ways: a retrained upstream model did not
    reach the stamp at all, and then older inputs were refused like another run's work, so no rerun could redo it."""
    from dpo_ray.data.artifacts import ArtifactError

    ckpt = tmp_path / "checkpoints" / "dpo"
    stage.claim(str(ckpt), {"lr": 1}, {"model:model": "a"}, "checkpoints", "fix")
    (ckpt / "checkpoint_0").mkdir()
    stage.claim(str(ckpt), {"lr": 1}, {"model:model": "a"}, "checkpoints", "fix")
    assert (ckpt / "checkpoint_0").exists()  # the same work: kept for the resume
    stage.claim(str(ckpt), {"lr": 1}, {"model:model": "b"}, "checkpoints", "fix")
    assert not (ckpt / "checkpoint_0").exists() and stage.stamped(str(ckpt), {"lr": 1}, {"model:model": "b"})
    assert "checkpoints of this config from older inputs (model:model changed); removed" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="holds checkpoints of a run with another config; fix"):
        stage.claim(str(ckpt), {"lr": 2}, {"model:model": "b"}, "checkpoints", "fix")
