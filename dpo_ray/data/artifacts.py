"""Artifact directories: `part-*.parquet` shards plus `manifest.json`, written last.

An artifact without a manifest is incomplete. A complete artifact whose recorded config and upstream
manifest hashes equal the ones a stage would use is reused instead of recomputed. Paths are local
directories or any fsspec URI (`s3://bucket/run/pairs`); nothing assumes a shared POSIX disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray import __version__
from dpo_ray.data.schema import SCHEMA_VERSION
from dpo_ray.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "ArtifactError",
    "DamagedManifest",
    "StorageError",
    "require_complete",
    "write_table",
    "Manifest",
    "ShardInfo",
    "artifact_fs",
    "check_shard_schemas",
    "complete_manifest",
    "is_complete",
    "join",
    "list_shards",
    "manifest_sha256",
    "read_manifest",
    "read_columns",
    "read_shard",
    "remove_artifact",
    "shard_infos",
    "verify_shards",
    "write_manifest",
]

MANIFEST = "manifest.json"
# Rows per Parquet row group of the shards write_table writes: shard_infos verifies a shard one row group at a
# time, so its memory is one row group's (a few tens of MB of HH-shaped rows), whatever the shard's size.
ROW_GROUP_ROWS = 8192


class ArtifactError(UserError, ValueError):
    """An input artifact is missing, incomplete, of the wrong kind, or incompatible; the message says which."""


class DamagedManifest(ArtifactError):
    """A manifest.json that does not parse or does not fit the manifest schema."""


class StorageError(ArtifactError):
    """The storage behind a URI cannot be reached or refuses access (endpoint, credentials, permissions)."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class Manifest:
    """An artifact's manifest.json, written after its last shard (its presence marks the artifact complete).

    - kind: pairs, scored, rejects or generations (dpo_ray.data.schema.KINDS); a train stage's export has kind model.
    - schema_version: dpo_ray.data.schema.SCHEMA_VERSION of the writer.
    - rows: rows over all shards.
    - shards: each Parquet file's name, rows, sha256 and size in bytes.
    - config: the stage's resolved config (without its tracking section), part of the artifact's identity.
    - fingerprints: the model and tokenizer the artifact was made with (what later stages must match).
    - upstream: the identity of everything the stage read (upstream manifests, models, files; pipeline.core.inputs):
      a rerun skips the stage only when config and upstream are what it would read now.
    - stats: the stage's counts and measurements (rejects by reason, parity numbers, final metrics, ...).
    - created_by: the dpo-ray version and git commit; created_at: UTC time written.
    """

    kind: str
    schema_version: int
    rows: int
    shards: list[ShardInfo]
    config: dict[str, Any]
    fingerprints: dict[str, str]
    upstream: dict[str, str]
    stats: dict[str, Any]
    created_by: dict[str, str | None] = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest from its JSON; TypeError/KeyError when it does not match this schema."""
        shards = [ShardInfo(**s) for s in data["shards"]]
        return cls(**{**data, "shards": shards})


def artifact_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of an artifact URI or local directory.

    Listings are never served from fsspec's cache: on object stores other processes (the actors, other
    nodes) write the shards, and a cached listing would hide them."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    fs.invalidate_cache()
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def list_shards(uri: str, pattern: str = "part-*.parquet") -> list[str]:
    """Shard file names (not paths) under an artifact directory, sorted."""
    fs, path = artifact_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(Path(p).name for p in fs.glob(join(path, pattern)))


def _sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    """(sha256, size in bytes) of a file, streamed."""
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _parquet(data: bytes, where: str, columns: list[str] | None = None) -> pa.Table:
    """A shard's table with every page checksum verified; ArtifactError naming the shard when it is damaged."""
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{where}: not a readable Parquet shard ({e}); {_FIX}") from None


_FIX = "the artifact is damaged: rerun the stage that produced it"


def shard_infos(uri: str, pattern: str = "part-*.parquet") -> list[ShardInfo]:
    """Name, row count, sha256 and size of every shard, each read whole with its page checksums verified (a
    shard kept from an interrupted run, or a partial upload, is checked before a manifest vouches for it). The
    read streams: the sha256 over 1 MiB reads, the pages one row group at a time (at most ROW_GROUP_ROWS rows of
    the shards write_table writes), so the memory does not grow with the shard."""
    fs, path = artifact_fs(uri)
    infos = []
    for name in list_shards(uri, pattern):
        full = join(path, name)
        sha, size = _sha256_file(fs, full)
        infos.append(ShardInfo(name, _verified_rows(fs, full, f"{uri}/{name}"), sha, size))
    return infos


def _verified_rows(fs: fsspec.AbstractFileSystem, path: str, where: str) -> int:
    """The row count of a Parquet file whose every page checksum was verified, read one row group at a time;
    ArtifactError naming the shard when it is damaged."""
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            rows = 0
            for group in range(pf.num_row_groups):
                rows += pf.read_row_group(group).num_rows
            if rows != pf.metadata.num_rows:
                raise pa.ArrowInvalid(f"row groups hold {rows} rows, the footer says {pf.metadata.num_rows}")
            return rows
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{where}: not a readable Parquet shard ({e}); {_FIX}") from None


def verify_shards(uri: str, manifest: Manifest) -> None:
    """Every shard the manifest lists is there with its recorded size and sha256 (a streamed read of each);
    ArtifactError naming the shard, the expected and the found value otherwise."""
    fs, path = artifact_fs(uri)
    for shard in manifest.shards:
        full = join(path, shard.file)
        if not fs.exists(full):
            raise ArtifactError(f"{uri}/{shard.file}: listed in the manifest but missing; {_FIX}")
        size = fs.size(full)
        if size != shard.size:
            raise ArtifactError(f"{uri}/{shard.file}: size expected {shard.size} bytes, found {size}; {_FIX}")
        sha, _ = _sha256_file(fs, full)
        if sha != shard.sha256:
            raise ArtifactError(f"{uri}/{shard.file}: sha256 expected {shard.sha256}, found {sha}; {_FIX}")


def read_shard(uri: str, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
    """One shard of a complete artifact, verified as it is read: size and sha256 against the manifest, then
    every Parquet page checksum."""
    fs, path = artifact_fs(uri)
    data = fs.cat_file(join(path, shard.file))
    where = f"{uri}/{shard.file}"
    if len(data) != shard.size:
        raise ArtifactError(f"{where}: size expected {shard.size} bytes, found {len(data)}; {_FIX}")
    sha = hashlib.sha256(data).hexdigest()
    if sha != shard.sha256:
        raise ArtifactError(f"{where}: sha256 expected {shard.sha256}, found {sha}; {_FIX}")
    return _parquet(data, where, columns)


def read_columns(uri: str, shard: ShardInfo, columns: list[str]) -> pa.Table:
    """A few columns of one shard of an artifact whose shards were verified whole (require_complete): its size
    against the manifest, then only those columns' pages fetched (ranged reads), each page checksum verified. What
    a driver reads to count rows, without fetching the artifact a second time."""
    fs, path = artifact_fs(uri)
    full, where = join(path, shard.file), f"{uri}/{shard.file}"
    size = fs.size(full)
    if size != shard.size:
        raise ArtifactError(f"{where}: size expected {shard.size} bytes, found {size}; {_FIX}")
    try:
        # No read-ahead: an object store's file would otherwise fetch a whole block (s3fs: 50 MB) past each read.
        with fs.open(full, "rb", cache_type="none") as f:
            return pq.ParquetFile(f, page_checksum_verification=True).read(columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{where}: not a readable Parquet shard ({e}); {_FIX}") from None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_manifest(
    uri: str,
    kind: str,
    config: dict[str, Any],
    fingerprints: dict[str, str],
    upstream: dict[str, str],
    stats: dict[str, Any],
    shards: list[ShardInfo] | None = None,
) -> Manifest:
    """Record the shards present (or `shards`) and write manifest.json last, atomically where possible."""
    shards = shard_infos(uri) if shards is None else shards
    manifest = Manifest(
        kind=kind,
        schema_version=SCHEMA_VERSION,
        rows=sum(s.rows for s in shards),
        shards=shards,
        config=json.loads(json.dumps(config)),
        fingerprints=fingerprints,
        upstream=upstream,
        stats=stats,
        created_by={"package": __version__, "git_sha": _git_sha()},
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    fs, path = artifact_fs(uri)
    fs.makedirs(path, exist_ok=True)
    tmp = join(path, MANIFEST + ".tmp")
    with fs.open(tmp, "w") as f:
        f.write(manifest.to_json())
    fs.mv(tmp, join(path, MANIFEST))
    return manifest


def read_manifest(uri: str) -> Manifest | None:
    """The artifact's manifest, or None when it has none (incomplete or absent); ArtifactError naming the file
    when it does not parse or does not match the manifest schema."""
    fs, path = artifact_fs(uri)
    target = join(path, MANIFEST)
    try:
        if not fs.exists(target):
            return None
        with fs.open(target, "r") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except Exception as e:  # botocore / gcsfs / OS errors: name the URI, not a library traceback
        raise StorageError(
            f"{uri}: cannot read {MANIFEST} from the storage ({type(e).__name__}: {e}); check the endpoint "
            "(e.g. AWS_ENDPOINT_URL), the credentials and the permissions for this URI"
        ) from None
    try:
        return Manifest.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as e:
        raise DamagedManifest(f"{uri}/{MANIFEST}: not a valid manifest ({type(e).__name__}: {e}); {_FIX}") from None


def manifest_sha256(uri: str) -> str:
    """The artifact's identity, how downstream artifacts name their inputs: sha256 of its manifest's kind,
    schema version, rows, shards (each with its content sha256), config, fingerprints and upstream.

    Timestamps and run statistics are left out, so an artifact rewritten with the same content (e.g. a
    resumed stage) keeps its identity and downstream artifacts stay valid.
    """
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"{uri}: no {MANIFEST}; the artifact is incomplete (rerun the stage that writes it)")
    data = asdict(manifest)
    identity = {k: data[k] for k in ("kind", "schema_version", "rows", "shards", "config", "fingerprints", "upstream")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def is_complete(uri: str, config: dict[str, Any], upstream: dict[str, str]) -> bool:
    """True when the artifact has a manifest with this config and upstream, and all its shards exist (a damaged
    manifest of a stage's own output means incomplete: the stage rewrites it)."""
    try:
        manifest = read_manifest(uri)
    except DamagedManifest as e:
        logger.warning("%s", e)
        return False
    if manifest is None or manifest.schema_version != SCHEMA_VERSION:
        return False
    if manifest.config != json.loads(json.dumps(config)) or manifest.upstream != upstream:
        return False
    present = set(list_shards(uri, "*.parquet"))
    return all(s.file in present for s in manifest.shards)


def complete_manifest(uri: str, config: dict[str, Any], upstream: dict[str, str]) -> Manifest | None:
    """The manifest of `uri` when it is complete for this config and upstream (the stage can be skipped)."""
    return read_manifest(uri) if is_complete(uri, config, upstream) else None


def remove_artifact(uri: str) -> None:
    """Delete an artifact directory and everything under it (used before rewriting an incomplete one)."""
    fs, path = artifact_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def require_complete(uri: str, kind: str | tuple[str, ...], hint: str = "") -> Manifest:
    """The manifest of a complete artifact of `kind` (or of one of several kinds), or ArtifactError saying what
    is wrong and what to run (`hint` is added when the kind is wrong)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    wanted = " or ".join(repr(k) for k in kinds)
    manifest = read_manifest(uri)
    if manifest is None:
        fs, path = artifact_fs(uri)
        state = "is incomplete (no manifest.json)" if fs.exists(path) else "does not exist"
        raise ArtifactError(f"{uri} {state}: run the stage that writes the {wanted} artifact first")
    if manifest.kind not in kinds:
        raise ArtifactError(f"{uri}: expected a {wanted} artifact, found {manifest.kind!r}{hint}")
    if manifest.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{uri}: schema_version {manifest.schema_version}, this dpo-ray reads {SCHEMA_VERSION}; rerun that stage"
        )
    verify_shards(uri, manifest)
    return manifest


def check_shard_schemas(uri: str, schema: pa.Schema) -> None:
    """Every shard of `uri` must carry `schema`'s columns with their exact types (no tensor extension types)."""
    from dpo_ray.data.schema import check_columns

    fs, path = artifact_fs(uri)
    for name in list_shards(uri):
        with fs.open(join(path, name), "rb") as f:
            check_columns(pq.read_schema(f), schema, f"{uri}/{name}")


def write_table(table: pa.Table, uri: str, name: str) -> None:
    """Write one Parquet shard atomically: a temporary name first, then a rename (a put on object stores)."""
    fs, path = artifact_fs(uri)
    fs.makedirs(path, exist_ok=True)
    tmp = join(path, f".tmp-{name}")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)
    fs.mv(tmp, join(path, name))
