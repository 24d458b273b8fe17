"""The driver's prompt index and generate's unit plan (pipeline.core.prompts), against the Python lists the stages
built before (every row read as a dict, the first row of each text kept, sorted by prompt id)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pyarrow as pa
import pytest

from dpo_ray.data import artifacts
from dpo_ray.data.tokenization import prompt_id
from pipeline.core import prompts as P


def _artifact(tmp_path, n: int = 300, per_shard: int = 37, texts: int = 120):
    """A pairs-shaped artifact of many shards: each prompt text in several rows, some across shards and splits;
    a text's prompt_ids differ per row, so which row is kept shows."""
    rng = random.Random(1)
    rows = []
    for i in range(n):
        t = rng.randrange(texts)
        rows.append({"prompt": f"prompt {t}", "prompt_ids": [1, t, i], "split": "eval" if t % 7 == 0 else "train",
                     "chosen_ids": [i]})  # fmt: skip
    uri = str(tmp_path / "pairs")
    for k in range(0, n, per_shard):
        artifacts.write_table(pa.Table.from_pylist(rows[k : k + per_shard]), uri, f"part-{k:05d}.parquet")
    return uri, SimpleNamespace(shards=artifacts.shard_infos(uri)), rows


def _expected(rows, split, limit=None):
    seen = {}
    for r in rows:
        if r["split"] == split and r["prompt"] not in seen:
            seen[r["prompt"]] = {"prompt_id": prompt_id(r["prompt"]), "prompt": r["prompt"],
                                 "prompt_ids": r["prompt_ids"]}  # fmt: skip
    out = sorted(seen.values(), key=lambda r: r["prompt_id"])
    return out[:limit] if limit else out


@pytest.mark.parametrize("split,limit", [("train", None), ("eval", None), ("train", 17), ("eval", 1000)])
def test_take_gives_the_first_row_of_each_text_in_prompt_id_order(tmp_path, split, limit):
    uri, manifest, rows = _artifact(tmp_path)
    index = P.prompt_index(uri, manifest, split, limit)
    assert P.take(uri, manifest, index) == _expected(rows, split, limit)


def test_an_empty_split_has_no_prompts(tmp_path):
    uri, manifest, _ = _artifact(tmp_path)
    index = P.prompt_index(uri, manifest, "validation")
    assert len(index) == 0 and P.take(uri, manifest, index) == []
    assert P.write_plan(uri, manifest, index, 8, str(tmp_path / "plan")) == []


@pytest.mark.parametrize("per_unit,plan_rows", [(8, 32), (7, 30), (5, 1 << 14), (64, 16)])
def test_the_plan_units_are_the_sorted_prompts_cut_per_unit(tmp_path, monkeypatch, per_unit, plan_rows):
    """Several plan files (PLAN_ROWS made small), a last unit short, and a unit larger than PLAN_ROWS."""
    monkeypatch.setattr(P, "PLAN_ROWS", plan_rows)
    uri, manifest, rows = _artifact(tmp_path)
    expected = _expected(rows, "train")
    plan = str(tmp_path / "out" / "units" / "plan")
    units = P.write_plan(uri, manifest, P.prompt_index(uri, manifest, "train"), per_unit, plan)
    assert [u["name"] for u in units] == [f"part-{i:05d}.parquet" for i in range(-(-len(expected) // per_unit))]
    got = [P.read_unit(u) for u in units]
    assert got == [expected[i : i + per_unit] for i in range(0, len(expected), per_unit)]
    files = {u["plan"] for u in units}
    assert len(files) == len(P.plan_files(len(expected), per_unit)) and (len(files) > 1) == (plan_rows < 100)
    assert not (tmp_path / "out" / "units" / "plan" / ".pieces").exists()  # the pieces are removed


def test_the_index_reads_two_columns_and_the_plan_each_holding_shard_once_more(tmp_path, monkeypatch):
    uri, manifest, _ = _artifact(tmp_path)
    reads = []
    real = artifacts.read_shard
    monkeypatch.setattr(artifacts, "read_shard", lambda u, s, c=None: reads.append((s.file, tuple(c))) or real(u, s, c))
    index = P.prompt_index(uri, manifest, "train")
    assert sorted(reads) == sorted((s.file, ("prompt", "split")) for s in manifest.shards)
    reads.clear()
    P.write_plan(uri, manifest, index, 8, str(tmp_path / "plan"))
    holding = sorted(set(index.shard.tolist()))  # a shard whose texts all appeared before is not read again
    assert len(holding) < len(manifest.shards)
    assert sorted(reads) == [(manifest.shards[s].file, ("prompt", "prompt_ids")) for s in holding]


def test_the_plan_on_an_object_store_uri(tmp_path, monkeypatch):
    """fsspec's memory:// stands for s3:// here: the plan is written, read and its pieces removed through fsspec."""
    import fsspec

    monkeypatch.setattr(P, "PLAN_ROWS", 32)
    uri, manifest, rows = _artifact(tmp_path)
    plan = f"memory://plan-{tmp_path.name}"
    units = P.write_plan(uri, manifest, P.prompt_index(uri, manifest, "train", 50), 8, plan)
    expected = _expected(rows, "train", 50)
    assert [P.read_unit(u) for u in units] == [expected[i : i + 8] for i in range(0, 50, 8)]
    fs = fsspec.filesystem("memory")
    assert sorted(fs.find(f"/plan-{tmp_path.name}")) == [
        f"/plan-{tmp_path.name}/prompts-0000{i}.parquet" for i in (0, 1)
    ]


def test_a_resumed_plan_writes_and_reads_only_what_the_missing_units_need(tmp_path, monkeypatch):
    """Units 0-3 and 6 done (PLAN_ROWS 32: plan files of 4 units of 8): the first file is not written, the units
    returned are the others with the same prompts as a full plan, and only the shards holding them are read."""
    monkeypatch.setattr(P, "PLAN_ROWS", 32)
    uri, manifest, rows = _artifact(tmp_path)
    expected = _expected(rows, "train")
    index = P.prompt_index(uri, manifest, "train")
    done = {f"part-{i:05d}.parquet" for i in (0, 1, 2, 3, 6)}
    reads = []
    real = artifacts.read_shard
    monkeypatch.setattr(artifacts, "read_shard", lambda u, s, c=None: reads.append(s.file) or real(u, s, c))
    plan = tmp_path / "plan"
    units = P.write_plan(uri, manifest, index, 8, str(plan), done)
    names = [f"part-{i:05d}.parquet" for i in range(-(-len(expected) // 8))]
    assert [u["name"] for u in units] == [n for n in names if n not in done]
    assert [P.read_unit(u) for u in units] == [expected[8 * int(u["name"][5:10]) :][:8] for u in units]
    assert not (plan / "prompts-00000.parquet").exists() and (plan / "prompts-00001.parquet").exists()
    holding = {manifest.shards[s].file for s in index.shard[32:].tolist()}
    assert sorted(reads) == sorted(holding)
    assert P.write_plan(uri, manifest, index, 8, str(tmp_path / "none"), set(names)) == []
