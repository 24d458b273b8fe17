"""The reference stage on local Ray with vLLM on CPU (tiny Llama), checked against HF forwards."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_ray.compute.logps import token_logps
from dpo_ray.data.artifacts import ArtifactError
from dpo_ray.data.schema import SCORED_SCHEMA
from dpo_ray.models.tiny import build_tiny_llama
from pipeline.config import PrepareConfig, ReferenceConfig
from pipeline.stages.prepare import run as prepare
from pipeline.stages.reference import run as reference
from tests.conftest import HH_SAMPLE, small_corpus
from tests.integration.helpers import manifest, prepare_pairs, read_artifact

pytestmark = pytest.mark.usefixtures("ray_local")


def _ref_cfg(model, pairs, output, **kw) -> ReferenceConfig:
    base = {"max_model_len": 160, "rows_per_unit": 40}
    if kw.get("backend", "vllm") == "vllm":
        base["gpu_memory_utilization"] = 0.1
    return ReferenceConfig(model=str(model), pairs=str(pairs), output=str(output), **{**base, **kw})


@pytest.fixture(scope="module")
def small_pairs(tiny_model_dir, tmp_path_factory) -> Path:
    """~100 pairs of mixed lengths; a few are longer than max_model_len 160 (they must be rejected)."""
    rng = random.Random(0)
    words = small_corpus(50)
    rows = []
    for i in range(100):
        n = 200 if i % 25 == 0 else rng.randint(1, 12)
        rows.append(
            {
                "prompt": f"q{i} " + " ".join(rng.choice(words).split()[0] for _ in range(rng.randint(1, 8))),
                "chosen": " " + " ".join(rng.choice(words).split()[-1] for _ in range(n)),
                "rejected": " " + " ".join(rng.choice(words).split()[-1] for _ in range(rng.randint(1, 12))),
            }
        )
    d = tmp_path_factory.mktemp("small-pairs")
    (d / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare_pairs(d / "in.jsonl", tiny_model_dir, d / "pairs", max_length=1024, max_prompt_length=512)
    return d / "pairs"


def _hf_per_token(model, prompt_ids, completion_ids) -> np.ndarray:
    """Independent reference: one unpadded float32 forward per sequence, float64 log_softmax."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    pos = torch.arange(len(prompt_ids), ids.shape[1])
    return logp[0, pos - 1, ids[0, pos]].numpy()


@pytest.fixture(scope="module")
def scored_vllm(tiny_model_dir, small_pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "scored"
    reference(_ref_cfg(tiny_model_dir, small_pairs, out))
    return out


def test_vllm_scores_match_hf_forward(tiny_model_dir, small_pairs, scored_vllm, tiny_model):
    table = read_artifact(scored_vllm)
    assert table.schema.equals(SCORED_SCHEMA)
    m = manifest(scored_vllm)
    rejects = read_artifact(scored_vllm / "rejects")
    n_pairs = manifest(small_pairs)["rows"]
    assert m["rows"] == table.num_rows and m["rows"] + rejects.num_rows == n_pairs
    assert rejects.num_rows == 4 and set(rejects["reason"].to_pylist()) == {"too_long"}
    assert m["stats"]["parity"]["token_max_abs"] <= 1e-4
    assert (
        m["fingerprints"]["model"]
        and m["fingerprints"]["tokenizer"] == manifest(small_pairs)["fingerprints"]["tokenizer"]
    )
    worst = 0.0
    for row in table.to_pylist():
        for side in ("chosen", "rejected"):
            stored = np.asarray(row[f"ref_{side}_logps"], dtype=np.float64)
            assert len(stored) == len(row[f"{side}_ids"])
            expected = _hf_per_token(tiny_model, row["prompt_ids"], row[f"{side}_ids"])
            worst = max(worst, float(np.abs(stored - expected).max()))
            assert row[f"ref_{side}_logp"] == pytest.approx(float(stored.sum()), abs=1e-9)
    assert worst <= 1e-4, worst
    assert sorted(set(table["pair_id"].to_pylist()) | set(rejects["row"].to_pylist())) == sorted(
        read_artifact(small_pairs)["pair_id"].to_pylist()
    )


def test_hf_backend_agrees_with_vllm(tiny_model_dir, small_pairs, scored_vllm, tmp_path):
    out = tmp_path / "scored-hf"
    m = reference(_ref_cfg(tiny_model_dir, small_pairs, out, backend="hf", hf_token_budget=600))
    assert m.stats["parity"] == {"skipped": "backend hf is itself the transformers forward"}
    a = read_artifact(out).sort_by("pair_id").to_pylist()
    b = read_artifact(scored_vllm).sort_by("pair_id").to_pylist()
    assert [r["pair_id"] for r in a] == [r["pair_id"] for r in b]
    diffs = [
        np.abs(np.asarray(x[f"ref_{s}_logps"], np.float64) - np.asarray(y[f"ref_{s}_logps"], np.float64)).max()
        for x, y in zip(a, b, strict=True)
        for s in ("chosen", "rejected")
    ]
    assert max(diffs) <= 1e-4
    # Idempotent: a second run with the same config and pairs is skipped.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    reference(_ref_cfg(tiny_model_dir, small_pairs, out, backend="hf", hf_token_budget=600))
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_refuses_other_tokenizer_and_incomplete_pairs(tiny_model_dir, small_pairs, tmp_path):
    other = build_tiny_llama(tmp_path / "other", ["a different corpus entirely"] * 30, vocab_size=300)
    with pytest.raises(
        ArtifactError, match=r"tokenized with tokenizer [0-9a-f]{64}, but model .* has tokenizer [0-9a-f]{64}"
    ):
        reference(_ref_cfg(other, small_pairs, tmp_path / "x", backend="hf"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    with pytest.raises(ArtifactError, match="is incomplete"):
        reference(_ref_cfg(tiny_model_dir, incomplete, tmp_path / "y", backend="hf"))


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not present at {HH_SAMPLE}")
@pytest.mark.cluster
def test_hh_scored_with_vllm_resumes_after_the_driver_is_killed(tiny_model_dir, tmp_path):
    """`python -m pipeline reference` on the HH pairs, SIGKILLed while its third unit is held in flight (the test
    hook dpo_ray.testing.faults.hold_unit: two units are certainly done, the rest certainly not), then rerun.
    Failed before on a fast machine: killed when two shards were seen, the run could be done by then."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "prepare": {
            "inputs": [str(HH_SAMPLE)],
            "tokenizer": str(tiny_model_dir),
            "max_length": 512,
            "max_prompt_length": 384,
        },
        "reference": {
            "model": str(tiny_model_dir),
            "max_model_len": 513,
            "gpu_memory_utilization": 0.1,
            "rows_per_unit": 100,
        },
    }
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg))
    pairs_m = prepare(PrepareConfig(**{**cfg["prepare"], "output": str(tmp_path / "run" / "pairs")}))
    out = tmp_path / "run" / "scored"
    hold = tmp_path / "hold"
    hold.mkdir()
    hook = f"dpo_ray.testing.faults:hold_unit:unit:2:{hold}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DPO_RAY_UNIT_HOOK": hook}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "reference", "--config", str(cfg_file)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 600  # a wait for an event, not a guess at a moment: generous on slow machines
    while not (hold / "held").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached its third unit"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(done_before) == 2 and not (out / "manifest.json").exists()  # units 0 and 1, one shard each

    m = reference(ReferenceConfig(**{**cfg["reference"], "pairs": str(tmp_path / "run" / "pairs"), "output": str(out)}))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in done_before} == done_before
    assert m.stats["units_scored_this_run"] == m.stats["units"] - len(done_before)
    table = read_artifact(out)
    ids = table["pair_id"].to_pylist()
    assert len(ids) == len(set(ids)) == m.rows == pairs_m.rows - m.stats["rows_rejected"]
    assert set(ids) <= set(read_artifact(tmp_path / "run" / "pairs")["pair_id"].to_pylist())
    assert m.stats["parity"]["token_max_abs"] <= 1e-4
    print(f"HH reference: {m.rows} pairs scored, {m.stats['rows_rejected']} too long, parity {m.stats['parity']}")


def test_engine_scores_given_ids_exactly(tiny_model_dir, tiny_model):
    """dpo_ray.models.engine directly: vLLM prompt log-probs of stored ids vs an HF forward (float32)."""
    from dpo_ray.models.engine import EngineSpec, make_engine, score_completions

    llm = make_engine(EngineSpec(model=str(tiny_model_dir), max_model_len=256, gpu_memory_utilization=0.1))
    rng = random.Random(1)
    vocab = tiny_model.config.vocab_size
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 30))] for _ in range(20)]
    completions = [[rng.randrange(3, vocab) for _ in range(rng.randint(0, 40))] + [2] for _ in range(20)]
    got = score_completions(llm, prompts, completions)
    for p, c, g in zip(prompts, completions, got, strict=True):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            ref = token_logps(tiny_model(input_ids=ids).logits, ids)[0, len(p) :].double().numpy()
        np.testing.assert_allclose(np.asarray(g), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prompts but"):
        score_completions(llm, prompts, completions[:-1])
    del llm


def test_seeded_sampling_of_more_prompt_tokens_than_a_step_holds(tiny_model_dir, tiny_model):
    """dpo_ray.models.engine.sample on CPU with 64 prompts of 200 tokens and 4 samples each (51k prompt tokens,
    vLLM's CPU default step holds 4,096): every request gets its samples, and the same seeds give the same
    samples again. Before make_engine turned chunked prefill off on CPU, vLLM split a prompt across steps and
    failed rewinding its seeded CPU generator ('CPU Generator does not use offset')."""
    from dpo_ray.models.engine import EngineSpec, make_engine, sample

    llm = make_engine(EngineSpec(model=str(tiny_model_dir), max_model_len=256, gpu_memory_utilization=0.1))
    vocab = tiny_model.config.vocab_size
    prompts = [[1] + [3 + (7 * i + j) % (vocab - 3) for j in range(199)] for i in range(64)]
    first = sample(llm, prompts, 4, 1.0, 1.0, 8, list(range(64)))
    again = sample(llm, prompts[::-1], 4, 1.0, 1.0, 8, list(range(64))[::-1])[::-1]
    assert [len(r) for r in first] == [4] * 64
    assert [[s.completion_ids for s in r] for r in first] == [[s.completion_ids for s in r] for r in again]
    del llm
