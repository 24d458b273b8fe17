"""Reading artifacts back in tests, independently of the stage code; and the small `pairs` artifact most
integration tests start from."""

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


def prepare_pairs(inputs: str | Path, tokenizer: str | Path, output: str | Path, **kw: object) -> Path:
    """prepare one JSONL file into `output` (max_length 96, max_prompt_length 48 unless `kw` says otherwise)."""
    from pipeline.config import PrepareConfig
    from pipeline.stages.prepare import run

    settings = {"max_length": 96, "max_prompt_length": 48, **kw}
    run(PrepareConfig(inputs=[str(inputs)], tokenizer=str(tokenizer), output=str(output), **settings))  # type: ignore[arg-type]
    return Path(output)
