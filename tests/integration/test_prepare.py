"""The prepare stage end to end on local Ray: formats, the HH sample, malformed input, resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray.data.schema import PAIRS_SCHEMA, REJECTS_SCHEMA
from dpo_ray.models.loading import load_tokenizer
from pipeline.config import PrepareConfig
from pipeline.core.sources import InputError
from pipeline.stages.prepare import run
from tests.conftest import HH_SAMPLE
from tests.integration.helpers import manifest, read_artifact

pytestmark = pytest.mark.usefixtures("ray_local")


def _cfg(tiny_model_dir, inputs, output, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=[str(i) for i in inputs], tokenizer=str(tiny_model_dir), output=str(output), **kw)


def _explicit(tag: str, n: int) -> list[dict]:
    return [
        {"prompt": f"{tag} question {i}: is the movie good?", "chosen": f" yes, great {i}", "rejected": f" no {i}"}
        for i in range(n)
    ]


def _check_roundtrip(table: pa.Table, tok) -> None:
    """Decoded ids equal the stored text wherever nothing was truncated."""
    for row in table.to_pylist():
        prompt = tok.decode(row["prompt_ids"], skip_special_tokens=True)
        assert prompt == row["prompt"]
        for col in ("chosen", "rejected"):
            ids = row[f"{col}_ids"]
            assert ids[-1] == tok.eos_token_id
            assert tok.decode(ids, skip_special_tokens=True) == row[col]


def test_every_input_format_in_one_run(tiny_model_dir, tmp_path):
    import datasets

    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    rows = {fmt: _explicit(fmt, 5) for fmt in ("jsonl", "json", "csv", "parquet", "hf")}
    (data / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows["jsonl"]) + "\n\n")
    (data / "nested" / "b.json").write_text(json.dumps({"data": rows["json"]}))
    with (tmp_path / "c.csv").open("w") as f:
        f.write("prompt,chosen,rejected\n")
        for r in rows["csv"]:
            f.write(",".join(json.dumps(r[k]) for k in ("prompt", "chosen", "rejected")) + "\n")
    pq.write_table(pa.Table.from_pylist(rows["parquet"]), data / "d.parquet")
    datasets.Dataset.from_list(rows["hf"]).save_to_disk(str(tmp_path / "hf"))
    convo = [
        {
            "chosen": [{"role": "user", "content": f"chat {i}"}, {"role": "assistant", "content": "sure"}],
            "rejected": [{"role": "user", "content": f"chat {i}"}, {"role": "assistant", "content": "no"}],
        }
        for i in range(4)
    ]
    with gzip.open(tmp_path / "chat.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in convo))

    out = tmp_path / "pairs"
    m = run(_cfg(tiny_model_dir, [data, str(tmp_path / "c*.csv"), tmp_path / "hf", tmp_path / "chat.jsonl.gz"], out))
    # data/ holds a.jsonl, nested/b.json, d.parquet (found by walking it); c.csv is found by the glob.
    table = read_artifact(out)
    assert table.schema.equals(PAIRS_SCHEMA)
    assert m.rows == table.num_rows == 4 * 5 + 5 + 4
    sources = {Path(s).name for s in table["source"].to_pylist()}
    assert sources == {"a.jsonl", "b.json", "c.csv", "d.parquet", "hf", "chat.jsonl.gz"}
    expected = {(r["prompt"], r["chosen"], r["rejected"]) for v in rows.values() for r in v}
    got = {(r["prompt"], r["chosen"], r["rejected"]) for r in table.to_pylist() if not r["prompt"].startswith("<|")}
    assert got == expected
    chats = [r for r in table.to_pylist() if r["prompt"].startswith("<|")]
    assert sorted(r["prompt"] for r in chats) == [f"<|user|>chat {i}\n<|assistant|>" for i in range(4)]
    _check_roundtrip(table, load_tokenizer(tiny_model_dir))
    assert manifest(out)["stats"]["rows_in"] == m.rows and manifest(out)["stats"]["rows_rejected"] == 0


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not present at {HH_SAMPLE}")
def test_hh_sample_every_row_accounted(tiny_model_dir, tmp_path):
    out = tmp_path / "pairs"
    m = run(_cfg(tiny_model_dir, [HH_SAMPLE], out, max_length=1024, max_prompt_length=768))
    with gzip.open(HH_SAMPLE, "rt") as f:
        n_lines = sum(1 for line in f if line.strip())
    stats = m.stats
    rejects = read_artifact(out / "rejects")
    assert stats["rows_in"] == n_lines == 1500
    assert stats["rows_in"] == m.rows + rejects.num_rows == stats["rows_out"] + stats["rows_rejected"]
    assert sum(stats["rejects"].values()) == rejects.num_rows
    assert set(rejects["reason"].to_pylist()) <= {"empty_completion", "no_shared_prefix", "duplicate"}
    assert m.rows > 1400
    table = read_artifact(out)
    for row in table.to_pylist():
        assert row["prompt"].endswith("Assistant:")
        assert not row["chosen"].lstrip().startswith("Assistant:")
        assert not row["rejected"].lstrip().startswith("Assistant:")
    full = [r for r in table.to_pylist() if len(r["prompt_ids"]) < 768 and r["chosen_ids"][-1] == 2]
    tok = load_tokenizer(tiny_model_dir)
    for row in full[:200]:
        assert tok.decode(row["prompt_ids"], skip_special_tokens=True) == row["prompt"]
        assert tok.decode(row["chosen_ids"], skip_special_tokens=True) == row["chosen"]
    assert 0 < stats["splits"]["eval"] < 0.1 * m.rows
    print(f"HH sample: {stats['rows_in']} rows -> {m.rows} pairs, rejects {stats['rejects']}")


def _fuzz_lines() -> tuple[list[bytes], dict[int, str], int]:
    """Malformed JSONL lines (each with its expected reason, by line number) among valid ones."""
    good = [json.dumps(r).encode() for r in _explicit("fuzz", 12)]
    bad = [
        (b'{"prompt": "x", "chosen": ', "invalid_json"),
        (b'{"prompt": "\xff\xfe bad bytes", "chosen": "a", "rejected": "b"}', "undecodable_text"),
        (b'{"prompt": "lone \\ud800 surrogate", "chosen": "a", "rejected": "b"}', "undecodable_text"),
        (b'{"prompt": "p", "chosen": null, "rejected": "b"}', "missing_field"),
        (b'{"prompt": "p", "chosen": "a"}', "missing_field"),
        (b'{"prompt": "p", "chosen": {"a": [1, {"b": null}]}, "rejected": "b"}', "wrong_type"),
        (b'{"prompt": 7, "chosen": "a", "rejected": "b"}', "wrong_type"),
        (b"[1, 2, 3]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (b'{"prompt": "", "chosen": "a", "rejected": "b"}', "empty_prompt"),
        (b'{"prompt": "p", "chosen": "   ", "rejected": "b"}', "empty_completion"),
        (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical_completions"),
        (json.dumps({"prompt": "p", "chosen": "x" * 1_100_000, "rejected": "b"}).encode(), "text_too_long"),
        (json.dumps({"prompt": "p " * 300, "chosen": "a", "rejected": "b"}).encode(), "too_long"),
        (b'{"chosen": [{"role": "user"}], "rejected": [{"role": "assistant", "content": "x"}]}', "wrong_type"),
        (b'{"chosen": "no marker here", "rejected": "nothing shared"}', "no_shared_prefix"),
        (good[0], "duplicate"),
    ]
    lines, expected = [], {}
    for i, line in enumerate(good):
        lines.append(line)
        if i < len(bad):
            lines.append(bad[i][0])
            expected[len(lines)] = bad[i][1]
    for line, reason in bad[len(good) :]:
        lines.append(line)
        expected[len(lines)] = reason
    lines.insert(3, b"   ")  # a blank line is not a record
    expected = {(k + 1 if k > 3 else k): v for k, v in expected.items()}
    return lines, expected, len(good)


def test_fuzzed_records_are_rejected_with_reasons_and_no_valid_row_lost(tiny_model_dir, tmp_path):
    lines, expected, n_good = _fuzz_lines()
    assert len(set(expected.values())) >= 12
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "pairs"
    m = run(_cfg(tiny_model_dir, [path], out, truncation="drop", max_length=256, max_prompt_length=128))
    rejects = read_artifact(out / "rejects")
    assert rejects.schema.equals(REJECTS_SCHEMA)
    got = {int(r["row"].rsplit(":", 1)[1]): r["reason"] for r in rejects.to_pylist()}
    assert got == expected
    assert m.rows == n_good
    assert m.stats["rows_in"] == len(lines) - 1 == m.rows + rejects.num_rows
    dup = next(r for r in rejects.to_pylist() if r["reason"] == "duplicate")
    assert dup["detail"].endswith(":1")  # points at the copy that was kept


def test_unparseable_files_fail_naming_file_and_line(tiny_model_dir, tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text("prompt,chosen,rejected\nthis is csv, not json, at all\n")
    with pytest.raises(InputError, match=r"bad\.jsonl: line 1: not JSON"):
        run(_cfg(tiny_model_dir, [bad_jsonl], tmp_path / "o1"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(InputError, match=r"bad\.json: line 2 column 12"):
        run(_cfg(tiny_model_dir, [bad_json], tmp_path / "o2"))
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), wrong)
    with pytest.raises(
        InputError, match=r"wrong\.parquet: wrong Parquet schema: missing column\(s\) \['chosen', 'rejected'\]"
    ):
        run(_cfg(tiny_model_dir, [wrong], tmp_path / "o3"))
    with pytest.raises(InputError, match="does not exist"):
        run(_cfg(tiny_model_dir, [tmp_path / "nope.jsonl"], tmp_path / "o4"))


def test_all_rows_rejected_is_an_error_pointing_at_rejects(tiny_model_dir, tmp_path):
    from pipeline.stages.prepare import PrepareError

    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps({"question": "q", "good": "a", "bad": "b"}) for _ in range(3)))
    with pytest.raises(PrepareError, match="all 3 rows were rejected .*missing_field 3"):
        run(_cfg(tiny_model_dir, [path], tmp_path / "o"))
    # With the column mapping the same file works.
    m = run(
        _cfg(
            tiny_model_dir, [path], tmp_path / "o", columns={"prompt": "question", "chosen": "good", "rejected": "bad"}
        )
    )
    assert m.rows == 1 and m.stats["rejects"] == {"duplicate": 2}


@pytest.mark.cluster
def test_rerun_is_noop_and_killed_run_reruns_to_same_artifact(tiny_model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    shards = {"rows_per_shard": 10, "batch_size": 10}  # 30 shards: the kill lands between the first and the manifest
    path.write_text("\n".join(json.dumps(r) for r in _explicit("resume", 300)))
    ref_out = tmp_path / "ref"
    ref = run(_cfg(tiny_model_dir, [path], ref_out, eval_fraction=0.2, **shards))
    mtime = (ref_out / "manifest.json").stat().st_mtime_ns
    again = run(_cfg(tiny_model_dir, [path], ref_out, eval_fraction=0.2, **shards))
    assert again == ref and (ref_out / "manifest.json").stat().st_mtime_ns == mtime

    out = tmp_path / "killed"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        json.dumps({"prepare": _cfg(tiny_model_dir, [path], out, eval_fraction=0.2, **shards).model_dump(mode="json")})
    )
    # The second shard to be written is held (dpo_ray.testing.faults.hold_unit): the run is killed with a shard
    # written and certainly unfinished. Failed before on a fast machine: killed when a shard was seen, it
    # could be done by then.
    hold = tmp_path / "hold"
    hold.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "prepare", "--config", str(cfg_file)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DPO_RAY_UNIT_HOOK": f"dpo_ray.testing.faults:hold_unit:shard:1:{hold}"},
    )
    deadline = time.monotonic() + 600  # a wait for an event, generous on a slow machine
    while not (hold / "held").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "prepare never reached its second shard"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # At least the first shard is written (more when several writers run at once); never the manifest.
    assert list(out.glob("part-*.parquet")) and not (out / "manifest.json").exists()
    m = run(_cfg(tiny_model_dir, [path], out, eval_fraction=0.2, **shards))
    a, b = read_artifact(out).sort_by("pair_id"), read_artifact(ref_out).sort_by("pair_id")
    assert a.equals(b)
    assert m.stats == ref.stats and m.fingerprints == ref.fingerprints
    # A changed input invalidates the artifact.
    path.write_text("\n".join(json.dumps(r) for r in _explicit("resume", 301)))
    assert run(_cfg(tiny_model_dir, [path], out, eval_fraction=0.2, **shards)).rows == 301


def test_boundary_merges_are_counted_in_the_manifest(tiny_model_dir, tmp_path):
    """Prompts ending in a space merge with the completion's first token (byte-level BPE: " I"): those pairs
    are kept, follow the common-prefix rule, and are counted in stats.boundary_merges."""
    from dpo_ray.models.loading import load_tokenizer

    rows = [
        {
            "prompt": f"Human: tell me about film {i} \n\nAssistant: "
            if i % 3 == 0
            else f"Human: film {i}?\n\nAssistant:",
            "chosen": " I think it was great." if i % 3 else "I think it was great.",
            "rejected": f" No. {i}",
        }
        for i in range(30)
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    m = run(_cfg(tiny_model_dir, [path], tmp_path / "out"))
    assert m.rows == 30 and m.stats["boundary_merges"] == 10
    tok = load_tokenizer(tiny_model_dir)
    for r in read_artifact(tmp_path / "out").to_pylist():
        whole = tok(r["prompt"] + r["chosen"]).input_ids
        assert [*r["prompt_ids"], *r["chosen_ids"][:-1]] == whole


def test_many_shards_in_input_order_the_first_duplicate_kept_and_the_same_every_run(tiny_model_dir, tmp_path):
    """Three files, 20-row batches, at most 25 rows a shard: every shard within the bound; the pairs, shard by
    shard, in input order (files in order, lines in order); of equal pairs the first in input order is kept,
    wherever the copies are (a copy in the same batch, in a later file, and a line whose number sorts before
    the kept one's as text); a second run writes byte-identical shards."""
    rows = _explicit("order", 240)
    copies = {15: 3, 130: 3, 200: 100, 239: 9}  # line -> line it repeats ("in-0.jsonl:16" < "in-0.jsonl:4" as text)
    for line, of in copies.items():
        rows[line] = rows[of]
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"in-{k}.jsonl")
        paths[-1].write_text("\n".join(json.dumps(r) for r in rows[k * 80 : (k + 1) * 80]) + "\n")
    kw = {"rows_per_shard": 25, "batch_size": 20, "eval_fraction": 0.2}
    m = run(_cfg(tiny_model_dir, paths, tmp_path / "a", **kw))
    assert m.rows == 240 - len(copies) and m.stats["rejects"] == {"duplicate": len(copies)}
    assert len(m.shards) >= 10 and all(0 < s.rows <= 25 for s in m.shards)
    table = read_artifact(tmp_path / "a")
    texts = [r["prompt"] for r in table.to_pylist()]
    assert texts == [r["prompt"] for i, r in enumerate(rows) if i not in copies]
    rejects = read_artifact(tmp_path / "a" / "rejects").to_pylist()

    def line(row: str) -> int:
        k, n = row.removeprefix(str(tmp_path) + "/in-").split(".jsonl:")
        return int(k) * 80 + int(n) - 1

    assert {line(r["row"]): r["detail"] for r in rejects} == {
        i: f"same pair_id as {paths[of // 80]}:{of % 80 + 1}" for i, of in copies.items()
    }
    again = run(_cfg(tiny_model_dir, paths, tmp_path / "b", **kw))
    assert [(s.file, s.sha256) for s in again.shards] == [(s.file, s.sha256) for s in m.shards]


def test_split_is_by_prompt_so_no_eval_prompt_has_a_train_pair(tiny_model_dir, tmp_path):
    """300 HH prompts with 3 pairs each at eval_fraction 0.3: every prompt's pairs are in one split.

    Failed before the split was a function of the prompt: it was drawn per pair_id, and 188 of the 193 eval
    prompts also had train pairs."""
    records = []
    with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 300:
                break
            rec = json.loads(line)
            cut = rec["chosen"].rfind("Assistant:") + len("Assistant:")
            prompt = rec["chosen"][:cut]
            records += [
                {"prompt": prompt, "chosen": f" answer {k} {rec['chosen'][cut:]}", "rejected": f" no {k}"}
                for k in range(3)
            ]
    (tmp_path / "three.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    run(_cfg(tiny_model_dir, [tmp_path / "three.jsonl"], tmp_path / "pairs", eval_fraction=0.3))
    rows = read_artifact(tmp_path / "pairs").select(["prompt", "split"]).to_pylist()
    splits: dict[str, set[str]] = {}
    for r in rows:
        splits.setdefault(r["prompt"], set()).add(r["split"])
    eval_prompts = {p for p, s in splits.items() if "eval" in s}
    assert len(rows) >= 3 * 250 and len(splits) >= 250  # a few HH prompts repeat; most are unique
    assert 0.2 * len(splits) < len(eval_prompts) < 0.4 * len(splits)
    assert all(len(s) == 1 for s in splits.values()), [p for p, s in splits.items() if len(s) > 1][:3]
