"""Reading artifacts back in tests, independently of the stage code."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def read_artifact(path: str | Path) -> pa.Table:
    files = sorted(glob.glob(f"{path}/part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())
