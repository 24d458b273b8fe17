"""A real job submission: `ray start --head` on 127.0.0.1 with token authentication, the reduced demo
submitted through the Jobs API
with clusters/runtime_env.yaml and the checkout as working_dir; a job stopped midway (`stop_job`) and
resubmitted completes, and a further submission of the same run is a no-op (every stage skipped)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def head_process(gcs: int, dash: int, env: dict[str, str], log_path: Path, extra: list[str]) -> Iterator[None]:
    """`ray start --head --block` on 127.0.0.1 (GCS port `gcs`, dashboard/job server `dash`), ready once the
    dashboard port listens; stopped after (SIGTERM to its process group, then SIGKILL). Every fixed default port
    gets a free one: the session's own local Ray already holds e.g. 52365 (the dashboard agent), and a head whose
    agent cannot bind accepts no jobs."""
    cmd = [
        RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", *extra,
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    log = log_path.open("w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # A ceiling for a hung head, not a measure of speed: `ray start` opens the port in 5-15 s on a
        # 2-core machine (more under load); the loop returns as soon as the port is open.
        deadline = time.monotonic() + 180
        while not listening_addresses(dash):
            assert head.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not open its dashboard port in 180 s"
            time.sleep(0.5)
        yield
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A Ray head bound to 127.0.0.1 (GCS and dashboard/job server on free loopback ports) with token
    authentication, stopped after. The token is Ray's default one (~/.ray/auth_token, generated when
    missing): Ray caches the token per process, and this test process may already hold that one."""
    gcs, dash = free_port(), free_port()
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # --block: this process owns the cluster and stopping it stops exactly that cluster (`ray stop` would
    # also kill the test session's own local Ray).
    with head_process(gcs, dash, env, tmp_path / "ray-head.log", ["--num-cpus=2"]):
        yield f"http://127.0.0.1:{dash}", gcs, dash


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP listener on `port` (from /proc/net/tcp; IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


_CLIENTS: dict = {}


def _client_call(address: str, method: str, *args, **kwargs):
    """Runs in the helper process: one JobSubmissionClient method call; statuses as plain strings."""
    from ray.job_submission import JobSubmissionClient

    client = _CLIENTS.setdefault(address, JobSubmissionClient(address))
    result = getattr(client, method)(*args, **kwargs)
    return str(result.value) if hasattr(result, "value") else result


class JobClient:
    """JobSubmissionClient in a fresh (spawned) helper process. Ray caches its auth token per process,
    and this test process may already hold the token of the session's own local Ray, or none."""

    def __init__(self, address: str) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.address = address
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def __getattr__(self, method: str):
        return lambda *a, **k: self.pool.submit(_client_call, self.address, method, *a, **k).result()

    def close(self) -> None:
        self.pool.shutdown()


def submit(client, **kwargs) -> str:
    """submit_job, retried while the head's job agent is still starting ("No available agent"): the job server
    waits 10 s for the agent per request and creates no job when it refuses, so a retry is safe. The 120 s
    ceiling only ends a head whose agent never starts; a started agent ends the loop at once."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return str(client.submit_job(**kwargs))
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait(client, job_id: str, timeout: float = 600) -> str:
    """The job's terminal status. The timeout is a ceiling for a hung job (the reduced pipeline below takes
    about a minute here); a job that ends returns at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return str(status)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {client.get_job_status(job_id)} after {timeout}s")


@pytest.fixture
def job_client(ray_head):
    client = JobClient(ray_head[0])
    yield client
    client.close()


def test_submit_stop_resubmit_and_noop(ray_head, job_client, tmp_path):
    address, gcs_port, dash_port = ray_head
    client = job_client
    assert listening_addresses(dash_port) == {"127.0.0.1"}  # the job server is not reachable from outside
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:  # and needs the token
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    d = tmp_path / "run"
    cfg = {
        "run_dir": str(d),
        "demo": {"assets": str(d / "assets"), "pairs": 120},
        "prepare": {
            "inputs": [str(d / "assets" / "pairs.jsonl")],
            "tokenizer": str(d / "assets" / "model"),
            "max_length": 96,
            "max_prompt_length": 48,
            "eval_fraction": 0.1,
        },
        "reference": {"model": str(d / "assets" / "model"), "backend": "hf"},
        "train": {
            "model": str(d / "assets" / "model"),
            "workers": {"count": 1},
            "batch_size": 8,
            "max_steps": 6,
            "optim": {"lr": 1e-3},
        },
    }
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(cfg))
    runtime_env = yaml.safe_load((ROOT / "clusters" / "runtime_env.yaml").read_text()) | {"working_dir": str(ROOT)}
    entrypoint = f"{sys.executable} -m pipeline run --config {config}"

    # 1. Submit, and stop the job once prepare has finished (a stage boundary) but before train is done.
    first = submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    # Prepare's manifest is its last write; the job is polled every 0.5 s and stopped at once, while
    # generate/reference/train (tens of seconds here) still run. 300 s: a ceiling for a job that never starts.
    deadline = time.monotonic() + 300
    while not (d / "pairs" / "manifest.json").exists():
        assert time.monotonic() < deadline and client.get_job_status(first) in ("PENDING", "RUNNING"), (
            client.get_job_logs(first)[-3000:]
        )
        time.sleep(0.5)
    client.stop_job(first)
    assert wait(client, first) == "STOPPED"
    assert not (d / "export" / "manifest.json").exists()

    # 2. Resubmit: it completes, reusing the finished prepare.
    second = submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    assert wait(client, second) == "SUCCEEDED", client.get_job_logs(second)[-3000:]
    logs = client.get_job_logs(second)
    assert "prepare: " in logs and "is complete for this config and these inputs; skipped" in logs
    for artifact in ("pairs", "scored", "export"):
        assert (d / artifact / "manifest.json").exists(), artifact
    export = json.loads((d / "export" / "manifest.json").read_text())
    assert export["stats"]["steps"] == 6

    # 3. The same submission again: a no-op, every stage skipped, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in d.glob("*/manifest.json")}
    third = submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    assert wait(client, third) == "SUCCEEDED", client.get_job_logs(third)[-3000:]
    assert client.get_job_logs(third).count("skipped") == 3
    assert {p: p.stat().st_mtime_ns for p in d.glob("*/manifest.json")} == before
