"""Artifacts after a fault: a damaged shard or manifest is refused before any work, naming the file.

Each case damages one artifact the way storage does (bytes zeroed in the middle of a shard, a shard cut
short, a shard replaced by another shard of the same artifact, a truncated manifest, a manifest of another
kind) and checks that every stage consuming that kind refuses it through the CLI: exit status 2, one line
naming the file and the fix (main returns instead of raising: no traceback). A shard whose manifest was
rewritten to vouch for the damaged bytes is still refused by its Parquet page checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import ArtifactError
from dpo_ray.data.schema import PAIRS_SCHEMA, SCORED_SCHEMA
from pipeline.cli.main import main


def _rows(n: int, start: int, scored: bool) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        row = {
            "pair_id": f"{i:016x}",
            "split": "eval" if i % 4 == 0 else "train",
            "prompt_ids": list(range(1, 30)),
            "chosen_ids": [i % 50 + 1] * 20,
            "rejected_ids": [i % 40 + 2] * 25,
            "prompt": f"prompt {i} " * 10,
            "chosen": f"chosen {i} " * 10,
            "rejected": f"rejected {i} " * 10,
            "source": "test",
        }
        if scored:
            row |= {
                "ref_chosen_logps": [-0.5] * 20,
                "ref_rejected_logps": [-0.7] * 25,
                "ref_chosen_logp": -10.0,
                "ref_rejected_logp": -17.5,
            }
        rows.append(row)
    return rows


def _artifact(root: Path, kind: str) -> str:
    uri = str(root / kind)
    schema = SCORED_SCHEMA if kind == "scored" else PAIRS_SCHEMA
    for k in range(3):
        table = pa.Table.from_pylist(_rows(200, 200 * k, kind == "scored"), schema=schema)
        artifacts.write_table(table, uri, f"part-{k:05d}.parquet")
    artifacts.write_manifest(uri, kind, {}, {"tokenizer": "t"}, {}, {})
    return uri


def _zero_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _replace_by_sibling(path: Path) -> None:
    path.write_bytes((path.parent / "part-00000.parquet").read_bytes())


SHARD_FAULTS: dict[str, Callable[[Path], None]] = {
    "zeroed": _zero_middle,
    "truncated": _truncate,
    "replaced": _replace_by_sibling,
}

# stage -> (the CLI overrides that point it at the damaged artifact, the artifact kind it consumes there)
CONSUMERS = {
    "reference": ("pairs", ["reference.model=/nonexistent/model", "reference.pairs={uri}"]),
    "generate": ("pairs", ["generate.policy=/nonexistent/model", "generate.prompts={uri}"]),
    "train": ("scored", ["train.model=/nonexistent/model", "train.scored={uri}"]),
    "evaluate": (
        "scored",
        ["evaluate.reference=/nonexistent/model", "evaluate.scored={uri}", "evaluate.prompts={pairs}"],
    ),
}


def _cli(stage: str, tmp_path: Path, uri: str, pairs: str, capsys) -> tuple[int, str]:
    kind, overrides = CONSUMERS[stage]
    args = [o.format(uri=uri, pairs=pairs) for o in overrides]
    code = main([stage, f"run_dir={tmp_path / 'run'}", *args])
    return code, _error_line(capsys.readouterr().err)


def _error_line(stderr: str) -> str:
    """The CLI's one error line (stderr may also hold log lines that Ray forwards from other processes)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("fault", sorted(SHARD_FAULTS))
@pytest.mark.parametrize("stage", sorted(CONSUMERS))
def test_a_damaged_shard_is_refused_by_every_consumer(stage, fault, tmp_path, capsys):
    kind = CONSUMERS[stage][0]
    uri = _artifact(tmp_path, kind)
    pairs = uri if kind == "pairs" else _artifact(tmp_path, "pairs")
    SHARD_FAULTS[fault](Path(uri) / "part-00001.parquet")
    code, err = _cli(stage, tmp_path, uri, pairs, capsys)
    assert code == 2, err
    assert f"{uri}/part-00001.parquet" in err and "expected" in err and "rerun the stage" in err, err


# Stages that read more than one kind: reference scores pairs or unpaired rows, generate takes prompts from either,
# evaluate reads scored pairs, pairs (a reference-free loss) or scored unpaired rows.
WANTED = {
    "reference": "'pairs' or 'unpaired'",
    "generate": "'pairs' or 'unpaired'",
    "evaluate": "'scored' or 'pairs' or 'scored_unpaired'",
}


@pytest.mark.parametrize("damage", ["truncated", "wrong kind"])
@pytest.mark.parametrize("stage", sorted(CONSUMERS))
def test_a_damaged_manifest_is_refused_by_every_consumer(stage, damage, tmp_path, capsys):
    kind = CONSUMERS[stage][0]
    uri = _artifact(tmp_path, kind)
    pairs = uri if kind == "pairs" else _artifact(tmp_path, "pairs")
    manifest = Path(uri) / "manifest.json"
    if damage == "truncated":
        manifest.write_text(manifest.read_text()[:200])
        expected = f"{uri}/manifest.json: not a valid manifest"
    else:
        manifest.write_text(manifest.read_text().replace(f'"kind": "{kind}"', '"kind": "generations"'))
        wanted = WANTED.get(stage, repr(kind))  # the kinds each stage reads
        expected = f"expected a {wanted} artifact, found 'generations'"
    code, err = _cli(stage, tmp_path, uri, pairs, capsys)
    assert code == 2 and expected in err, err


def test_page_checksums_catch_damage_the_manifest_vouches_for(tmp_path):
    uri = _artifact(tmp_path, "pairs")
    shard = Path(uri) / "part-00002.parquet"
    _zero_middle(shard)
    # Someone recomputed the manifest over the damaged bytes: size and sha256 agree, the pages do not.
    manifest = json.loads((Path(uri) / "manifest.json").read_text())
    data = shard.read_bytes()
    manifest["shards"][2] |= {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (Path(uri) / "manifest.json").write_text(json.dumps(manifest))
    m = artifacts.require_complete(uri, "pairs")
    assert artifacts.read_shard(uri, m.shards[0]).num_rows == 200  # intact shards read
    with pytest.raises(ArtifactError, match=r"part-00002.parquet: not a readable Parquet shard"):
        artifacts.read_shard(uri, m.shards[2])
    # The same damage in a shard kept by an interrupted run is caught before a manifest lists it.
    with pytest.raises(ArtifactError, match=r"part-00002.parquet: not a readable Parquet shard"):
        artifacts.shard_infos(uri)


def test_unreachable_object_storage_names_the_uri(tmp_path, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    code = main(
        ["reference", f"run_dir={tmp_path}", "reference.model=/nonexistent", "reference.pairs=s3://b/run/pairs"]
    )
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and "s3://b/run/pairs: cannot read manifest.json from the storage" in err, err
    assert "AWS_ENDPOINT_URL" in err


@pytest.mark.parametrize(
    "credentials, found",
    [({"AWS_ACCESS_KEY_ID": "unknown", "AWS_SECRET_ACCESS_KEY": "x"}, "PermissionError"), ({}, "NoCredentialsError")],
    ids=["refused", "missing"],
)
def test_unauthenticated_object_storage_names_the_uri(tmp_path, capsys, monkeypatch, credentials, found):
    """An S3 server that checks credentials (moto with authentication on from the first request) refuses an
    unknown key; without any credentials the client refuses to send. Both: exit 2, the URI named."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
            time.sleep(0.2)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in {
            **credentials,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookup (nothing beyond 127.0.0.1)
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
        }.items():
            monkeypatch.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        code = main(
            ["reference", f"run_dir={tmp_path}", "reference.model=/nonexistent", "reference.pairs=s3://b/run/pairs"]
        )
    finally:
        server.kill()
        server.wait()
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and "s3://b/run/pairs: cannot read manifest.json from the storage" in err, err
    assert found in err and "credentials" in err


def test_train_takes_a_pairs_artifact_for_a_reference_free_loss_only(tmp_path, capsys):
    pairs = _artifact(tmp_path, "pairs")
    assert (
        main(["train", f"run_dir={tmp_path / 'run'}", "train.model=/nonexistent/model", f"train.scored={pairs}"]) == 2
    )
    err = _error_line(capsys.readouterr().err)
    assert f"{pairs}: expected a 'scored' artifact, found 'pairs'" in err
    assert "a 'pairs' artifact serves a reference-free loss only: simpo, orpo" in err
    # simpo accepts it: the stage gets past the artifact to the (missing) model
    args = ["train.loss.name=simpo", "train.model=/nonexistent/model", f"train.scored={pairs}"]
    assert main(["train", f"run_dir={tmp_path / 'run'}", *args]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "expected a" not in err and "/nonexistent/model" in err, err
