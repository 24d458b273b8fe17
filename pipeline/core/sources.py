"""Input files and datasets → a Ray Dataset of raw records, one row per input record.

Rows: `row` (where the record came from: `file:line` for JSONL/CSV, `file[index]` for JSON/Parquet/
datasets), `source` (the file or dataset), `record` (the record as JSON text) and, for records already
known to be bad (not JSON, not UTF-8), `reason` and `detail`. Records stay JSON text until the tokenizer
stage so that heterogeneous, malformed rows pass through Arrow unharmed and can be rejected one by one.

A file that cannot be parsed at all raises InputError naming the file, the line or row, and what was
expected; a bad record inside a good file becomes a reject, never a lost row.

Files are read as streams (gzip too): a JSONL or CSV line, a Parquet batch at a time, so reading a file holds neither
the file nor its records, whatever its size (benchmarks/RESULTS.md, scale.py). A JSON array is read whole.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import io
import json
import logging
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any, cast

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "RECORDS_SCHEMA",
    "InputError",
    "InputFile",
    "inputs_fingerprint",
    "open_input",
    "parse_file",
    "read_records",
    "resolve_inputs",
]

RECORDS_SCHEMA = pa.schema(
    [
        ("row", pa.string()),
        ("source", pa.string()),
        ("record", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# The most tasks reading files (Ray Data's own minimum of read tasks, read_op_min_num_blocks): many small files are
# read a group of consecutive ones per task.
READ_TASKS = 200
# Rows of a Parquet input converted to records at a time.
READ_BATCH_ROWS = 4096
# An input file is read this many bytes at a time: what one request fetches from object storage, and about what a
# reading task holds of its file.
READ_BLOCK_BYTES = 8 * 2**20

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


@contextlib.contextmanager
def open_input(uri: str, stream: bool = True) -> Iterator[IO[bytes]]:
    """An input file's bytes (local or fsspec URI); the file object fetches what is asked and no more (no
    read-ahead cache of its own). stream: read through one READ_BLOCK_BYTES buffer and gunzipped as it is read when
    the file starts with gzip's magic number; else the file as it is (Parquet: pyarrow asks for the footer and the
    column chunks it reads)."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="none") as raw:
        if not stream:
            yield raw
            return
        with io.BufferedReader(raw, buffer_size=READ_BLOCK_BYTES) as buffered:
            if buffered.peek(2)[:2] == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=buffered) as unzipped:
                    yield cast(IO[bytes], unzipped)
            else:
                yield buffered


Opener = Callable[[], AbstractContextManager[IO[bytes]]]
# What json.loads raises on a line that is not a record: not JSON (JSONDecodeError), an integer of more digits than
# Python converts (ValueError), nesting deeper than the recursion limit (RecursionError).
_NOT_JSON = (ValueError, RecursionError)


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of every line, as the file is read."""
    for lineno, raw in enumerate(f, start=1):
        yield lineno, raw[:-1] if raw.endswith(b"\n") else raw


def _first_parse_error(f: IO[bytes]) -> tuple[int, Exception] | None:
    """The first invalid line of a JSONL file in which no line parses (undecodable lines aside), else None. Reads up
    to the first line that parses: the first line of a good file."""
    first_error = None
    for lineno, raw in _lines(f):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        try:
            json.loads(text)
        except _NOT_JSON as e:
            first_error = first_error or (lineno, e)
            continue
        return None
    return first_error


def parse_jsonl(opener: Opener, path: str) -> Generator[dict[str, str], None, None]:
    """One record per non-blank line; bad lines become rejects unless no line parses at all. Streams: one line is
    held at a time. A first pass reads up to the first line that parses, then the file is read again from its
    start (a seek within the buffer when that line is in the first READ_BLOCK_BYTES)."""
    with opener() as f:
        failed = _first_parse_error(f)
        if failed is not None:
            lineno, err = failed
            raise InputError(f"{path}: line {lineno}: not JSON ({err}); expected one JSON object per line (JSONL)")
        f.seek(0)
        for lineno, raw in _lines(f):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _row(
                    where,
                    path,
                    json.dumps(raw.decode("utf-8", "replace")),
                    "undecodable_text",
                    f"line {lineno}: {e.reason} at byte {e.start}",
                )
                continue
            try:
                obj = json.loads(text)
            except _NOT_JSON as e:
                yield _row(where, path, json.dumps(text[:10_000]), "invalid_json", f"line {lineno}: {e}")
                continue
            yield _row(where, path, _dumps(obj))


def parse_json(opener: Opener, path: str) -> Generator[dict[str, str], None, None]:
    """A JSON array of records, or an object holding exactly one such array. Read whole: the json module does not
    stream (a limit: large inputs belong in JSONL, CSV or Parquet, which stream)."""
    with opener() as f:
        data = f.read()
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: byte {e.start}: not UTF-8 ({e.reason}); expected a UTF-8 JSON file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno} column {e.colno}: not JSON ({e.msg})") from None
    except _NOT_JSON as e:
        raise InputError(f"{path}: not JSON Python can read ({type(e).__name__}: {e})") from None
    del data
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a JSON array of records (or an object with one array)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a JSON array of records, found {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield _row(f"{path}[{i}]", path, _dumps(rec))


def parse_csv(opener: Opener, path: str) -> Generator[dict[str, str], None, None]:
    """A header row, then one record per row; undecodable bytes reach the record as lone surrogates. Streams."""
    with opener() as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        try:
            start = 2
            for rec in reader:
                yield _row(f"{path}:{start}", path, _dumps(rec))
                start = reader.line_num + 1
        except csv.Error as e:
            raise InputError(f"{path}: line {reader.line_num}: not CSV ({e})") from None


def parse_parquet(opener: Opener, path: str, required: tuple[str, ...]) -> Generator[dict[str, str], None, None]:
    """Rows of a Parquet file, which must have the `required` columns. Streams: one batch of a row group at a
    time."""
    with opener() as f:
        try:
            pf = pq.ParquetFile(f, pre_buffer=False)
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
        # A batch reads the row groups it spans (pyarrow's default batch, 65,536 rows, read a test's whole file).
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, use_threads=False):
            for rec in batch.to_pylist():
                yield _row(f"{path}[{index}]", path, _dumps(rec))
                index += 1


def parse_file(uri: str, kind: str, required: tuple[str, ...] = ()) -> Generator[dict[str, str], None, None]:
    """Every record of one input file (jsonl, json, csv or parquet), as RECORDS_SCHEMA rows, in file order."""
    opener: Opener = functools.partial(open_input, uri, kind != "parquet")
    if kind == "jsonl":
        return parse_jsonl(opener, uri)
    if kind == "json":
        return parse_json(opener, uri)
    if kind == "csv":
        return parse_csv(opener, uri)
    return parse_parquet(opener, uri, required)


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
    blobs = [f for f in files if f.kind in ("jsonl", "json", "csv", "parquet")]
    if blobs:
        # Consecutive files in at most READ_TASKS groups, a task each: its files' records stream out in blocks as
        # they are read (the execution's block size), the task holding a line or a Parquet batch, not a file.
        groups = [blobs[g[0] : g[-1] + 1] for g in np.array_split(np.arange(len(blobs)), min(len(blobs), READ_TASKS))]
        items = [{"uris": [f.uri for f in g], "kinds": [f.kind for f in g]} for g in groups]

        def parse(item: dict[str, Any]) -> Iterator[dict[str, str]]:
            for uri, kind in zip(item["uris"], item["kinds"], strict=True):
                yield from parse_file(uri, kind, required)

        parts.append(ray.data.from_items(items, override_num_blocks=len(items)).flat_map(parse))
    for f in files:
        if f.kind in ("hf_disk", "hf_hub"):
            parts.append(_hf_records(f, hf_split))
    ds = parts[0]
    for other in parts[1:]:
        ds = ds.union(other)
    return ds
