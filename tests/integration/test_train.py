"""The train stage on local Ray (CPU, gloo): invariances, learning, fault tolerance, export, refusals."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_ray.compute.logps import token_logps
from dpo_ray.data.artifacts import ArtifactError
from dpo_ray.models.loading import load_causal_lm
from dpo_ray.models.tiny import build_tiny_llama
from pipeline.cli.demo import build_assets
from pipeline.config import PrepareConfig, ReferenceConfig, TrainConfig
from pipeline.stages.prepare import run as prepare
from pipeline.stages.reference import run as reference
from pipeline.stages.train import run as train
from tests.integration.helpers import prepare_pairs, read_artifact

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Review-preference pairs, a tiny Llama, and their `scored` artifact (hf backend: same numbers as vLLM)."""
    root = tmp_path_factory.mktemp("train")
    assets = build_assets(root / "assets", pairs=400, seed=0, conditional=True)
    model = assets / "model"
    prepare_pairs(assets / "pairs.jsonl", model, root / "pairs", eval_fraction=0.2)
    reference(ReferenceConfig(model=str(model), pairs=str(root / "pairs"), output=str(root / "scored"), backend="hf"))
    return {"root": root, "model": model, "scored": root / "scored"}


def _cfg(setup, name: str, **kw) -> TrainConfig:
    """The test's train config; a keyword `section__key` sets train.section.key."""
    base = {
        "model": str(setup["model"]),
        "scored": str(setup["scored"]),
        "output": str(setup["root"] / name / "train"),
        "export": str(setup["root"] / name / "export"),
        "checkpoint__storage_path": str(setup["root"] / name / "checkpoints"),
        "batch_size": 16,
        "max_steps": 5,
        "optim__lr": 5e-3,
        "batching__token_budget": 100_000,
        "checkpoint__every": 100,
    }
    data: dict = {}
    for key, value in {**base, **kw}.items():
        *sections, leaf = key.split("__")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return TrainConfig.model_validate(data)


@contextlib.contextmanager
def _fault(spec: str | None) -> Iterator[None]:
    """Train under dpo_ray.testing.faults' step hook 'STEP:RANK[:node]' (None: no fault), set as the train stage
    reads it: from the driver's environment."""
    from dpo_ray.hooks import STEP_HOOK_ENV

    before = os.environ.get(STEP_HOOK_ENV)
    if spec is not None:
        os.environ[STEP_HOOK_ENV] = f"dpo_ray.testing.faults:fail:{spec}"
    try:
        yield
    finally:
        os.environ.pop(STEP_HOOK_ENV, None)
        if before is not None:
            os.environ[STEP_HOOK_ENV] = before


def single_sequence_logps(model, prompts, completions) -> list[np.ndarray]:
    """Per-token completion log-probs from one unpadded forward per sequence (float64)."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            out.append(token_logps(model(input_ids=ids).logits, ids)[0, len(p) :].double().numpy())
    return out


def _history(cfg: TrainConfig) -> list[dict]:
    return [json.loads(line) for line in Path(cfg.output, "metrics.jsonl").read_text().splitlines()]


TRACKERS = ["tensorboard", "mlflow", "wandb"]


@pytest.fixture(scope="module")
def two_workers(setup) -> TrainConfig:
    """Two workers, logging to every tracker (offline: the driver's WANDB_MODE travels in the settings)."""
    from dpo_ray.train.tracking import missing_backends

    trackers = [] if missing_backends(TRACKERS) else TRACKERS
    kw = {
        "tracking__report_to": trackers,
        "tracking__dir": str(setup["root"] / "two" / "tracking"),
        "tracking__experiment": "t",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = _cfg(setup, "two", workers__count=2, eval_every=1, **kw)
        train(cfg)
    return cfg


def test_trackers_get_every_step_from_rank_0_under_trl_names(two_workers):
    """Read back with each library's reader: the same per-step values as metrics.jsonl, one tracker run (rank 0
    only), the resolved config as params, the export path."""
    from tests.tracking_readers import mlflow_run, tensorboard_scalars, wandb_offline

    if not two_workers.tracking.report_to:
        pytest.skip("tracking libraries not installed")
    hist = _history(two_workers)
    root = Path(two_workers.tracking.dir)
    event_dirs = list((root / "tensorboard").iterdir())
    assert len(event_dirs) == 1 and len(list(event_dirs[0].glob("events.out.tfevents.*"))) == 1  # rank 0 only
    tb = tensorboard_scalars(str(event_dirs[0]))
    for name, key in (("train/loss", "loss"), ("train/rewards/margins", "rewards/margins"), ("eval/loss", "eval/loss")):
        assert [s for s, _ in tb[name]] == [h["step"] for h in hist] == [1, 2, 3, 4, 5]
        assert [v for _, v in tb[name]] == pytest.approx([h[key] for h in hist], rel=1e-6)
    ml = mlflow_run(f"file:{root / 'mlruns'}", "t", two_workers.export)
    assert ml["params"]["train.loss.beta"] == "0.1" and ml["params"]["train.workers.count"] == "2"
    assert ml["tags"]["export"] == two_workers.export
    assert [v for _, v in ml["metrics"]["train/rewards/chosen"]] == pytest.approx(
        [h["rewards/chosen"] for h in hist], rel=1e-6
    )
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wb = wandb_offline(str(root), next(runs[0].glob("run-*.wandb")).stem.removeprefix("run-"))
    assert [s for s, _ in wb["history"]["eval/rewards/accuracies"]] == [1, 2, 3, 4, 5]
    assert wb["config"]["train"]["batch_size"] == 16 and wb["summary"]["export"] == two_workers.export


def test_first_loss_is_ln2_and_the_split_does_not_change_the_updates(setup, two_workers):
    """Same global batch of 16 pairs: local mode (1 process, 1 micro-batch) vs 2 workers vs 16 micro-batches."""
    local = _cfg(setup, "local", workers__count=0)
    micro = _cfg(
        setup, "micro", workers__count=0, batching__token_budget=200
    )  # ~1 pair per micro-batch: 16 x 1 vs 1 x 16
    train(local)
    train(micro)
    runs = {"local": _history(local), "two": _history(two_workers), "micro": _history(micro)}
    for name, hist in runs.items():
        assert [h["step"] for h in hist] == [1, 2, 3, 4, 5], name
        assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), name
        assert abs(hist[0]["rewards/margins"]) < 1e-6
    for name in ("two", "micro"):
        for a, b in zip(runs["local"], runs[name], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), (name, a["step"])
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-4), (name, a["step"])
            # The gradient itself, before clipping: AdamW's update hides a uniformly mis-scaled gradient (2x moved
            # the losses of 5 steps by 3e-7), so the losses alone could not show a wrong sum over ranks or
            # micro-batches. Float32 sums in another order: ~1e-6 relative; 1e-4 leaves margin, 2x is 1.
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (name, a["step"])
    assert max(abs(h["loss"] - math.log(2)) for h in runs["local"]) > 0.01


def test_learns_the_preference(setup):
    """Prompt-conditional preferences: eval accuracy starts near chance and must reach >= 0.9."""
    cfg = _cfg(setup, "learn", workers__count=0, max_steps=40, eval_every=4, optim__lr=2e-3, batch_size=32)
    train(cfg)
    hist = [h for h in _history(cfg) if "eval/loss" in h]
    first, last = hist[0], hist[-1]
    print("eval accuracy by step:", [(h["step"], round(h["eval/rewards/accuracies"], 3)) for h in hist])
    assert first["eval/rewards/accuracies"] <= 0.75
    assert last["eval/rewards/accuracies"] >= 0.9
    assert last["eval/loss"] < first["eval/loss"] - 0.1
    assert last["loss"] < first["loss"]
    for key in ("grad_norm", "lr", "tokens_per_sec", "pairs_per_sec", "logps/chosen", "rewards/chosen"):
        assert key in last
    assert len(_history(cfg)) == 40
    # A healthy run: the default guards (train.health) stay quiet, and the signals are there at every step.
    assert not [k for h in _history(cfg) for k in h if k.startswith("health/alarm/")]
    assert all("health/chosen_logp_shift" in h and h["health/nonfinite"] == 0.0 for h in _history(cfg))


def test_export_loads_in_transformers_and_vllm_and_matches_the_last_checkpoint(setup, two_workers, tmp_path):
    import torch.distributed.checkpoint as dcp

    from dpo_ray.models.engine import EngineSpec, make_engine, score_completions

    export = Path(two_workers.export)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["upstream"]["scored"]
    trained = load_causal_lm(export)
    # The trainer's last-step policy, read back from the last checkpoint (DCP) into a fresh model.
    checkpoint = sorted(p for p in Path(two_workers.checkpoint.storage_path, "dpo").glob("checkpoint_*") if p.is_dir())[
        -1
    ]
    policy = load_causal_lm(setup["model"])
    state = {"model": policy.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint / "state"))
    policy.load_state_dict(state["model"])
    reference_model = load_causal_lm(setup["model"])
    rows = read_artifact(setup["scored"]).slice(0, 12).to_pylist()
    prompts = [r["prompt_ids"] for r in rows]
    completions = [r["chosen_ids"] for r in rows]

    def hf(model):
        return single_sequence_logps(model, prompts, completions)

    from_export, from_checkpoint, from_reference = hf(trained), hf(policy), hf(reference_model)
    for a, b, r in zip(from_export, from_checkpoint, from_reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert np.abs(a - r).max() > 1e-3  # training changed the model
    llm = make_engine(EngineSpec(model=str(export), max_model_len=128, gpu_memory_utilization=0.1))
    from_vllm = score_completions(llm, prompts, completions)
    for a, v in zip(from_export, from_vllm, strict=True):
        np.testing.assert_allclose(a, np.asarray(v), atol=1e-4)
    del llm


@pytest.mark.cluster
def test_bco_shift_is_the_same_for_any_split_and_survives_a_restart(setup):
    """BCO's δ is loop state: 1 process, 16 micro-batches, 2 workers, and 2 workers that lose one after the
    step-2 checkpoint all give the same δ and losses at every step (δ from the checkpoint after the restart)."""
    kw = {"loss__name": "bco_pair", "optim__lr": 5e-3}
    runs = {
        "local": _cfg(setup, "bco-local", workers__count=0, **kw),
        "micro": _cfg(setup, "bco-micro", workers__count=0, batching__token_budget=200, **kw),
        "two": _cfg(setup, "bco-two", workers__count=2, **kw),
        "fault": _cfg(
            setup,
            "bco-fault",
            workers__count=2,
            checkpoint__every=2,
            workers__max_failures=1,
            **kw,
        ),
    }
    hist = {}
    for name, cfg in runs.items():
        with _fault("3:1" if name == "fault" else None):
            train(cfg)
        hist[name] = _history(cfg)
    local = hist["local"]
    assert local[0]["bco/delta"] == 0.0 and local[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert local[1]["bco/delta"] == pytest.approx(0.5 * (local[0]["rewards/chosen"] + local[0]["rewards/rejected"]))
    assert abs(local[-1]["bco/delta"]) > 1e-3  # δ moved: a lost or reset δ would show
    assert hist["fault"][2]["resumed_from_step"] == 2
    for name in ("micro", "two", "fault"):
        for a, b in zip(local, hist[name], strict=True):
            assert b["bco/delta"] == pytest.approx(a["bco/delta"], abs=1e-5), (name, a["step"])
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), (name, a["step"])


def test_worker_failure_resumes_from_last_checkpoint(setup):
    cfg = _cfg(setup, "fault", workers__count=2, checkpoint__every=2, workers__max_failures=1)
    with _fault("3:1"):
        train(cfg)
    hist = _history(cfg)
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert all("resumed_from_step" not in h for h in hist[:2])
    assert all(h["resumed_from_step"] == 2 for h in hist[2:])
    assert (Path(cfg.export) / "model.safetensors").exists()


@pytest.mark.cluster
def test_restarted_job_with_same_run_name_continues(setup):
    cfg = _cfg(setup, "restart", workers__count=1, checkpoint__every=2, workers__max_failures=0)
    with _fault("3:0"), pytest.raises(Exception, match="(?i)fail|error"):
        train(cfg)
    assert not (Path(cfg.export) / "manifest.json").exists()
    train(cfg)  # same config, same run name: a new job
    hist = _history(cfg)
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert all(h["resumed_from_step"] == 2 for h in hist[2:])
    # And a complete export is not retrained.
    mtime = (Path(cfg.export) / "manifest.json").stat().st_mtime_ns
    train(cfg)
    assert (Path(cfg.export) / "manifest.json").stat().st_mtime_ns == mtime
    # Reusing the run name with another config is refused instead of resuming foreign checkpoints.
    with pytest.raises(ArtifactError, match="holds checkpoints of a run with another config"):
        train(_cfg(setup, "restart", workers__count=1, checkpoint__every=2, optim__lr=1e-3))


def test_refusals(setup, tmp_path):
    other = build_tiny_llama(tmp_path / "other", ["another corpus"] * 30, vocab_size=300)
    with pytest.raises(
        ArtifactError, match=r"tokenized with tokenizer [0-9a-f]{64}, but model .* has tokenizer [0-9a-f]{64}"
    ):
        train(_cfg(setup, "x", model=str(other)))
    incomplete = tmp_path / "scored"
    incomplete.mkdir()
    with pytest.raises(ArtifactError, match="is incomplete"):
        train(_cfg(setup, "y", scored=str(incomplete)))
    with pytest.raises(ArtifactError, match="fewer than train.batch_size"):
        train(_cfg(setup, "z", batch_size=4096))


def test_fsdp2_gives_the_ddp_updates(setup, two_workers):
    """FSDP2 (fully_shard per layer) on 2 CPU workers: the same losses as DDP for the same batches.

    A 300-token budget gives the two ranks different micro-batch counts (and the eval split's last batch
    may leave a rank without pairs): FSDP all-gathers in every forward, so this hangs unless the ranks'
    forward counts are aligned (dpo_ray.train.collectives.aligned)."""
    cfg = _cfg(setup, "fsdp", workers__count=2, workers__parallelism="fsdp", batching__token_budget=300, eval_every=5)
    train(cfg)
    fsdp, ddp = _history(cfg), _history(two_workers)
    for a, b in zip(fsdp, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]  # the losses cannot see its scale
    assert (Path(cfg.export) / "model.safetensors").exists()


def test_sequence_parallel_trains_as_data_parallel(setup, two_workers):
    """train.sequence_parallel 2 on 2 workers (one group: both ranks compute every pair, each on half of each
    row's tokens): the losses, gradient norms, eval losses and exported weights of two data-parallel workers.
    Bounds as in tests/unit/test_sequence_parallel.py; 5 Adam steps of lr 5e-3 keep the weights within 1e-4."""
    cfg = _cfg(setup, "sp", workers__count=2, sequence_parallel=2, eval_every=1)
    train(cfg)
    sp, ddp = _history(cfg), _history(two_workers)
    assert len(sp) == len(ddp) == 5
    for a, b in zip(sp, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
        assert a["eval/loss"] == pytest.approx(b["eval/loss"], abs=1e-4), a["step"]
    mine, theirs = _weights(cfg), _weights(two_workers)
    assert all(torch.allclose(mine[n], theirs[n], atol=1e-4) for n in theirs)


@pytest.mark.parametrize("then", [2, 1])
def test_a_sequence_parallel_run_resumes_onto_another_group_size(setup, two_workers, then):
    """A run with k = 2 killed after its step-2 checkpoint (rank 0 fails in step 3) resumes with k = `then`:
    within the job (k = 2, Ray Train restarts the group) or as a new job with the same run name and k = 1
    (sequence_parallel spreads the computation, so it is not part of the run's identity). Either way steps 3-5
    resume from step 2 and every step's loss and grad norm, and the exported weights, are those of the unbroken
    two-worker run (bounds as in test_sequence_parallel_trains_as_data_parallel)."""
    name = f"sp-resume-{then}"
    common = {"workers__count": 2, "checkpoint__every": 2}
    killed = _cfg(setup, name, sequence_parallel=2, workers__max_failures=1 if then == 2 else 0, **common)
    if then == 2:
        with _fault("3:0"):
            train(killed)
    else:
        with _fault("3:0"), pytest.raises(Exception, match="(?i)fail|error"):
            train(killed)
        assert not (Path(killed.export) / "manifest.json").exists()
        train(_cfg(setup, name, sequence_parallel=1, workers__max_failures=0, **common))
    hist, ddp = _history(killed), _history(two_workers)
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert [h.get("resumed_from_step") for h in hist] == [None, None, 2, 2, 2]
    for a, b in zip(hist, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    mine, theirs = _weights(killed), _weights(two_workers)
    assert all(torch.allclose(mine[n], theirs[n], atol=1e-4) for n in theirs)


def test_lora_with_prefix_sharing_exports_a_merged_model_vllm_loads(setup, two_workers):
    """LoRA (peft) on 2 workers with prefix_shared batching: step 1 is the reference (ln 2), only the
    adapters train, the export is the merged model (transformers == the PEFT model from the checkpoint,
    vLLM within 1e-4) and the adapter is saved beside it."""
    from peft import PeftModel

    from dpo_ray.models.engine import EngineSpec, make_engine, score_completions

    cfg = _cfg(
        setup,
        "lora",
        workers__count=2,
        batching__mode="prefix_shared",
        optim__lr=2e-2,
        lora={"r": 8, "alpha": 16, "save_adapter": True},
    )
    train(cfg)
    hist = _history(cfg)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(hist[-1]["loss"] - math.log(2)) > 1e-3  # the adapters moved the policy
    export = Path(cfg.export)
    merged = load_causal_lm(export)
    adapted = PeftModel.from_pretrained(load_causal_lm(setup["model"]), str(export / "adapter")).eval()
    base = load_causal_lm(setup["model"])
    rows = read_artifact(setup["scored"]).slice(0, 8).to_pylist()
    prompts, completions = [r["prompt_ids"] for r in rows], [r["rejected_ids"] for r in rows]

    def hf(model):
        return single_sequence_logps(model, prompts, completions)

    from_merged, from_adapter, from_base = hf(merged), hf(adapted), hf(base)
    for m, a, b in zip(from_merged, from_adapter, from_base, strict=True):
        np.testing.assert_allclose(m, a, atol=1e-5)
        assert np.abs(m - b).max() > 1e-3  # the adapters changed the model
    # Only attention projections were adapted: the merged MLP weights are the base's.
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert torch.equal(base_sd["model.layers.0.mlp.up_proj.weight"], merged_sd["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(
        base_sd["model.layers.0.self_attn.q_proj.weight"], merged_sd["model.layers.0.self_attn.q_proj.weight"]
    )
    llm = make_engine(EngineSpec(model=str(export), max_model_len=128, gpu_memory_utilization=0.1))
    from_vllm = score_completions(llm, prompts, completions)
    for m, v in zip(from_merged, from_vllm, strict=True):
        np.testing.assert_allclose(m, np.asarray(v), atol=1e-4)
    del llm


@pytest.fixture(scope="module")
def sharded(setup) -> Path:
    """The same pairs as a many-shard artifact: 40-row pair shards, scored in 24-pair units (>= 10 shards)."""
    root = setup["root"] / "sharded"
    prepare(
        PrepareConfig(
            inputs=[str(setup["root"] / "assets" / "pairs.jsonl")],
            tokenizer=str(setup["model"]),
            output=str(root / "pairs"),
            max_length=96,
            max_prompt_length=48,
            eval_fraction=0.2,
            rows_per_shard=40,
        )
    )
    reference(
        ReferenceConfig(
            model=str(setup["model"]),
            pairs=str(root / "pairs"),
            output=str(root / "scored"),
            backend="hf",
            rows_per_unit=24,
        )
    )
    assert len(json.loads((root / "scored" / "manifest.json").read_text())["shards"]) >= 10
    return root / "scored"


def _weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(cfg.export) / "model.safetensors"))


@pytest.mark.cluster
def test_order_depends_on_the_artifact_and_seed_only(setup, sharded):
    """Two runs on a many-shard artifact, and a run killed mid-epoch then resumed by a new job, give the same
    weights; the run crosses an epoch boundary (64-pair batches: 4 steps an epoch), so the per-epoch order
    and its resume are exercised. Another seed gives other weights (the order matters)."""
    common = {"scored": str(sharded), "batch_size": 64, "max_steps": 7, "checkpoint__every": 2, "workers__count": 1}
    first = _cfg(setup, "order-a", **common)
    train(first)
    train(second := _cfg(setup, "order-b", **common))
    killed = _cfg(setup, "order-c", **common, workers__max_failures=0)
    with _fault("5:0"), pytest.raises(Exception, match="(?i)fail|error"):
        train(killed)
    train(killed)
    assert [h.get("resumed_from_step") for h in _history(killed)][-1] == 4
    reseeded = _cfg(setup, "order-d", **{**common, "seed": 1})
    train(reseeded)
    a, b, c, d = (_weights(x) for x in (first, second, killed, reseeded))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(c[name], a[name], atol=1e-6, rtol=0)
    assert max(float((d[n] - a[n]).abs().max()) for n in a) > 1e-4  # the seeded order is the one used


def test_a_failed_step0_check_is_a_clear_error(setup, tmp_path, capsys):
    """Reference log-probs that do not match the model (here: shifted by 0.5 nats on every chosen completion)
    stop train at step 1 with exit status 2 and a message naming the likely causes, no traceback."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import yaml

    from dpo_ray.data import artifacts
    from pipeline.cli.main import main

    source = artifacts.read_manifest(str(setup["scored"]))
    bad = tmp_path / "scored"
    bad.mkdir()
    for shard in source.shards:
        table = pq.read_table(setup["scored"] / shard.file)
        shifted = pc.add(table["ref_chosen_logp"], 0.5)
        pq.write_table(
            table.set_column(table.schema.get_field_index("ref_chosen_logp"), "ref_chosen_logp", shifted),
            bad / shard.file,
        )
    artifacts.write_manifest(str(bad), "scored", source.config, source.fingerprints, source.upstream, source.stats)
    cfg = _cfg(setup, "step0", scored=str(bad), workers__count=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": cfg.model_dump(mode="json")}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    # Ray forwards its own processes' logs to stderr, prefixed "(Name pid=...)"; the CLI's lines are ours.
    ours = [line for line in err.splitlines() if "pid=" not in line]
    error_lines = [line for line in ours if line.startswith("error: ")]
    assert len(error_lines) == 1 and "step 0 check failed" in error_lines[0] and "Likely causes" in error_lines[0]
    assert not any("Traceback" in line for line in ours)
    assert not (Path(cfg.export) / "manifest.json").exists()


def _altered_scored(setup, out: Path, change) -> Path:
    """A copy of setup's `scored` artifact with `change(table) -> table` applied to every shard."""
    import pyarrow.parquet as pq

    from dpo_ray.data import artifacts

    source = artifacts.read_manifest(str(setup["scored"]))
    out.mkdir()
    for shard in source.shards:
        pq.write_table(change(pq.read_table(setup["scored"] / shard.file)), out / shard.file)
    artifacts.write_manifest(str(out), "scored", source.config, source.fingerprints, source.upstream, source.stats)
    return out


def _latest_checkpoint_step(cfg: TrainConfig) -> int:
    found = sorted(Path(cfg.checkpoint.storage_path, cfg.run_name).glob("checkpoint_*/trainer.json"))
    return int(json.loads(found[-1].read_text())["step"]) if found else 0


def test_the_displacement_guard_warns_or_stops_a_collapsing_run(setup, tmp_path, capsys):
    """lr 5e-2 on the tiny model displaces the chosen completions within a few steps. With the guard at warn
    the run finishes and records the alarm at every step past the limit; at stop it ends at the first of them
    with exit status 3, a message naming the signal, step, value and remedies, no export, and the checkpoint of
    the step before kept. The default guards stay quiet on the healthy runs (test_learns_the_preference)."""
    import yaml

    from pipeline.cli.main import main

    collapse = {"optim__lr": 5e-2, "max_steps": 8, "checkpoint__every": 1, "workers__count": 1}
    guard = {"limit": -0.5, "action": "warn"}
    warned = _cfg(setup, "collapse-warn", health__chosen_logp_shift=guard, **collapse)
    train(warned)
    hist = _history(warned)
    shifts = [h["health/chosen_logp_shift"] for h in hist]
    print("chosen log-prob shift by step:", [round(x, 3) for x in shifts])
    fired = [h["step"] for h in hist if h.get("health/alarm/chosen_logp_shift")]
    assert fired and fired == [h["step"] for h in hist if h["health/chosen_logp_shift"] < -0.5], (fired, shifts)
    first = fired[0]
    assert first > 1 and (Path(warned.export) / "manifest.json").exists()

    stopped = _cfg(setup, "collapse-stop", health__chosen_logp_shift=guard | {"action": "stop"}, **collapse)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": stopped.model_dump(mode="json")}))
    assert main(["train", "--config", str(path)]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "a health guard stopped the run" in errors[0], errors
    assert f"health/chosen_logp_shift {hist[first - 1]['health/chosen_logp_shift']:.4g} at step {first}" in errors[0]
    assert "Remedies" in errors[0] and "lower train.optim.lr" in errors[0]
    assert not (Path(stopped.export) / "manifest.json").exists()
    assert _latest_checkpoint_step(stopped) == first - 1  # the step that fired was not checkpointed
    assert _history(stopped)[-1]["step"] == first  # its metrics are recorded


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_its_pairs(setup, tmp_path, capsys):
    """NaN reference log-probs in the pairs of the second global batch: the run stops at step 2 with exit
    status 3, naming the step and those pairs, and keeps step 1's checkpoint; nothing is exported."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import yaml

    from dpo_ray.data import artifacts
    from dpo_ray.data.order import epoch_batches, read_split
    from pipeline.cli.main import main

    source = artifacts.read_manifest(str(setup["scored"]))
    train_rows = read_split(str(setup["scored"]), source.shards, "train", ["pair_id"])
    second = set(train_rows["pair_id"][epoch_batches(len(train_rows["pair_id"]), 16, 0, 0)[1]].tolist())

    def poison(table):
        hit = pc.is_in(table["pair_id"], value_set=pa.array(sorted(second)))
        nan = pa.array([float("nan")] * len(table), type=pa.float64())
        column = pc.if_else(hit, nan, table["ref_chosen_logp"])
        return table.set_column(table.schema.get_field_index("ref_chosen_logp"), "ref_chosen_logp", column)

    scored = _altered_scored(setup, tmp_path / "scored", poison)
    cfg = _cfg(setup, "nan", scored=str(scored), checkpoint__every=1, workers__count=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": cfg.model_dump(mode="json")}))
    assert main(["train", "--config", str(path)]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "non-finite loss or gradient at step 2" in errors[0], errors
    named = re.search(r"the batch's pairs: (.*?)\. The step", errors[0]).group(1).split(", ")  # type: ignore[union-attr]
    assert named[-1] == "..." and len(named) == 9 and set(named[:-1]) <= second  # 8 of the 16 shown
    assert _latest_checkpoint_step(cfg) == 1
    assert not (Path(cfg.export) / "manifest.json").exists()


def test_the_fused_head_trains_as_the_unfused_one(setup, two_workers):
    """fused_head on two workers (prefix_shared, as `auto` picks on CPU): the same losses and margins at every
    step as the unfused two-worker run."""
    fused = _cfg(
        setup, "fused", workers__count=2, eval_every=1, batching__mode="prefix_shared", batching__fused_head=True
    )
    train(fused)
    assert two_workers.batching.mode == "auto"
    for a, b in zip(_history(two_workers), _history(fused), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5), a["step"]
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], abs=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]


def test_compiled_layers_train_as_eager_ones(setup, two_workers):
    """train.compile on two FSDP2 workers (prefix_shared, as `auto` picks on CPU): the losses and margins of
    the uncompiled two-worker DDP run at every step, within inductor's float32 reassociation."""
    compiled = _cfg(
        setup, "compiled", workers__count=2, eval_every=1, workers__parallelism="fsdp", batching__compile=True
    )
    train(compiled)
    for a, b in zip(_history(two_workers), _history(compiled), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), a["step"]
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-4), a["step"]
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], abs=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]  # inductor reassociates
