"""What a train worker group fetches from object storage when it restarts after a fault, counted by the S3 server.

An S3 server (moto, server mode, on 127.0.0.1, as the cluster test's) behind a counter of the bytes of every GET;
a synthetic `scored` artifact of HH shape (benchmarks/scale.py's, `--rows-per-shard` pairs a shard) uploaded to
it; the train stage on an embedded Ray with `--workers` gloo workers, its checkpoints and metrics on the same
server, a checkpoint every 3 steps and rank 0's process exiting at step 4 (dpo_ray.testing.faults.fail): Ray Train
restarts the whole worker group from the step-3 checkpoint. The bytes of the artifact's shards fetched before the
fault (the first start) and after it (the restart) are printed, with the checkpoint bytes fetched at the restart.

"before" runs another checkout's code: `--code DIR` (its train stage and workers import from DIR; e.g. a checkout
of 7591384, the commit before dpo_ray.train.rows, where every worker read every shard).

    .venv/bin/python benchmarks/restart_fetch.py [--pairs 40000] [--rows-per-shard 5000] [--workers 2]
        [--worker-cpus 1] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUCKET = "scale"


class _Counted:
    """A WSGI middleware: (time, method, path, bytes of the response body) of every request."""

    def __init__(self, app: Any) -> None:
        self.app, self.log, self.lock = app, [], threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        body: Iterable[bytes] = self.app(environ, start_response)
        size = 0
        try:
            for chunk in body:
                size += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            with self.lock:
                self.log.append((time.monotonic(), method, path, size))


def _server() -> tuple[_Counted, Any, str]:
    from moto.moto_server.threaded_moto_server import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
        make_server,
    )

    app = _Counted(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return app, server, f"http://{host}:{port}"


def child(scored: str, model: str, work: str, run: str, workers: int, cpus: float) -> None:
    """The train stage (imported from whatever code PYTHONPATH names first)."""
    from pipeline.config import TrainConfig
    from pipeline.stages import train

    cfg = TrainConfig.model_validate({
        "model": model, "scored": scored, "output": f"{run}/train", "export": f"{work}/export",
        "max_steps": 6, "batch_size": 32, "workers": {"count": workers, "max_failures": 2, "resources": {"CPU": cpus}},
        "checkpoint": {"storage_path": f"{run}/checkpoints", "every": 3},
    })  # fmt: skip
    train.run(cfg)
    print("RESULT " + json.dumps({"code": train.__file__}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=40_000)
    ap.add_argument("--rows-per-shard", type=int, default=5_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs a worker asks Ray for (4 workers here: 0.5)")
    ap.add_argument("--code", default="", help="run another checkout's train stage (PYTHONPATH and cwd)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        scored, model, work, run, workers, cpus = args.child
        child(scored, model, work, run, int(workers), float(cpus))
        return
    sys.path.insert(0, str(HERE))
    import s3fs
    from hh_llama import build_hh_llama, hh_records
    from scale import build_artifact

    from dpo_ray.models.loading import load_tokenizer, tokenizer_fingerprint

    app, server, endpoint = _server()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_hh_llama(Path(tmp) / "model", hh_records(), hidden=64, layers=1))
        local = f"{tmp}/scored"
        build_artifact(local, args.pairs, "scored", tokenizer_fingerprint(load_tokenizer(model)), args.rows_per_shard)
        size = sum(p.stat().st_size for p in Path(local).glob("part-*.parquet"))
        fs.put(local, f"{BUCKET}/scored", recursive=True)
        scored, run = f"s3://{BUCKET}/scored", f"s3://{BUCKET}/run"
        code = str(Path(args.code).resolve()) if args.code else str(HERE.parent)
        child_env = {**os.environ, "PYTHONPATH": code, "DPO_RAY_STEP_HOOK": "dpo_ray.testing.faults:fail:4:0"}
        child_env.pop("RAY_ADDRESS", None)
        start = len(app.log)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", scored, model, f"{tmp}/work", run, str(args.workers),
             str(args.worker_cpus)],
            cwd=code, env=child_env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"train: exit {done.returncode}\n{done.stderr[-4000:]}")
        log = app.log[start:]
        server.shutdown()
    faults = [t for t, method, path, _ in log if method == "PUT" and ".fault-injected" in path]
    if not faults:
        raise SystemExit("no fault was injected: the run did not restart")
    fault = faults[0]

    def fetched(prefix: str, after: bool) -> int:
        return sum(
            n for t, method, path, n in log if method == "GET" and path.startswith(prefix) and (t > fault) == after
        )

    shards = f"/{BUCKET}/scored/part-"
    result = {
        "code": json.loads(lines[-1].removeprefix("RESULT "))["code"],
        "pairs": args.pairs,
        "workers": args.workers,
        "shards": -(-args.pairs // args.rows_per_shard),
        "artifact_bytes": size,
        "shard_bytes_first_start": fetched(shards, False),
        "shard_bytes_restart": fetched(shards, True),
        "checkpoint_bytes_restart": fetched(f"/{BUCKET}/run/checkpoints", True),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
