"""Unpaired feedback through prepare and reference on local Ray: unpaired records and pairs split in two, every
row accounted for, KL completions within their shard and split, and reference log-probs of both sequences equal
to an independent forward."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpo_ray.data.schema import SCORED_UNPAIRED_SCHEMA, UNPAIRED_SCHEMA
from dpo_ray.models.loading import load_tokenizer
from pipeline.config import PrepareConfig, ReferenceConfig
from pipeline.stages.prepare import run as prepare
from pipeline.stages.reference import run as reference
from tests.integration.helpers import manifest, read_artifact
from tests.integration.test_reference import _hf_per_token

pytestmark = pytest.mark.usefixtures("ray_local")

LABELS = [True, False, True, True, False]  # valid labels cycle through these; every 9th record's is not a boolean
BAD_LABELS = [1, "true", None, "no"]


def _records(n: int) -> tuple[list[dict], int]:
    """n unpaired records over n // 3 prompts (completions of several lengths), and how many have a bad label."""
    rng = random.Random(7)
    out, bad = [], 0
    for i in range(n):
        record = {
            "question": f"prompt {i // 3}: how was the film?",
            "answer": " " + " ".join(rng.choice(["great", "awful", "long", "fine", "dull"]) for _ in range(1 + i % 30)),
            "verdict": LABELS[i % len(LABELS)],
        }
        if i % 9 == 4:
            record["verdict"] = BAD_LABELS[i % len(BAD_LABELS)]
            bad += 1
        out.append(record)
    return out, bad


def _cfg(tiny_model_dir: Path, inputs: Path, output: Path, **kw: object) -> PrepareConfig:
    settings = {"max_length": 40, "max_prompt_length": 20, "rows_per_shard": 30, "batch_size": 20, **kw}
    return PrepareConfig(inputs=[str(inputs)], tokenizer=str(tiny_model_dir), output=str(output), **settings)  # type: ignore[arg-type]


def test_unpaired_records_accounted_with_kl_completions_from_their_shard_and_split(tiny_model_dir, tmp_path):
    """150 records in 20-record batches, at most 30 rows a shard: every record kept or rejected (a label that is
    not a boolean as invalid_label); each kept row's KL completion is the completion of another prompt's row of
    its shard and split, cut to fit max_length after its own prompt; a rerun writes the same bytes."""
    records, bad = _records(150)
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    columns = {"prompt": "question", "completion": "answer", "label": "verdict"}
    kw = {"unpaired": "records", "columns": columns, "eval_fraction": 0.3}
    m = prepare(_cfg(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "a", **kw))
    assert m.kind == "unpaired" and len(m.shards) >= 5
    stats = m.stats
    assert stats["rows_in"] == 150 and stats["rows_out"] + stats["rows_rejected"] == 150
    assert stats["rejects"].get("invalid_label") == bad
    assert stats["labels"]["desirable"] + stats["labels"]["undesirable"] == m.rows
    rejects = read_artifact(tmp_path / "a" / "rejects").to_pylist()
    assert {r["reason"] for r in rejects} <= {"invalid_label", "no_kl_partner"}
    assert len(rejects) == stats["rows_rejected"]

    tok = load_tokenizer(tiny_model_dir)
    shards = sorted((tmp_path / "a").glob("part-*.parquet"))
    truncated = 0
    for shard in shards:
        table = pq.read_table(shard)
        assert table.schema.equals(UNPAIRED_SCHEMA)
        rows = {r["row_id"]: r for r in table.to_pylist()}
        for r in rows.values():
            source = rows[r["kl_row_id"]]  # from this shard
            assert source["split"] == r["split"] and source["prompt"] != r["prompt"]
            room = 40 - len(r["prompt_ids"])
            assert r["kl_completion_ids"] == source["completion_ids"][:room]
            truncated += len(source["completion_ids"]) > room
            assert len(r["prompt_ids"]) + len(r["completion_ids"]) <= 40
            whole = len(r["prompt_ids"]) + len(r["completion_ids"])
            assert r["completion_ids"][-1] == tok.eos_token_id or whole == 40
    assert truncated > 0  # the cut was exercised
    label_of = {rec["question"] + "|" + rec["answer"]: rec["verdict"] for rec in records}
    for r in read_artifact(tmp_path / "a").to_pylist():
        text = tok.decode(r["completion_ids"], skip_special_tokens=True)
        if r["completion"] == text:  # not cut: the label is the record's
            assert label_of[r["prompt"] + "|" + r["completion"]] is r["label"]
    again = prepare(_cfg(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "b", **kw))
    assert [(s.file, s.sha256) for s in again.shards] == [(s.file, s.sha256) for s in m.shards]
    # Shards of 4 rows hold one or two prompts a split: a row alone with its prompt is rejected as no_kl_partner,
    # and every kept row still has its partner in its own shard.
    small = prepare(_cfg(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "c", **kw | {"rows_per_shard": 4}))
    assert small.stats["rejects"].get("no_kl_partner", 0) > 0
    assert small.stats["rows_out"] + small.stats["rows_rejected"] == 150
    assert small.rows + small.stats["rejects"]["no_kl_partner"] == m.rows
    for shard in sorted((tmp_path / "c").glob("part-*.parquet")):
        rows = {r["row_id"]: r for r in pq.read_table(shard).to_pylist()}
        assert 0 < len(rows) <= 4
        assert all(rows[r["kl_row_id"]]["prompt"] != r["prompt"] for r in rows.values())


def test_pairs_split_into_desirable_and_undesirable_rows_with_the_pairs_tokens(tiny_model_dir, tmp_path):
    """prepare.unpaired: pairs — a kept pair gives its chosen (desirable) and rejected (undesirable) row with the
    tokens prepare gives the pair; a rejected record gives two rejects (`<row>/chosen`, `<row>/rejected`)."""
    rows = [
        {"prompt": f"question {i}: is the movie good?", "chosen": f" yes, great {i}", "rejected": f" no {i}"}
        for i in range(40)
    ]
    rows[5]["chosen"] = rows[5]["rejected"]  # identical_completions
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare(_cfg(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "pairs", eval_fraction=0.2))
    m = prepare(_cfg(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "rows", eval_fraction=0.2, unpaired="pairs"))
    assert m.stats["rows_in"] == 80 and m.stats["rows_rejected"] == 2 and m.rows == 78
    assert m.stats["labels"] == {"desirable": 39, "undesirable": 39}
    rejects = read_artifact(tmp_path / "rows" / "rejects").to_pylist()
    assert sorted(r["row"].rsplit("/", 1)[1] for r in rejects) == ["chosen", "rejected"]
    assert {r["reason"] for r in rejects} == {"identical_completions"}
    unpaired = {(r["prompt"], r["label"]): r for r in read_artifact(tmp_path / "rows").to_pylist()}
    for p in read_artifact(tmp_path / "pairs").to_pylist():
        for side, label in (("chosen", True), ("rejected", False)):
            row = unpaired[(p["prompt"], label)]
            assert row["prompt_ids"] == p["prompt_ids"] and row["completion_ids"] == p[f"{side}_ids"]
            assert row["split"] == p["split"] and row["completion"] == p[side]


def test_reference_scores_the_completion_and_the_kl_completion(tiny_model_dir, tiny_model, tmp_path):
    """vLLM's log-probs of every row's completion and KL completion equal an unpadded transformers forward
    (1e-4 a token, the parity gate's float32 bound), and the artifact accounts for every row."""
    records, _ = _records(60)
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    columns = {"prompt": "question", "completion": "answer", "label": "verdict"}
    rows_path = tmp_path / "rows"
    prepare(_cfg(tiny_model_dir, tmp_path / "in.jsonl", rows_path, unpaired="records", columns=columns))
    out = tmp_path / "scored"
    m = reference(
        ReferenceConfig(
            model=str(tiny_model_dir),
            pairs=str(rows_path),
            output=str(out),
            max_model_len=64,
            gpu_memory_utilization=0.1,
            rows_per_unit=16,
        )  # fmt: skip
    )
    assert m.kind == "scored_unpaired" and m.rows == manifest(rows_path)["rows"] and m.stats["units"] >= 3
    assert m.stats["parity"]["token_max_abs"] <= 1e-4
    table = read_artifact(out)
    assert table.schema.equals(SCORED_UNPAIRED_SCHEMA)
    worst = 0.0
    for r in table.to_pylist():
        for ids, logps, total in (
            ("completion_ids", "ref_completion_logps", "ref_completion_logp"),
            ("kl_completion_ids", "ref_kl_logps", "ref_kl_logp"),
        ):
            expected = _hf_per_token(tiny_model, r["prompt_ids"], r[ids])
            stored = np.asarray(r[logps], dtype=np.float64)
            worst = max(worst, float(np.abs(stored - expected).max()))
            assert r[total] == pytest.approx(float(stored.sum()), abs=1e-9)
    assert worst <= 1e-4, worst
