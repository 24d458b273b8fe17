"""The lifecycle every stage shares: begin (skip / resume / fresh) → compute → finish.

- begin(kind, cfg, upstream, output): when `output` is already a complete artifact for this stage config
  and these upstream identities, the stage is skipped (its manifest is returned). Otherwise a Build: a
  fresh output directory, or — for a resumable stage whose interrupted run had the same config and
  upstream (a `.progress.json` stamp says so) — the shards already written, kept.
- finish(build, ...): checks `rows_in == rows_out + rows_rejected` when the stage accounts rows, then writes
  the manifest last (an artifact without one is incomplete) and returns it.

This is the one place that answers "does this output already match this config and these inputs?".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dpo_ray import artifacts
from dpo_ray.artifacts import Manifest, ShardInfo

__all__ = ["Build", "begin", "finish"]

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

    also_clear: further outputs of the stage (e.g. generate's generations) rewritten with it."""
    config = cfg.model_dump(mode="json")
    stage = type(cfg).__name__.removesuffix("Config").lower()
    existing = artifacts.complete_manifest(output, config, upstream)
    if existing is not None:
        print(f"{stage}: {output} is complete for this config and these inputs; skipped", flush=True)
        return existing
    for uri in also_clear:
        artifacts.remove_artifact(uri)
    if resumable and _same_identity(output, config, upstream):
        return Build(kind, output, config, upstream, resumed=True)
    artifacts.remove_artifact(output)  # an incomplete or outdated artifact is rewritten whole
    if resumable:
        fs, path = artifacts.artifact_fs(output)
        fs.makedirs(path, exist_ok=True)
        with fs.open(artifacts.join(path, _PROGRESS), "w") as f:
            json.dump({"config": config, "upstream": upstream}, f)
    return Build(kind, output, config, upstream, resumed=False)


def _same_identity(output: str, config: dict[str, Any], upstream: dict[str, str]) -> bool:
    """An interrupted run of the same config and upstream left this output: keep its shards (temporary
    files of unfinished shards are removed)."""
    fs, path = artifacts.artifact_fs(output)
    progress = artifacts.join(path, _PROGRESS)
    if not fs.exists(progress):
        return False
    with fs.open(progress, "r") as f:
        if json.load(f) != json.loads(json.dumps({"config": config, "upstream": upstream})):
            return False
    for tmp in fs.glob(artifacts.join(path, "**", ".tmp-*")):
        fs.rm(tmp)
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
