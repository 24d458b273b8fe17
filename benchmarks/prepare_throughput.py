"""prepare's throughput at growing input sizes, measured end to end (rows per second, and per core).

Input: the HH-RLHF sample's rows (implicit format: full dialogs in chosen/rejected), each copy made unique by a
number appended to the human's first turn, split over `--files` JSONL files; every 50th row repeats an earlier
one so that the dedup shuffle has work. Tokenizer: an 8k byte-level BPE trained on the sample (as
benchmarks/hh_llama.py builds). prepare runs on an embedded Ray (started before the clock) with its default
config (max_length 1024, max_prompt_length 512, one tokenizer actor) unless flags say otherwise; the time is
prepare.run's wall clock, reading the inputs to writing the manifest. Each size runs in a fresh output dir.

    .venv/bin/python benchmarks/prepare_throughput.py [--rows 4000 20000 100000] [--files 4] [--actors 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


sys.path.insert(0, str(HERE))


def write_inputs(directory: Path, rows: int, files: int) -> list[str]:
    from hh_llama import hh_records

    records = hh_records()
    paths = [directory / f"part-{i:03d}.jsonl" for i in range(files)]
    handles = [p.open("w") for p in paths]
    for i in range(rows):
        if i % 50 == 49:  # an exact duplicate of an earlier row (same text, another line)
            rec = _unique(records, i - 25)
        else:
            rec = _unique(records, i)
        handles[i * files // rows].write(json.dumps(rec) + "\n")
    for h in handles:
        h.close()
    return [str(p) for p in paths]


def _unique(records: list[dict[str, str]], i: int) -> dict[str, str]:
    rec = records[i % len(records)]
    tag = f" (#{i})"
    first = rec["chosen"].find("\n\nAssistant:")
    return {k: v[:first] + tag + v[first:] if first >= 0 else v + tag for k, v in rec.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4000, 20000, 100000])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()

    from hh_llama import build_hh_llama, hh_records

    from pipeline.config import PrepareConfig
    from pipeline.core.runtime import ensure_ray
    from pipeline.stages import prepare

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_hh_llama(root / "model", hh_records(), hidden=64, layers=1)
        ensure_ray()
        results = []
        for n in args.rows:
            data = root / f"data-{n}"
            data.mkdir()
            inputs = write_inputs(data, n, args.files)
            cfg = PrepareConfig(
                inputs=inputs, tokenizer=str(model), output=str(root / f"pairs-{n}"), num_actors=args.actors
            )
            start = time.perf_counter()
            manifest = prepare.run(cfg)
            seconds = time.perf_counter() - start
            s = manifest.stats
            results.append(
                {
                    "rows": n,
                    "seconds": round(seconds, 2),
                    "rows_per_s": round(n / seconds, 1),
                    "rows_per_s_per_core": round(n / seconds / cores, 1),
                    "pairs": manifest.rows,
                    "rejected": s["rows_rejected"],
                    "rejects": s["rejects"],
                }
            )
            print(json.dumps(results[-1]), flush=True)
        print(f"cores: {cores}")
        print("| rows | seconds | rows/s | rows/s per core | pairs | rejected |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(
                f"| {r['rows']} | {r['seconds']} | {r['rows_per_s']} | {r['rows_per_s_per_core']} | {r['pairs']} "
                f"| {r['rejected']} |"
            )


if __name__ == "__main__":
    main()
