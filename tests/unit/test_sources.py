"""Input files are read as streams: the rows are those of a walk of the whole file, and taking the first rows reads
only the first bytes (JSONL, gzip, CSV, Parquet)."""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.sources import (
    READ_BLOCK_BYTES,
    InputError,
    open_input,
    parse_csv,
    parse_file,
    parse_jsonl,
    parse_parquet,
)
from tests.counted_s3 import counted_s3


class _Counted(io.FileIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def readinto(self, buffer) -> int | None:  # type: ignore[no-untyped-def,override]
        n = super().readinto(buffer)
        _Counted.read_bytes += n or 0
        return n

    def readall(self) -> bytes:
        data = super().readall()
        _Counted.read_bytes += len(data)
        return data


# The tests' own buffer (io.DEFAULT_BUFFER_SIZE differs between Python versions).
_BUFFER = 8192


@contextlib.contextmanager
def _counted(path: Path) -> Iterator[IO[bytes]]:
    with io.BufferedReader(_Counted(path), buffer_size=_BUFFER) as f:
        yield f


def _expected_jsonl(data: bytes, path: str) -> list[dict[str, str]]:
    """The rows of a JSONL file from its whole bytes: lines split at b"\\n", numbered from 1, blank lines skipped;
    every field (the spec's reasons and details)."""
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        row = {"row": f"{path}:{lineno}", "source": path}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            detail = f"line {lineno}: {e.reason} at byte {e.start}"
            rows.append(row | {"record": json.dumps(raw.decode("utf-8", "replace")), "reason": "undecodable_text",
                               "detail": detail})  # fmt: skip
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            rows.append(row | {"record": json.dumps(text[:10_000]), "reason": "invalid_json",
                               "detail": f"line {lineno}: {e}"})  # fmt: skip
            continue
        rows.append(row | {"record": json.dumps(obj), "reason": "", "detail": ""})
    return rows


_MIXED = (
    b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    b"\n"
    b'{"prompt": "\xc3\xa9t\xc3\xa9", "chosen": "\xe2\x9c\x93", "rejected": "x"}\r\n'
    b"   \n"
    b"{not json}\n"
    b'{"prompt": "\xff\xfe", "chosen": "b", "rejected": "c"}\n'
    b"[1, 2, 3]\n"
    + b'{"prompt": '
    + b"9" * 5000  # more digits than Python converts: a reject, not a crash
    + b"}\n"
    + b"[" * 100_000  # nested past the recursion limit: the same
    + b"]" * 100_000
    + b"\n"
    b'{"prompt": "last", "chosen": "no newline at the end", "rejected": "c"}'
)


@pytest.mark.parametrize("zipped", [False, True])
def test_jsonl_rows_are_those_of_the_whole_file(tmp_path, zipped):
    path = tmp_path / ("mixed.jsonl.gz" if zipped else "mixed.jsonl")
    path.write_bytes(gzip.compress(_MIXED) if zipped else _MIXED)
    rows = list(parse_file(str(path), "jsonl"))
    assert rows == _expected_jsonl(_MIXED, str(path))
    assert [r["reason"] for r in rows].count("invalid_json") == 3
    assert [r["reason"] for r in rows].count("undecodable_text") == 1
    assert len(rows) == 8


def test_jsonl_with_no_line_that_parses_is_refused_at_its_first_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n\xff\xfe\nnot json\n{also not}\n")
    with pytest.raises(InputError, match=r"bad\.jsonl: line 3: not JSON"):
        list(parse_file(str(path), "jsonl"))
    # Bad lines before the first good one are rejects when a later line parses.
    path.write_bytes(b"not json\n{also not}\n" + b'{"prompt": "p"}\n')
    assert [r["reason"] for r in parse_file(str(path), "jsonl")] == ["invalid_json", "invalid_json", ""]


def _noise(i: int) -> str:
    """200 characters that gzip cannot shrink much (so the compressed file is large too)."""
    return "".join(hashlib.sha256(f"{i}/{k}".encode()).hexdigest() for k in range(4))[:200]


def _big_jsonl(path: Path, lines: int) -> bytes:
    data = b"".join(
        json.dumps({"prompt": f"question {i} " + _noise(i), "chosen": "yes", "rejected": "no"}).encode() + b"\n"
        for i in range(lines)
    )
    path.write_bytes(data)
    return data


def _first(rows: Iterator[dict[str, str]], n: int) -> list[dict[str, str]]:
    with contextlib.closing(rows) as it:  # type: ignore[type-var]
        return [next(it) for _ in range(n)]


def test_jsonl_streams(tmp_path):
    path = tmp_path / "big.jsonl"
    data = _big_jsonl(path, 20_000)  # 4.9 MB
    _Counted.read_bytes = 0
    first = _first(parse_jsonl(functools.partial(_counted, path), str(path)), 10)
    assert [r["row"] for r in first] == [f"{path}:{i}" for i in range(1, 11)]
    # The first pass reads one buffer (its first line parses), the second starts from the same buffer.
    assert _Counted.read_bytes <= 2 * _BUFFER < len(data) // 100


def test_gzip_jsonl_streams(tmp_path):
    plain = tmp_path / "big.jsonl"
    data = _big_jsonl(plain, 20_000)
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(data))
    _Counted.read_bytes = 0

    @contextlib.contextmanager
    def opener() -> Iterator[IO[bytes]]:
        with _counted(path) as raw, gzip.GzipFile(fileobj=raw) as f:
            yield f  # type: ignore[misc]

    assert len(_first(parse_jsonl(opener, str(path)), 10)) == 10
    assert _Counted.read_bytes < path.stat().st_size // 4
    with open_input(str(path)) as f:  # open_input unzips by the magic number, not the name
        assert f.read() == data
    (tmp_path / "named.jsonl").write_bytes(gzip.compress(data))
    assert len(list(parse_file(str(tmp_path / "named.jsonl"), "jsonl"))) == 20_000


def test_csv_streams_and_numbers_records_by_their_first_line(tmp_path):
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["two\nlines", "b", "c"])  # a quoted field with a newline: the record spans lines 2-3
        w.writerow(["p", "b", "c"])  # line 4
        for i in range(20_000):
            w.writerow([f"question {i} " + "x" * 200, "yes", "no"])
    _Counted.read_bytes = 0
    first = _first(parse_csv(functools.partial(_counted, path), str(path)), 3)
    assert [r["row"] for r in first] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert json.loads(first[0]["record"]) == {"prompt": "two\nlines", "chosen": "b", "rejected": "c"}
    assert _Counted.read_bytes < path.stat().st_size // 50
    assert sum(1 for _ in parse_file(str(path), "csv")) == 20_002


def test_parquet_streams_by_row_group(tmp_path):
    path = tmp_path / "big.parquet"
    n = 40_000
    table = pa.table({"prompt": [f"q {i} " + _noise(i) for i in range(n)], "chosen": ["y"] * n, "rejected": ["n"] * n})
    pq.write_table(table, path, row_group_size=2_000)  # a batch (4096 rows) reads 3 of 20 row groups
    _Counted.read_bytes = 0
    first = _first(parse_parquet(functools.partial(_counted, path), str(path), ("chosen",)), 10)
    assert [json.loads(r["record"])["prompt"] for r in first] == table["prompt"].to_pylist()[:10]
    assert _Counted.read_bytes < path.stat().st_size // 4
    rows = list(parse_file(str(path), "parquet", ("chosen", "rejected")))
    assert [r["row"] for r in rows[-2:]] == [f"{path}[{n - 2}]", f"{path}[{n - 1}]"]
    assert [json.loads(r["record"]) for r in rows] == table.to_pylist()


def test_object_storage_input_streams(tmp_path, monkeypatch):
    """On S3 (moto, server mode, 127.0.0.1) the first rows of a JSONL file are served with one read block, not the
    file, and every row comes out as from the whole bytes; Parquet is served the footer and the row groups read
    (each once). The bytes are counted by the server."""
    import s3fs

    local = tmp_path / "big.jsonl"
    data = _big_jsonl(local, 100_000)  # 24 MB
    n = 60_000
    table = pa.table({"prompt": [_noise(i) for i in range(n)], "chosen": ["y"] * n, "rejected": ["n"] * n})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=5_000, compression="none")  # 12 row groups
    with counted_s3(monkeypatch, "/big.") as served:
        fs = s3fs.S3FileSystem()
        fs.mkdir("inputs")
        fs.put(str(local), "inputs/big.jsonl")
        fs.put(str(tmp_path / "big.parquet"), "inputs/big.parquet")
        size = fs.size("inputs/big.parquet")
        served.clear()
        first = _first(parse_file("s3://inputs/big.jsonl", "jsonl"), 10)
        assert [r["row"] for r in first] == [f"s3://inputs/big.jsonl:{i}" for i in range(1, 11)]
        # One open: the check for a line that parses and the rows share the first block.
        assert served == [READ_BLOCK_BYTES], served
        assert list(parse_file("s3://inputs/big.jsonl", "jsonl")) == _expected_jsonl(data, "s3://inputs/big.jsonl")

        served.clear()
        assert len(_first(parse_file("s3://inputs/big.parquet", "parquet", ("chosen",)), 1)) == 1
        # The footer, then the first batch's row groups (4096 rows: the first group).
        assert sum(served) < size / 6, (served, size)
        served.clear()
        rows = list(parse_file("s3://inputs/big.parquet", "parquet", ("chosen",)))
        assert [json.loads(r["record"]) for r in rows] == table.to_pylist()
        assert sum(served) < 1.05 * size, (served, size)


def test_gzipped_parquet_is_not_parquet(tmp_path):
    """Parquet is never unzipped (its reader seeks): a gzipped file is refused, as it was when files were read
    whole."""
    path = tmp_path / "zipped.parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.table({"chosen": ["y"], "rejected": ["n"]}), buffer)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(InputError, match=r"zipped\.parquet: not a Parquet file"):
        list(parse_file(str(path), "parquet"))


def test_json_array_with_an_unreadable_number_is_refused(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b'[{"prompt": ' + b"9" * 5000 + b"}]")
    with pytest.raises(InputError, match=r"big\.json: not JSON Python can read \(ValueError: "):
        list(parse_file(str(path), "json"))
