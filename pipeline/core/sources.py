"""Input files and datasets → a Ray Dataset of raw records, one row per input record.

Rows: `row` (where the record came from: `file:line` for JSONL/CSV, `file[index]` for JSON/Parquet/
datasets), `source` (the file or dataset), `record` (the record as JSON text) and, for records already
known to be bad (not JSON, not UTF-8), `reason` and `detail`. Records stay JSON text until the tokenizer
stage so that heterogeneous, malformed rows pass through Arrow unharmed and can be rejected one by one.

A file that cannot be parsed at all raises InputError naming the file, the line or row, and what was
expected; a bad record inside a good file becomes a reject, never a lost row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["RECORDS_SCHEMA", "InputError", "InputFile", "inputs_fingerprint", "read_records", "resolve_inputs"]

RECORDS_SCHEMA = pa.schema(
    [
        ("row", pa.string()),
        ("source", pa.string()),
        ("record", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
}


class InputError(UserError, ValueError):
    """An input that cannot be read at all; the message names the file and where."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    kind: str  # jsonl | json | parquet | csv | hf_disk | hf_hub


def _kind_of(path: str) -> str | None:
    name = path.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def resolve_inputs(inputs: list[str], input_type: str) -> list[InputFile]:
    """Expand paths, directories and globs (local or fsspec URIs) into typed input files."""
    if input_type == "hf_hub":
        return [InputFile(name, "hf_hub") for name in inputs]
    files: list[InputFile] = []
    for spec in inputs:
        fs, path = fsspec.core.url_to_fs(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
        elif fs.isdir(path):
            if (
                input_type == "hf_disk"
                or fs.exists(f"{path}/dataset_info.json")
                or fs.exists(f"{path}/dataset_dict.json")
            ):
                files.append(InputFile(spec, "hf_disk"))
                continue
            matches = sorted(p for p in fs.find(path) if _kind_of(p))
        elif fs.exists(path):
            matches = [path]
        else:
            raise InputError(f"inputs: {spec!r} does not exist")
        if not matches:
            raise InputError(f"inputs: {spec!r} matches no files")
        for m in matches:
            kind = input_type if input_type != "auto" else _kind_of(m)
            if kind is None:
                raise InputError(
                    f"inputs: cannot tell the format of {m!r} from its extension; set prepare.input_type "
                    f"(one of jsonl, json, parquet, csv) or use one of {sorted(_EXTENSIONS)}"
                )
            files.append(InputFile(prefix + m, kind))
    return files


def inputs_fingerprint(files: list[InputFile]) -> str:
    """sha256 over each input's URI, size and modification key: changes when an input changes."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.kind}|{f.uri}".encode())
        if f.kind == "hf_hub":
            continue
        fs, path = fsspec.core.url_to_fs(f.uri)
        paths = sorted(fs.find(path)) if fs.isdir(path) else [path]
        for p in paths:
            info = fs.info(p)
            h.update(f"|{p}|{info.get('size')}|{fs.ukey(p)}".encode())
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("utf-8", "surrogateescape")  # lone surrogates: rejected as undecodable_text
    return str(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_jsonable)


def _row(row: str, source: str, record: str, reason: str = "", detail: str = "") -> dict[str, str]:
    return {"row": row, "source": source, "record": record, "reason": reason, "detail": detail}


def _maybe_gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def parse_jsonl(data: bytes, path: str) -> Iterator[dict[str, str]]:
    """One record per non-blank line; bad lines become rejects unless no line parses at all."""
    good, first_error = 0, None
    rows = []
    for lineno, raw in enumerate(_maybe_gunzip(data).split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(
                _row(
                    where,
                    path,
                    json.dumps(raw.decode("utf-8", "replace")),
                    "undecodable_text",
                    f"line {lineno}: {e.reason} at byte {e.start}",
                )
            )
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            first_error = first_error or (lineno, e)
            rows.append(_row(where, path, json.dumps(text[:10_000]), "invalid_json", f"line {lineno}: {e}"))
            continue
        good += 1
        rows.append(_row(where, path, _dumps(obj)))
    if good == 0 and first_error is not None:
        lineno, err = first_error
        raise InputError(f"{path}: line {lineno}: not JSON ({err}); expected one JSON object per line (JSONL)")
    yield from rows


def parse_json(data: bytes, path: str) -> Iterator[dict[str, str]]:
    """A JSON array of records, or an object holding exactly one such array."""
    try:
        obj = json.loads(_maybe_gunzip(data).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: byte {e.start}: not UTF-8 ({e.reason}); expected a UTF-8 JSON file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno} column {e.colno}: not JSON ({e.msg})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a JSON array of records (or an object with one array)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a JSON array of records, found {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield _row(f"{path}[{i}]", path, _dumps(rec))


def parse_csv(data: bytes, path: str) -> Iterator[dict[str, str]]:
    """A header row, then one record per row; undecodable bytes reach the record as lone surrogates."""
    text = _maybe_gunzip(data).decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        start = 2
        for rec in reader:
            yield _row(f"{path}:{start}", path, _dumps(rec))
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: not CSV ({e})") from None


def parse_parquet(data: bytes, path: str, required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Rows of a Parquet file, which must have the `required` columns."""
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(
            f"{path}: wrong Parquet schema: missing column(s) {missing}; found {names}. "
            "Map your column names with prepare.columns (prompt/chosen/rejected)."
        )
    index = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield _row(f"{path}[{index}]", path, _dumps(rec))
            index += 1


def _hf_records(spec: InputFile, split: str) -> Any:
    import datasets
    import ray

    if spec.kind == "hf_hub":
        ds = datasets.load_dataset(spec.uri, split=split)
    else:
        ds = datasets.load_from_disk(spec.uri)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{spec.uri}: no split {split!r}; found {list(ds)} (set prepare.hf_split)")
            ds = ds[split]
    ds = ds.add_column("__row__", list(range(len(ds))))
    source = spec.uri

    def to_records(batch: pa.Table) -> pa.Table:
        rows = [_row(f"{source}[{rec.pop('__row__')}]", source, _dumps(rec)) for rec in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA)

    return ray.data.from_huggingface(ds).map_batches(to_records, batch_format="pyarrow")


def read_records(files: list[InputFile], required: tuple[str, ...], hf_split: str = "train") -> Any:
    """A Ray Dataset (RECORDS_SCHEMA) of every record of every input."""
    import ray

    parts = []
    blobs = [f.uri for f in files if f.kind in ("jsonl", "json", "csv", "parquet")]
    kinds = {f.uri: f.kind for f in files}
    if blobs:

        def parse(item: dict[str, Any]) -> Iterator[dict[str, str]]:
            path = item["path"]
            display = next((u for u in kinds if u.endswith(path)), path)
            kind = kinds.get(display) or _kind_of(path) or "jsonl"
            data = item["bytes"]
            if kind == "jsonl":
                yield from parse_jsonl(data, display)
            elif kind == "json":
                yield from parse_json(data, display)
            elif kind == "csv":
                yield from parse_csv(data, display)
            else:
                yield from parse_parquet(data, display, required)

        parts.append(ray.data.read_binary_files(blobs, include_paths=True).flat_map(parse))
    for f in files:
        if f.kind in ("hf_disk", "hf_hub"):
            parts.append(_hf_records(f, hf_split))
    ds = parts[0]
    for other in parts[1:]:
        ds = ds.union(other)
    return ds
