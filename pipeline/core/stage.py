"""The lifecycle every stage shares: begin (skip / resume / fresh) → compute → finish.

- begin(kind, cfg, upstream, output): when `output` is already a complete artifact for this stage config
  and these upstream identities, the stage is skipped (its manifest is returned). Otherwise a Build: a
  fresh output directory, or — for a resumable stage whose interrupted run had the same config and
  upstream (a `_progress.json` stamp says so) — the shards already written, kept.
- finish(build, ...): checks `rows_in == rows_out + rows_rejected` when the stage accounts rows, then writes
  the manifest last (an artifact without one is incomplete) and returns it.

This is the one place that answers "does this output already match this config and these inputs?".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import Manifest, ShardInfo
from pipeline.core import console

__all__ = ["LAYOUT_KEYS", "REPORTING_KEYS", "Build", "begin", "claim", "finish", "identity", "stamp", "stamped"]

_PROGRESS = "_progress.json"


@dataclass(frozen=True)
class Build:
    """An output being built: its kind, URI, the stage's resolved config and upstream identities, and
    whether shards of an interrupted run with the same identity were kept (resumed)."""

    kind: str
    output: str
    config: dict[str, Any]
    upstream: dict[str, str]
    resumed: bool


def begin(
    kind: str,
    cfg: BaseModel,
    upstream: dict[str, str],
    output: str,
    *,
    resumable: bool = False,
    also_clear: tuple[str, ...] = (),
) -> Manifest | Build:
    """The complete manifest of `output` (skip), or a Build to compute (see the module docstring).

    also_clear: further outputs of the stage (e.g. generate's generations), rewritten with it and kept with it
    on a resume."""
    config = identity(cfg)
    stage = type(cfg).__name__.removesuffix("Config").lower()
    existing = artifacts.complete_manifest(output, config, upstream) or _recorded_complete(output, config, upstream)
    if existing is not None:
        console.result(f"{stage}: {output} is complete for this config and these inputs; skipped")
        return existing
    if resumable and _same_identity(output, config, upstream, also_clear):
        return Build(kind, output, config, upstream, resumed=True)
    for uri in also_clear:
        artifacts.remove_artifact(uri)
    artifacts.remove_artifact(output)  # an incomplete or outdated artifact is rewritten whole
    if resumable:
        stamp(output, config, upstream)
    return Build(kind, output, config, upstream, resumed=False)


# Keys that say where and how a stage reports or watches, not what it computes: changing them never redoes work
# (train.health: a guard that warned or stopped does not change the numbers computed before it).
REPORTING_KEYS = frozenset({"tracking", "health"})
# Keys that spread the same computation over the workers in another way (equal to float32 rounding, tested
# against one process): a run's checkpoints resume under another value, and its export counts as done.
# train.sequence_parallel: a run checkpointed with k = 2 resumes with k = 1 (tests/integration/test_train.py).
LAYOUT_KEYS = frozenset({"sequence_parallel"})


def identity(cfg: BaseModel) -> dict[str, Any]:
    """The stage config as its artifact's identity: the resolved config without the REPORTING_KEYS and
    LAYOUT_KEYS."""
    return _without_reporting(cfg.model_dump(mode="json"))


def _without_reporting(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in REPORTING_KEYS | LAYOUT_KEYS}


def recorded_identity(stored: dict[str, Any]) -> dict[str, Any]:
    """An identity as an artifact or stamp recorded it, in the current form (pipeline.config.current_identity:
    work of an older dpo-ray whose config had another layout still counts as the same config's)."""
    from pipeline.config import current_identity

    return json.loads(json.dumps(_without_reporting(current_identity(stored))))


def stamp(directory: str, config: dict[str, Any], upstream: dict[str, str]) -> None:
    """Record in `directory` which config and upstream its partial contents belong to."""
    fs, path = artifacts.artifact_fs(directory)
    fs.makedirs(path, exist_ok=True)
    with fs.open(artifacts.join(path, _PROGRESS), "w") as f:
        json.dump({"config": config, "upstream": upstream}, f)


def _stamp_of(directory: str) -> dict[str, Any] | None:
    fs, path = artifacts.artifact_fs(directory)
    progress = artifacts.join(path, _PROGRESS)
    if not fs.exists(progress):
        return None
    with fs.open(progress, "r") as f:
        return dict(json.load(f))


def stamped(directory: str, config: dict[str, Any], upstream: dict[str, str]) -> bool | None:
    """Whether `directory`'s stamp is this config and upstream; None when it has no stamp."""
    found = _stamp_of(directory)
    if found is None:
        return None
    found = {**found, "config": recorded_identity(found.get("config", {}))}
    return bool(found == json.loads(json.dumps({"config": config, "upstream": upstream})))


def claim(directory: str, config: dict[str, Any], upstream: dict[str, str], what: str, fix: str) -> None:
    """`directory` (e.g. a training run's checkpoints) holds the work of one config and upstream: stamp it; when the
    work there is of this config but older inputs (a retrained model, new pairs: the stage is being redone), remove
    it first and say so; refuse with ArtifactError when another config's stamp is there (another run's work)."""
    found = _stamp_of(directory)
    if found is not None:
        found = {**found, "config": recorded_identity(found.get("config", {}))}
    current = json.loads(json.dumps({"config": config, "upstream": upstream}))
    if found == current:
        stamp(directory, config, upstream)  # in the current form
        return
    if found is not None and found.get("config") != current["config"]:
        raise artifacts.ArtifactError(f"{directory} holds {what} of a run with another config; {fix}")
    if found is not None:
        changed = sorted(
            k for k in set(found.get("upstream", {})) | set(upstream) if found["upstream"].get(k) != upstream.get(k)
        )
        console.result(f"{directory}: {what} of this config from older inputs ({', '.join(changed)} changed); removed")
        artifacts.remove_artifact(directory)
    stamp(directory, config, upstream)


def _recorded_complete(output: str, config: dict[str, Any], upstream: dict[str, str]) -> Manifest | None:
    """A complete artifact whose recorded config is this one in an older layout (recorded_identity)."""
    found = artifacts.read_manifest(output)
    if found is None or found.config == config or recorded_identity(found.config) != json.loads(json.dumps(config)):
        return None
    return artifacts.complete_manifest(output, found.config, upstream)


def _same_identity(output: str, config: dict[str, Any], upstream: dict[str, str], also: tuple[str, ...]) -> bool:
    """An interrupted run of the same config and upstream left this output: keep its shards (temporary
    files of unfinished shards are removed)."""
    if not stamped(output, config, upstream):
        return False
    for uri in (output, *also):
        ofs, opath = artifacts.artifact_fs(uri)
        for tmp in ofs.glob(artifacts.join(opath, "**", ".tmp-*")):
            ofs.rm(tmp)
    return True


def finish(
    build: Build,
    fingerprints: dict[str, str],
    stats: dict[str, Any],
    *,
    accounting: tuple[int, int, int] | None = None,
    shards: list[ShardInfo] | None = None,
) -> Manifest:
    """Check the row accounting (rows_in, rows_out, rows_rejected), then write the manifest (last)."""
    if accounting is not None:
        rows_in, rows_out, rows_rejected = accounting
        if rows_in != rows_out + rows_rejected:
            raise RuntimeError(
                f"{build.kind}: row accounting failed: {rows_in} in != {rows_out} out + {rows_rejected} rejected"
            )
        stats = {"rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rows_rejected, **stats}
    return artifacts.write_manifest(build.output, build.kind, build.config, fingerprints, build.upstream, stats, shards)
