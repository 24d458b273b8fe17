"""The pipeline on an autoscaling multi-node Ray cluster with S3 object storage, on this one machine.

- The cluster: a Ray head (CPU 0, token authentication, loopback only) with Ray's autoscaler and its fake
  multi-node provider, the way Ray tests its own autoscaler: every "node" is a real raylet process with
  its own resources. The worker node types are clusters/aws.yaml's (same names and custom resources such
  as `accelerator_type:H100`, min_workers 0), scaled down to CPUs; each type gets its own CPU count so
  that a node's resources name its type. Idle timeout 15 s.
- Storage: an S3 server (moto, server mode, 127.0.0.1) reached through s3fs and pyarrow's S3 client. The run
  directory (artifacts, checkpoints, export) and the model and data inputs are `s3://` URIs; each node
  copies the models into its own scratch directory (DPO_RAY_CACHE with `{node}`).
- Submission: `ray job submit` through the Jobs API, the checkout as working dir, clusters/runtime_env.yaml.

Checked: the autoscaler launches each stage's node type from zero and removes it when idle; each stage's
actors/workers ran on a node type offering what its config asks for, never on the head; nodes are lost
mid-stage (the reference actor's node while its first unit is in flight and held there, killed from here; the train
workers' node at step 4, after the step-3 checkpoint, by the fault-injection hook) and the stages finish:
the lost unit ran again (counted in the manifest), train resumed from step 3; the artifacts on S3 are
complete and `dpo-ray status` lists them; the results equal the same config run locally without faults
(rows, reference per-token log-probs within 1e-5, training losses within 1e-6); a stage asking for an
accelerator no node type offers is refused before any work, naming it and the node types; nothing went
through a local path but the per-node model copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.integration.test_jobs import RAY, ROOT, JobClient, free_port, head_process, submit

pytestmark = pytest.mark.cluster

BUCKET = "dpo-ray-test"
IDLE_TIMEOUT_S = 15
CPUS = {"cpu-worker": 2, "gpu-inference": 3, "gpu-train": 4}  # distinct: a node's CPU count names its type


def fake_node_types() -> dict:
    """clusters/aws.yaml's worker node types for the fake provider: same names and custom resources, GPUs
    dropped (the stand-in stages ask num_gpus 0), CPUs scaled down, min 0, at most two nodes each."""
    aws = yaml.safe_load((ROOT / "clusters" / "aws.yaml").read_text())
    types = {}
    for name, spec in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            assert spec["resources"].get("CPU") == 0, "the head must advertise no CPUs"
            continue
        custom = {k: v for k, v in spec["resources"].items() if k not in ("CPU", "GPU")}
        assert spec.get("min_workers", 0) == 0, f"{name}: min_workers must be 0 (scale from zero)"
        types[name] = {
            "resources": {"CPU": CPUS[name], **custom, "object_store_memory": 300_000_000},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,  # a lost node's replacement may come while the provider still lists the dead one
        }
    return types


def autoscaling_config(gcs_port: int) -> dict:
    return {
        "cluster_name": "dpo-ray-fake",
        "max_workers": 6,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **fake_node_types(),
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 and the environment every process (nodes, job, this test) reaches it with."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """The autoscaling head (see the module docstring); yields (dashboard URL, GCS port, scratch root)."""
    root = tmp_path_factory.mktemp("cluster")
    gcs, dash = free_port(), free_port()
    (root / "autoscaling.json").write_text(json.dumps(autoscaling_config(gcs)))
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env |= s3 | {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token",
        "DPO_RAY_CACHE": str(root / "nodes" / "{node}"),
    }
    try:
        extra = ["--num-cpus=0", f"--autoscaling-config={root / 'autoscaling.json'}"]
        with head_process(gcs, dash, env, root / "ray-head.log", extra):
            yield f"http://127.0.0.1:{dash}", gcs, root
    finally:
        _kill_leftovers(gcs)


def _kill_leftovers(gcs_port: int) -> None:
    """Raylets of fake nodes that outlived the head (they are started outside its process group)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["cmdline"] and f":{gcs_port}" in " ".join(p.info["cmdline"]):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _state(address: str) -> dict:
    """Runs in a spawned helper (Ray caches its auth token per process): nodes and actors, dead ones too."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray.util.state import list_actors, list_nodes

    nodes = [
        {"id": n.node_id, "head": n.is_head_node, "state": n.state, "cpus": (n.resources_total or {}).get("CPU", 0)}
        for n in list_nodes(address=address, detail=True, limit=1000)
    ]
    actors = [
        {"class": a.class_name, "node": a.node_id, "state": a.state}
        for a in list_actors(address=address, detail=True, limit=10000)
    ]
    return {"nodes": nodes, "actors": actors}


def cluster_state(address: str) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_state, address).result(timeout=120)


def _kill_node(node_id: str) -> str:
    """Kill a fake node's raylet (SIGKILL): the node and every process on it are lost, as with a machine."""
    import psutil

    for p in psutil.process_iter(["name", "cmdline"]):
        if "raylet" not in (p.info["name"] or ""):
            continue
        try:
            ids = {p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")} | {
                a.split("=", 1)[1] for a in p.info["cmdline"] or [] if a.startswith("--node_id=")
            }
        except psutil.Error:
            continue
        if node_id in ids:
            p.kill()
            return node_id
    raise AssertionError(f"no raylet process for node {node_id}")


def _config(run_dir: str, model: str, data: str, accelerator: str | None = "H100") -> dict:
    """prepare → reference (vLLM) → train, sized for this machine; the resources each stage asks for are the
    8B example's (pipeline/configs/llama3-8b.yaml), scaled down: no GPUs, accelerator_type H100 kept (None
    for the local run, whose one node has no accelerator resource)."""
    return {
        "run_dir": run_dir,
        "rounds": 1,
        "prepare": {"inputs": [data], "tokenizer": model, "max_length": 96, "max_prompt_length": 48,
                    "eval_fraction": 0.1, "num_actors": 1},
        "reference": {"model": model, "backend": "vllm", "max_model_len": 128, "gpu_memory_utilization": 0.1,
                      "rows_per_unit": 64, "num_actors": 1, "num_cpus_per_actor": 1, "num_gpus_per_actor": 0,
                      "accelerator_type": accelerator},
        "train": {"model": model, "batch_size": 16, "max_steps": 6, "optim": {"lr": 1.0e-3},
                  "batching": {"token_budget": 4096}, "checkpoint": {"every": 3},
                  "workers": {"count": 2, "resources": {"CPU": 1}, "accelerator_type": accelerator}},
    }  # fmt: skip


def _upload(local: Path, uri: str) -> None:
    import s3fs

    s3fs.S3FileSystem().put(str(local), uri, recursive=local.is_dir())


def _scored(uri: str) -> dict[str, np.ndarray]:
    from dpo_ray.data import artifacts

    m = artifacts.require_complete(uri, "scored")
    out = {}
    for shard in m.shards:
        for r in artifacts.read_shard(uri, shard, ["pair_id", "ref_chosen_logps", "ref_rejected_logps"]).to_pylist():
            out[r["pair_id"]] = np.concatenate([r["ref_chosen_logps"], r["ref_rejected_logps"]])
    return out


def _losses(metrics_uri: str) -> dict[int, float]:
    import fsspec

    with fsspec.open(metrics_uri, "r") as f:
        return {h["step"]: h["loss"] for h in map(json.loads, f) if "loss" in h}


def test_pipeline_on_an_autoscaling_cluster_with_s3(cluster, s3, tmp_path, monkeypatch):
    from pipeline.cli.demo import build_assets

    address, gcs, root = cluster
    assets = build_assets(tmp_path / "assets", pairs=240, seed=0)
    _upload(assets / "model", f"s3://{BUCKET}/models/tiny")
    _upload(assets / "pairs.jsonl", f"s3://{BUCKET}/data/pairs.jsonl")
    start = cluster_state(address)
    assert [n["head"] for n in start["nodes"] if n["state"] == "ALIVE"] == [True], "the cluster starts from zero"

    # The same config locally (embedded Ray, local paths): the reference results.
    local = _config(str(tmp_path / "local"), str(assets / "model"), str(assets / "pairs.jsonl"), None)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["DPO_RAY_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(tmp_path / "local.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = f"s3://{BUCKET}/runs/cluster"
    # Train loses its node (rank 0 kills its raylet) at step 4, after the checkpoint of step 3.
    remote = _config(run_dir, f"s3://{BUCKET}/models/tiny", f"s3://{BUCKET}/data/pairs.jsonl")
    (ROOT / ".cluster-test.yaml").write_text(yaml.safe_dump(remote))
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(remote))
    runtime_env = yaml.safe_load((ROOT / "clusters" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(ROOT)
    # The reference's first unit is held once it is in flight (dpo_ray.testing.faults.hold_first_unit): its node is
    # killed at that known point. Killing the node of the first _Worker seen alive raced with the engine's start:
    # on a machine where it starts at another pace, no unit had been handed to it yet and nothing was retried.
    hold = tmp_path / "hold"
    hold.mkdir()
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **s3}
    runtime_env["env_vars"]["DPO_RAY_UNIT_HOOK"] = f"dpo_ray.testing.faults:hold_first_unit:{hold}"
    runtime_env["env_vars"]["DPO_RAY_STEP_HOOK"] = "dpo_ray.testing.faults:fail:4:0:node"  # dpo_ray.testing.faults
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for the job client's helper process
    client = JobClient(address)
    try:
        t0 = time.monotonic()
        job = submit(
            client,
            entrypoint=f"{sys.executable} -m pipeline run --config .cluster-test.yaml",
            runtime_env=runtime_env,
        )
        peak, killed = 1, None
        while (status := client.get_job_status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() - t0 < 1800, "the cluster run took over 30 minutes"
            now = cluster_state(address)
            alive = {n["id"] for n in now["nodes"] if n["state"] == "ALIVE"}
            peak = max(peak, len(alive))
            if killed is None and (hold / "held").exists():  # reference's first unit is in flight, held
                killed = _kill_node((hold / "held").read_text())
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-5000:]
        seconds = time.monotonic() - t0
    finally:
        (ROOT / ".cluster-test.yaml").unlink(missing_ok=True)
        client.close()
    print(f"cluster run: {seconds:.0f}s, peak {peak} nodes")

    # Placement: every stage's actors ran on worker nodes of a type offering what the stage asked for.
    state = cluster_state(address)
    node_type = {n["id"]: next((t for t, c in CPUS.items() if c == n["cpus"]), "head") for n in state["nodes"]}
    gpu_types = {t for t, spec in fake_node_types().items() if "accelerator_type:H100" in spec["resources"]}
    ran = {}
    for a in state["actors"]:
        for stage, marker in (("prepare", "Tokenize"), ("reference", "_Worker"), ("train", "RayTrainWorker")):
            if marker in a["class"]:
                ran.setdefault(stage, set()).add(node_type[a["node"]])
    assert set(ran) == {"prepare", "reference", "train"}, state["actors"]
    assert "head" not in set().union(*ran.values())
    assert ran["reference"] <= gpu_types and ran["train"] <= gpu_types, ran
    assert peak > 1, "no node was launched"
    assert killed is not None, "the reference stage's node was not killed"
    # Idle nodes are removed (bounded wait).
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 120
    while len([n for n in cluster_state(address)["nodes"] if n["state"] == "ALIVE"]) > 1:
        assert time.monotonic() < deadline, "idle worker nodes were not removed"
        time.sleep(5)

    # The artifacts on S3 are complete and equal the local run's.
    from dpo_ray.data import artifacts

    for name, kind in (("pairs", "pairs"), ("scored", "scored"), ("export", "model")):
        assert artifacts.require_complete(f"{run_dir}/{name}", kind).kind == kind
        assert (
            artifacts.read_manifest(f"{run_dir}/{name}").rows
            == artifacts.read_manifest(str(tmp_path / "local" / name)).rows
        )
    a, b = _scored(f"{run_dir}/scored"), _scored(str(tmp_path / "local" / "scored"))
    logp_diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert a.keys() == b.keys() and logp_diff <= 1e-5
    la, lb = _losses(f"{run_dir}/train/metrics.jsonl"), _losses(str(tmp_path / "local" / "train" / "metrics.jsonl"))
    loss_diff = max(abs(la[s] - lb[s]) for s in la)
    assert la.keys() == lb.keys() and loss_diff <= 1e-6, (la, lb)
    # The lost reference unit ran again (counted), and train resumed from its last checkpoint.
    stats = artifacts.read_manifest(f"{run_dir}/scored").stats
    assert stats["units_retried_this_run"] >= 1 and stats["units_scored_this_run"] == stats["units"], stats
    import fsspec

    with fsspec.open(f"{run_dir}/train/metrics.jsonl", "r") as f:
        resumed = {h.get("resumed_from_step") for h in map(json.loads, f)} - {None}
    assert resumed == {3}, resumed
    print(f"node loss: reference retried {stats['units_retried_this_run']} unit(s); train resumed from step 3")
    print(f"vs local: {len(a)} pairs, per-token max |diff| {logp_diff:.2e}; {len(la)} losses, max {loss_diff:.2e}")
    print(f"node types per stage: { {k: sorted(v) for k, v in ran.items()} }")
    status = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", "--config", str(tmp_path / "remote.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert status.returncode == 0 and "3/3 stage outputs complete" in status.stdout, status.stdout + status.stderr

    # A request no node type offers is refused before any work, naming the resource and the node types.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs}", "RAY_AUTH_MODE": "token"}
    env["DPO_RAY_CACHE"] = str(tmp_path / "driver-cache")
    for stage, args in (
        ("reference", ["reference.accelerator_type=A100", f"reference.output={run_dir}/scored-a100"]),
        ("train", ["train.workers.accelerator_type=A100", f"train.output={run_dir}/train-a100",
                   f"train.export={run_dir}/export-a100", f"train.checkpoint.storage_path={run_dir}/checkpoints-a100"]),
    ):  # fmt: skip
        t1 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", stage, "--config", str(tmp_path / "remote.yaml"), *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        err = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and err, done.stderr[-3000:]
        assert "accelerator_type:A100" in err[0] and "gpu-inference" in err[0] and "gpu-train" in err[0], err[0]
        print(f"{stage} asking for A100: refused in {time.monotonic() - t1:.0f}s: {err[0][:300]}")

    # Nothing local but each node's own model copy: one directory per node that loaded the model.
    copies = sorted(p.name for p in (root / "nodes").iterdir())
    assert len(copies) >= 2 and all((root / "nodes" / c / "models").is_dir() for c in copies), copies
