"""Read experiment-tracking records back with each library's own reader (nothing needs a network):
TensorBoard's EventAccumulator, MLflow's MlflowClient on a file store, and W&B's offline transaction log
(`run-<id>.wandb`) decoded into W&B's own protobuf `Record` messages."""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Any


def tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_tags(logdir: str) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {k: list(v) for k, v in acc.Tags().items() if isinstance(v, list)}


def mlflow_run(tracking_uri: str, experiment: str, key: str) -> dict[str, Any]:
    """{run_id, params, tags, metrics: {name: [(step, value)]}, artifacts: [paths]} of the run tagged `key`."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {tracking_uri}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`dpo_ray.key` = '{key}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs tagged {key!r}"
    run = runs[0]
    metrics = {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        for name in run.data.metrics
    }

    def listing(path: str | None = None) -> list[str]:
        out = []
        for f in client.list_artifacts(run.info.run_id, path):
            out += listing(f.path) if f.is_dir else [f.path]
        return out

    return {
        "run_id": run.info.run_id,
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": metrics,
        "artifacts": listing(),
    }


def _wandb_records(path: str) -> list[Any]:
    """W&B's offline log: a 7-byte header (':W&B', magic, version), then LevelDB-log framing (32 KiB blocks,
    7-byte record headers: crc, length, type FULL/FIRST/MIDDLE/LAST), each record a wandb Record message."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_offline(directory: str, run_id: str) -> dict[str, Any]:
    """{config, history: {name: [(step, value)]}, summary: {name: value}} of every offline run directory of
    `run_id` under `directory` (a resumed run adds a directory)."""
    # offline-run-<time>-<id>, with "-1", "-2", ... appended when a resumed run starts in the same second
    files = sorted(
        glob.glob(os.path.join(directory, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
        + glob.glob(os.path.join(directory, "wandb", f"offline-run-*-{run_id}-*", f"run-{run_id}.wandb")),
        key=lambda f: (os.path.basename(os.path.dirname(f)).removeprefix("offline-run-")[:15], len(f), f),
    )
    assert files, f"no offline W&B run {run_id} under {directory}/wandb"
    config: dict[str, Any] = {}
    history: dict[str, list[tuple[int, Any]]] = {}
    summary: dict[str, Any] = {}
    for path in files:
        deadline = time.monotonic() + 60  # W&B's core process may still be writing the log after finish()
        records = _wandb_records(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in records):
            assert time.monotonic() < deadline, f"{path} has no exit record: the run did not finish"
            time.sleep(0.2)
            records = _wandb_records(path)
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind in ("run", "config"):
                items = r.run.config.update if kind == "run" else r.config.update
                for item in items:
                    name = item.key or "/".join(item.nested_key)
                    config[name] = json.loads(item.value_json)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                step = int(row.get("_step", r.history.step.num))
                for name, value in row.items():
                    if not name.startswith("_"):
                        history.setdefault(name, []).append((step, value))
            elif kind == "summary":
                for item in r.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"config": config, "history": history, "summary": summary}
