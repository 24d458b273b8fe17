"""clusters/ and pipeline/configs/: every file parses, carries its required keys and security defaults,
every config loads through pipeline.config, and what each GPU config asks Ray for exists in every
cluster definition (launcher YAMLs for AWS and GCP, the KubeRay RayCluster)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
CONFIGS = sorted((ROOT / "pipeline" / "configs").glob("*.yaml"))
LAUNCHERS = [CLUSTERS / "aws.yaml", CLUSTERS / "gcp.yaml"]
IMAGE_RE = re.compile(r"dpo-ray:[\w.]+-ray(\d+\.\d+\.\d+)$")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


@dataclass(frozen=True)
class Request:
    stage: str
    bundle: dict[str, float]  # what one actor / worker asks for
    count: int


def launcher_nodes(path: Path) -> list[NodeType]:
    cluster = yaml.safe_load(path.read_text())
    head = cluster["head_node_type"]
    return [
        NodeType(name, {k: float(v) for k, v in t["resources"].items()}, int(t.get("max_workers", 0)))
        for name, t in cluster["available_node_types"].items()
        if name != head
    ]


def kuberay_nodes(path: Path) -> list[NodeType]:
    spec = yaml.safe_load(path.read_text())["spec"]
    nodes = []
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        resources = {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0))}
        if "resources" in params:
            resources |= {k: float(v) for k, v in json.loads(json.loads(params["resources"])).items()}
        nodes.append(NodeType(group["groupName"], resources, int(group["maxReplicas"])))
    return nodes


def cluster_nodes() -> dict[str, list[NodeType]]:
    found = {p.name: launcher_nodes(p) for p in LAUNCHERS}
    found["kuberay/raycluster.yaml"] = kuberay_nodes(CLUSTERS / "kuberay" / "raycluster.yaml")
    return found


def requests(cfg: PipelineConfig) -> list[Request]:
    """The per-actor / per-worker resource bundles each stage asks Ray for (as the stages build them)."""
    out = []
    for stage in ("reference", "generate", "evaluate"):
        c = getattr(cfg, stage)
        if c is None:
            continue
        bundle = {"CPU": c.num_cpus_per_actor, "GPU": c.num_gpus_per_actor}
        if c.accelerator_type:
            bundle[f"accelerator_type:{c.accelerator_type}"] = 0.001
        out.append(Request(stage, bundle, 1 if stage == "evaluate" else c.num_actors))
    t = cfg.train.workers if cfg.train is not None else None
    if t is not None and t.count > 0:
        bundle = {k: float(v) for k, v in (t.resources or {"CPU": 1}).items()}
        if t.use_gpu:
            bundle.setdefault("GPU", 1.0)
        if t.accelerator_type:
            bundle[f"accelerator_type:{t.accelerator_type}"] = 0.001
        out.append(Request("train", bundle, t.count))
    return out


def unsatisfied(reqs: list[Request], nodes: list[NodeType]) -> list[str]:
    """Why the requests cannot all be scheduled on nodes of these types (empty: they can)."""
    problems = []
    for r in reqs:
        fitting = [n for n in nodes if all(n.resources.get(k, 0.0) >= v for k, v in r.bundle.items() if v > 0)]
        if not fitting:
            problems.append(f"{r.stage}: no node type offers {r.bundle}")
            continue
        # How many such bundles the fitting node types hold at their max size.
        capacity = sum(
            n.max_count * int(min(n.resources.get(k, 0.0) / v for k, v in r.bundle.items() if v > 0.001))
            for n in fitting
        )
        if capacity < r.count:
            problems.append(f"{r.stage}: {r.count} x {r.bundle} but the cluster holds at most {capacity}")
    return problems


def gpu_configs() -> list[Path]:
    return [p for p in CONFIGS if any(r.bundle.get("GPU", 0) > 0 for r in requests(load_config(p)))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.run_dir


def test_there_are_gpu_configs_for_real_tasks():
    assert [p.name for p in gpu_configs()] == [
        "llama3-8b-32k.yaml",
        "llama3-8b-ultrafeedback-lora.yaml",
        "llama3-8b.yaml",
        "qwen2.5-0.5b-hh.yaml",
    ]
    small = load_config(CONFIGS[[p.name for p in CONFIGS].index("qwen2.5-0.5b-hh.yaml")])
    assert small.prepare is not None and small.prepare.format == "implicit" and small.train is not None
    assert small.train.workers.count == 1 and not small.run_dir.startswith("s3://")  # one GPU, local disk
    assert small.evaluate is not None and 2 * small.evaluate.num_gpus_per_actor <= 1  # both engines on one card
    uf = load_config(CONFIGS[[p.name for p in CONFIGS].index("llama3-8b-ultrafeedback-lora.yaml")])
    assert uf.prepare is not None and uf.prepare.format == "conversational" and uf.prepare.columns.prompt is None
    assert uf.train is not None and uf.train.lora is not None and uf.prepare.hf_split == "train_prefs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_are_consistent(path):
    """Lengths fit across stages (reference scores max_length tokens and vLLM needs one slot more; sampling
    needs prompt + max_tokens) and one model family's tokenizer is used throughout."""
    cfg = load_config(path)
    prep = cfg.prepare
    assert prep is not None
    if cfg.reference is not None:
        assert cfg.reference.max_model_len > prep.max_length
        assert cfg.reference.model == prep.tokenizer
    for sampler in (cfg.generate, cfg.evaluate):
        if sampler is not None:
            assert sampler.max_model_len >= prep.max_prompt_length + sampler.max_tokens
    if cfg.train is not None:
        assert cfg.train.model == prep.tokenizer
    if cfg.evaluate is not None:
        assert cfg.evaluate.reference == prep.tokenizer


def test_the_long_context_config_splits_32k_pairs_across_gpus():
    """pipeline/configs/llama3-8b-32k.yaml: 32k-token sequences through every stage; train with sequence
    parallelism that Llama-3.1-8B's heads allow (32 query, 8 key-value), the fused head on its rows, gradient
    checkpointing, and its comment's memory arithmetic within an H100's 80 GB at k = 4 but not at k = 1."""
    import transformers

    from dpo_ray.compute.sequence_parallel import check_heads

    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("llama3-8b-32k.yaml")])
    prep, ref, train = cfg.prepare, cfg.reference, cfg.train
    assert prep is not None and ref is not None and train is not None
    assert prep.max_length == 32768 and ref.max_model_len > prep.max_length
    k = train.sequence_parallel
    assert k == 4 and train.workers.count % k == 0 and train.workers.use_gpu
    check_heads(transformers.LlamaConfig(num_attention_heads=32, num_key_value_heads=8), k)
    assert train.gradient_checkpointing and train.workers.parallelism == "fsdp"
    assert 0 < train.batching.fused_head_from <= prep.max_length and train.batching.token_budget >= 2 * prep.max_length
    assert ref.max_num_batched_tokens is None  # the step budget comes from the vocabulary (engines.step_budget)

    def gb_per_gpu(k: int) -> float:  # the comment's terms: states, kept layer inputs, one layer, the head chunk
        tokens = 2 * prep.max_length / k  # a packed row of both sequences, split k ways
        states = 16 * 8.03e9 / train.workers.count
        kept = 32 * tokens * 4096 * 4
        layer = 3e9 * tokens / 16_384  # ~3 GB at 16,384 tokens a GPU, proportional to them
        return (states + kept + layer + 1.5e9) / 1e9

    assert gb_per_gpu(4) == pytest.approx(29, abs=1) and gb_per_gpu(1) > 60


def test_there_is_a_gpu_config_for_a_real_model():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("llama3-8b.yaml")])
    assert cfg.run_dir.startswith("s3://")  # object storage: no shared disk assumed
    assert cfg.train is not None and cfg.train.workers.parallelism == "fsdp" and cfg.train.workers.use_gpu
    assert cfg.reference is not None and cfg.reference.tensor_parallel_size > 1
    assert cfg.reference.num_gpus_per_actor >= cfg.reference.tensor_parallel_size


@pytest.mark.parametrize("config", gpu_configs(), ids=lambda p: p.name)
@pytest.mark.parametrize("cluster", list(cluster_nodes()))
def test_config_requests_exist_in_cluster(config, cluster):
    assert unsatisfied(requests(load_config(config)), cluster_nodes()[cluster]) == []


def test_the_resource_check_can_fail():
    nodes = cluster_nodes()["aws.yaml"]
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("llama3-8b.yaml")])
    assert cfg.reference is not None and cfg.train is not None
    wrong_card = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"accelerator_type": "A100"})})
    assert unsatisfied(requests(wrong_card), nodes) == [
        "reference: no node type offers {'CPU': 8.0, 'GPU': 2.0, 'accelerator_type:A100': 0.001}"
    ]
    workers = cfg.train.workers.model_copy(update={"count": 32})
    too_many = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": workers, "batch_size": 64})})
    assert "train: 32 x" in unsatisfied(requests(too_many), nodes)[0]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_files(path):
    import jsonschema
    import ray

    cluster = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # Ray's own cluster-launcher schema
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}  # the head runs no stage work
    workers = {n: t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]}
    assert {"cpu-worker", "gpu-inference", "gpu-train"} <= set(workers)
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())  # scale to zero
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]  # token authentication on every node
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in path.read_text()
    match = IMAGE_RE.search(cluster["docker"]["image"])
    assert match and match.group(1) == ray.__version__  # the image pins the Ray the code is tested with


def test_kuberay_files():
    import ray

    cluster = yaml.safe_load((CLUSTERS / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTERS / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == (
        "ray.io/v1",
        "RayCluster",
        "ray.io/v1",
        "RayJob",
    )
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group["rayStartParams"]
        assert str(limits["cpu"]) == params["num-cpus"]  # Ray advertises what the pod really has
        assert str(limits.get("nvidia.com/gpu", "0")) == params.get("num-gpus", "0")
    images = [c["image"] for g in [head, *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]]
    assert all((m := IMAGE_RE.search(i)) and m.group(1) == ray.__version__ for i in images)
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["dpo-ray", "run"]
    config = entry[entry.index("--config") + 1].removeprefix("/home/ray/dpo-ray/")
    load_config(ROOT / config)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())["env_vars"]


def test_runtime_env_and_dockerfile():
    import ray
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the keys and their types
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    docker = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in docker and "'.[gpu,lora]'" in docker
