"""`dpo-ray init --model M --data D [...]`: a commented starter config, written only after checking that the
tokenizer loads and that the data's records map to pairs with the chosen columns and format.

The first records of the first input file are turned into pairs exactly as prepare will (dpo_ray.data.tokenization);
when none maps, the error names the column that is missing and the columns the records have, or the reason
prepare would reject them with. Nothing else is run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from dpo_ray.errors import UserError

__all__ = ["InitError", "main"]

SAMPLE = 50  # records checked


class InitError(UserError, ValueError):
    """The model's tokenizer or the data does not fit; the message says what to change."""


def _records(data: str, input_type: str) -> tuple[str, list[Any]]:
    from pipeline.core.sources import parse_file, resolve_inputs

    files = resolve_inputs([data], input_type)
    first = files[0]
    if first.kind in ("hf_disk", "hf_hub"):
        raise InitError(f"init checks data files (jsonl, json, csv, parquet); {data} is a {first.kind} dataset")
    records = []
    with contextlib.closing(parse_file(first.uri, first.kind)) as rows:  # the file is read up to the sample only
        for row in rows:
            if not row["reason"]:
                records.append(json.loads(row["record"]))
            if len(records) >= SAMPLE:
                break
    if not records:
        raise InitError(f"{first.uri}: no readable record")
    return first.uri, records


def check(model: str, data: str, fmt: str, columns: dict[str, str], input_type: str = "auto") -> dict[str, Any]:
    """Load the tokenizer, map the first records; the format found and counts, or InitError."""
    from dpo_ray.data.tokenization import PairTokenizer, RowRejected, record_to_pair
    from dpo_ray.models.loading import load_tokenizer

    try:
        tok = load_tokenizer(model)
    except Exception as e:
        raise InitError(f"--model {model}: the tokenizer does not load ({type(e).__name__}: {e})") from None
    if fmt == "conversational" and not getattr(tok, "chat_template", None):
        raise InitError(f"--format conversational needs a chat template, and {model}'s tokenizer has none")
    uri, records = _records(data, input_type)
    pt = PairTokenizer(tok, 1_000_000, 500_000, "keep_end", 1_000_000)
    reasons: Counter[str] = Counter()
    first_reject: tuple[str, str] | None = None
    formats: Counter[str] = Counter()
    for rec in records:
        try:
            record_to_pair(rec, pt, columns, fmt)  # type: ignore[arg-type]
        except RowRejected as e:
            reasons[e.reason] += 1
            first_reject = first_reject or (e.reason, e.detail)
            continue
        chosen = rec.get(columns["chosen"])
        has_prompt = rec.get(columns["prompt"]) is not None
        formats["conversational" if isinstance(chosen, list) else "explicit" if has_prompt else "implicit"] += 1
    if not formats:
        found = sorted({k for r in records if isinstance(r, dict) for k in r})
        wanted = [f"{role}={col!r}" for role, col in columns.items()]
        assert first_reject is not None
        raise InitError(
            f"{uri}: none of the first {len(records)} records maps to a pair with columns {', '.join(wanted)} "
            f"and format {fmt} (first: {first_reject[0]}: {first_reject[1]}); the records' columns are {found}. "
            "Name the columns with --prompt-column/--chosen-column/--rejected-column, or set --format"
        )
    return {"file": uri, "checked": len(records), "mapped": sum(formats.values()), "rejected": dict(reasons),
            "format": formats.most_common(1)[0][0]}  # fmt: skip


TEMPLATE = """\
# dpo-ray starter config, written by `dpo-ray init` ({checked} of {checked_of} sampled records of
# {file} mapped to pairs as format `{format}`). Every key: `dpo-ray <stage> --help`;
# the resolved config: `dpo-ray config --config {output}`. Run: `dpo-ray run --config {output}`.
run_dir: {run_dir}            # artifacts, checkpoints and the export go under here (a path or s3://...)

prepare:
  inputs: [{data}]
  tokenizer: {model}          # the policy's tokenizer: every stage checks it is the same
  format: {format}            # explicit | implicit | conversational (auto decides per record)
  columns: {{prompt: {prompt}, chosen: {chosen}, rejected: {rejected}}}
  max_length: 1024            # prompt + completion tokens; longer pairs are truncated (see truncation)
  max_prompt_length: 512
  eval_fraction: 0.05         # held-out prompts (with all their pairs), chosen by hash of the prompt

reference:
  model: {model}              # the frozen reference (usually the SFT model you start from)
  backend: vllm               # or hf (a transformers forward, no vLLM needed)
  dtype: bfloat16             # float32 on CPU
  max_model_len: 1536         # >= prepare.max_length + 1
  gpu_memory_utilization: 0.9 # on CPU: a fraction of host memory, use ~0.1
  num_gpus_per_actor: 1       # 0 on CPU

train:
  model: {model}
  loss:
    name: sigmoid             # `dpo-ray train --help` lists the losses
    beta: 0.1
  optim:
    lr: 5.0e-7
  workers:
    count: 1                  # Ray Train workers (GPUs with use_gpu)
    use_gpu: true             # false on CPU
  checkpoint:
    every: 50
  batch_size: 32              # pairs per optimizer step, across workers
  epochs: 1

evaluate:
  reference: {model}
  max_prompts: 256            # held-out prompts sampled by both models
  reward: lexicon             # or model:<dir> (a reward model) or <module>:<function>
  gpu_memory_utilization: 0.9
  num_gpus_per_actor: 1
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dpo-ray init", description=__doc__)
    parser.add_argument("--model", required=True, help="policy/reference model: a dir, URI or hub id")
    parser.add_argument("--data", required=True, help="a preference data file (jsonl, json, csv, parquet)")
    parser.add_argument("--format", default="auto", choices=["auto", "explicit", "implicit", "conversational"])
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--chosen-column", default="chosen")
    parser.add_argument("--rejected-column", default="rejected")
    parser.add_argument("--run-dir", default="runs/dpo")
    parser.add_argument("--output", default="dpo.yaml", help="where the config is written (not overwritten)")
    args = parser.parse_args(argv)
    columns = {"prompt": args.prompt_column, "chosen": args.chosen_column, "rejected": args.rejected_column}
    if Path(args.output).exists():
        raise InitError(f"{args.output} exists; choose another --output")
    found = check(args.model, args.data, args.format, columns)
    fmt = found["format"] if args.format == "auto" else args.format
    text = TEMPLATE.format(
        checked=found["mapped"], checked_of=found["checked"], file=found["file"], output=args.output, format=fmt,
        run_dir=json.dumps(args.run_dir), data=json.dumps(args.data), model=json.dumps(args.model),
        **{k: json.dumps(v) for k, v in columns.items()},
    )  # fmt: skip
    Path(args.output).write_text(text)
    print(f"init: wrote {args.output} ({found['mapped']}/{found['checked']} sampled records map to pairs)")
    return 0
