"""32k-token pairs through prepare → reference (vLLM) → train with sequence parallelism, on this machine's CPUs:
the long-context set made from the HH-RLHF sample (dpo_ray.testing.long_context), a tiny Llama whose positions
reach past 32k, nothing truncated, vLLM's prompt log-probs of the longest sequence against a float64 sum of one
unpadded transformers forward, and two optimizer steps of 2 workers sharing each row (k = 2, prefix-shared rows,
the fused head from 8192 tokens, gradient checkpointing) whose first loss is ln 2 (the policy is the reference);
then generate and evaluate sample the trained policy after those long prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import HH_SAMPLE

pytestmark = [
    pytest.mark.usefixtures("ray_local"),
    pytest.mark.pipeline,
    pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not present at {HH_SAMPLE}"),
]

TARGETS = [32_000, 24_000, 12_000, 8_000]  # tokens of the longer sequence of each pair


@pytest.mark.timeout(1800)
def test_32k_pairs_go_through_prepare_reference_and_sequence_parallel_train(tmp_path):
    from dpo_ray.compute.logps import token_logps
    from dpo_ray.data.artifacts import read_manifest
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer
    from dpo_ray.models.tiny import build_tiny_llama
    from dpo_ray.testing.long_context import long_conversations, read_hh
    from pipeline.config import EvaluateConfig, GenerateConfig, PrepareConfig, ReferenceConfig, TrainConfig
    from pipeline.stages.evaluate import run as evaluate
    from pipeline.stages.generate import run as generate
    from pipeline.stages.prepare import run as prepare
    from pipeline.stages.reference import run as reference
    from pipeline.stages.train import run as train
    from tests.integration.helpers import read_artifact

    dialogs = read_hh(HH_SAMPLE)
    model = build_tiny_llama(
        tmp_path / "model", [d["chosen"] for d in dialogs[:300]], vocab_size=512, max_position_embeddings=33_000
    )
    tok = load_tokenizer(str(model))
    records = long_conversations(dialogs, lambda t: len(tok(t).input_ids), TARGETS, seed=0)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in records))

    pairs = prepare(
        PrepareConfig(
            inputs=[str(data)], tokenizer=str(model), format="implicit", max_length=32_768,
            max_prompt_length=32_700, eval_fraction=0.0, output=str(tmp_path / "pairs"),
        )
    )  # fmt: skip
    assert pairs.rows == len(TARGETS) and not any(pairs.stats["truncated"].values())
    longest = max(
        len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
        for r in read_artifact(tmp_path / "pairs").to_pylist()
    )
    assert 31_000 < longest <= 32_768

    reference(
        ReferenceConfig(
            model=str(model), pairs=str(tmp_path / "pairs"), output=str(tmp_path / "scored"), backend="vllm",
            max_model_len=32_800, gpu_memory_utilization=0.1, parity_samples=2,
        )
    )  # fmt: skip
    scored = read_manifest(str(tmp_path / "scored"))
    assert scored is not None and scored.stats["parity"]["sequence_max_abs"] <= scored.stats["parity"]["tolerance"]
    rows = read_artifact(tmp_path / "scored").to_pylist()
    row = max(rows, key=lambda r: len(r["prompt_ids"]) + len(r["chosen_ids"]))
    ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
    with torch.no_grad():
        want = token_logps(load_causal_lm(str(model))(input_ids=ids).logits, ids)[0, len(row["prompt_ids"]) :]
    # vLLM and transformers each sum float32 rounding over a 31k-token context: per token ~1e-6 relative (the
    # parity gate's own bound is 1e-4 a token); the sum of a few hundred tokens within 1e-3.
    assert np.abs(np.asarray(row["ref_chosen_logps"]) - want.double().numpy()).max() < 1e-4
    assert abs(row["ref_chosen_logp"] - float(want.double().sum())) < 1e-3

    cfg = TrainConfig.model_validate(
        {
            "model": str(model), "scored": str(tmp_path / "scored"), "output": str(tmp_path / "train"),
            "export": str(tmp_path / "export"), "checkpoint": {"storage_path": str(tmp_path / "ckpt")},
            "workers": {"count": 2}, "sequence_parallel": 2, "batch_size": 2, "max_steps": 2,
            "gradient_checkpointing": True, "optim": {"lr": 1e-3},
        }
    )  # fmt: skip
    train(cfg)
    history = [json.loads(line) for line in Path(cfg.output, "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts at the reference
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)
    assert (Path(cfg.export) / "model.safetensors").exists()

    engine = {"max_model_len": 32_800, "gpu_memory_utilization": 0.1}
    generated = generate(
        GenerateConfig(
            policy=cfg.export, prompts=str(tmp_path / "pairs"), max_prompts=2, n=4, max_tokens=16, reward="length",
            eval_fraction=0.0,
            generations=str(tmp_path / "generations"), output=str(tmp_path / "generated"), **engine,
        )
    )  # fmt: skip
    samples = read_artifact(tmp_path / "generations").to_pylist()
    assert len(samples) == 8 and 1 <= generated.rows <= 2  # two prompts of 8k-32k tokens, four samples each
    assert min(len(r["prompt_ids"]) for r in samples) > 7_000
    report = evaluate(
        EvaluateConfig(
            policy=cfg.export, reference=str(model), prompts=str(tmp_path / "pairs"), scored=str(tmp_path / "scored"),
            max_prompts=2, max_tokens=8, output=str(tmp_path / "eval"), **engine,
        )
    )  # fmt: skip
    assert report["prompts"] == 2 and math.isfinite(report["kl"])
