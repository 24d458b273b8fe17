"""pipeline.core.stage: skip a complete output, resume an interrupted one of the same identity, start clean
otherwise; the manifest comes last and only after the row accounting holds."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import ArtifactError, Manifest
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


# A train config's identity as dpo-ray recorded it before the train config had sections (its exact dump at
# commit 4ce1c79): flat keys, unset loss parameters null, fault_injection.
LEGACY_TRAIN = {
    "model": "/m", "scored": "/s", "output": "/o", "export": "/e", "storage_path": "/c", "run_name": "dpo",
    "loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1, "label_smoothing": 0.0,
    "discopop_tau": None, "dpop_lambda": None, "simpo_gamma": None, "orpo_lambda": None,
    "f_divergence": "reverse_kl", "f_alpha": None, "sft_weight": 0.0, "average_logps": False, "optimizer": "adamw",
    "lr": 0.002, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0,
    "batch_size": 8, "batching": "auto", "token_budget": 16384, "fused_head": False, "attention": "auto",
    "compile": False, "max_steps": None, "epochs": 1, "seed": 0, "log_every": 1, "eval_every": 0,
    "checkpoint_every": 3, "keep_checkpoints": 2, "num_workers": 2, "use_gpu": False, "resources_per_worker": {},
    "accelerator_type": None, "parallelism": "ddp", "precision": "auto", "gradient_checkpointing": False,
    "lora": None, "max_failures": 2, "initial_check_tolerance": None, "trust_remote_code": False,
    "fault_injection": None,
}  # fmt: skip


def test_work_recorded_by_the_flat_train_config_still_counts_as_the_same_config(tmp_path):
    """Checkpoints and an export written before the train config had sections resume and skip under the same
    settings written the new way; other settings are still another config. Failed before: the export was
    removed and the checkpoints refused as another run's."""
    from pipeline.config import TrainConfig
    from pipeline.core.stage import identity

    same = TrainConfig.model_validate(
        {
            "model": "/m", "scored": "/s", "output": "/o", "export": "/e",
            "checkpoint": {"storage_path": "/c", "every": 3},
            "loss": {"name": ["sigmoid", "sft"], "weights": [1.0, 0.5]}, "optim": {"lr": 2e-3},
            "workers": {"count": 2}, "batch_size": 8, "health": {"kl": {"limit": 9.0}},  # health: not identity
        }
    )  # fmt: skip
    ckpt = tmp_path / "checkpoints"
    stage.stamp(str(ckpt), LEGACY_TRAIN, {"model:model": "a"})
    (ckpt / "checkpoint_0").mkdir()
    stage.claim(str(ckpt), identity(same), {"model:model": "a"}, "checkpoints", "fix")
    assert (ckpt / "checkpoint_0").exists() and stage.stamped(str(ckpt), identity(same), {"model:model": "a"})
    spread = same.model_copy(update={"sequence_parallel": 2})  # a layout key: the same run's checkpoints
    stage.claim(str(ckpt), identity(spread), {"model:model": "a"}, "checkpoints", "fix")
    assert (ckpt / "checkpoint_0").exists()
    other = same.model_copy(update={"optim": same.optim.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ArtifactError, match="another config"):
        stage.claim(str(ckpt), identity(other), {"model:model": "a"}, "checkpoints", "fix")

    export = tmp_path / "export"
    artifacts.write_table(pa.table({"x": [1]}), str(export), "part-0.parquet")
    artifacts.write_manifest(str(export), "model", LEGACY_TRAIN, {}, {"model:model": "a"}, {})
    found = stage.begin("model", same, {"model:model": "a"}, str(export))
    assert isinstance(found, Manifest) and found.config == LEGACY_TRAIN  # skipped, kept as written
    assert not isinstance(stage.begin("model", other, {"model:model": "a"}, str(export)), Manifest)


# Keys added to a stage's config after artifacts recorded its identity (unpaired feedback, issue 27): such work
# must still count as the same config's when the new keys are at their defaults.
ADDED_KEYS = {
    "prepare": ["unpaired", "seed", "columns.completion", "columns.label"],
    "generate": ["unpaired", "desirable_threshold"],
    "train": ["loss.desirable_weight", "loss.undesirable_weight", "batching.fused_head_from"],
}


@pytest.mark.parametrize("section", sorted(ADDED_KEYS))
def test_work_recorded_before_a_key_was_added_still_counts_as_the_same_config(section, tmp_path):
    from pipeline.config import load_config
    from pipeline.core.stage import identity

    overrides = [f"run_dir={tmp_path}", "prepare.inputs=[x.jsonl]", "prepare.tokenizer=t", "train.model=m",
                 "generate.policy=m"]  # fmt: skip
    cfg = getattr(load_config(None, overrides), section)
    recorded = identity(cfg)
    for key in ADDED_KEYS[section]:
        *parents, last = key.split(".")
        node = recorded
        for p in parents:
            node = node[p]
        del node[last]
    uri = tmp_path / "artifact"
    artifacts.write_table(pa.table({"x": [1]}), str(uri), "part-0.parquet")
    artifacts.write_manifest(str(uri), "pairs", recorded, {}, {}, {})
    assert isinstance(stage.begin("pairs", cfg, {}, str(uri)), Manifest)  # skipped: the same config
    changed = cfg.model_copy(update={"seed": 1})
    assert not isinstance(stage.begin("pairs", changed, {}, str(uri)), Manifest)
