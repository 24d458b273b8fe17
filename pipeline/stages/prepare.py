"""prepare: raw preference data → a `pairs` artifact (token ids, QA'd, split) plus `rejects/`.

One streaming Ray Data execution reads the inputs (pipeline.core.sources) and turns every record into a tokenized
pair or a reject with its reason (dpo_ray.data.tokenization; the Tokenize actors encode each batch's texts in one
tokenizer call), in input order. Then the dedup shuffle on keys only: Ray tasks take each block's (pair_id,
row, position), the driver finds the repeated pair_ids (the first in input order is kept), and Ray tasks
write consecutive blocks as the Parquet shards of `pairs` and `rejects` (explicit Arrow schemas), returning
the columns the stats need. The manifests come last. Every input row is accounted for: rows_in == rows_out +
rows_rejected, checked before the manifest is written.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import Manifest
from dpo_ray.data.schema import PAIRS_SCHEMA, REJECTS_SCHEMA
from dpo_ray.errors import UserError
from pipeline.config import PrepareConfig
from pipeline.core import console, stage
from pipeline.core.inputs import stage_inputs
from pipeline.core.progress import gather, remote_progress
from pipeline.core.runtime import check_pool_fits, ensure_ray, unwrap_user_error
from pipeline.core.sources import InputError, read_records, resolve_inputs

logger = logging.getLogger(__name__)

__all__ = ["PrepareError", "run"]

_TRUNC = ("trunc_prompt", "trunc_chosen", "trunc_rejected")
# Every tokenizer batch yields rows of this one schema: a pair (kind "pair") or a reject (kind "reject").
UNIFIED_SCHEMA = pa.schema(
    list(PAIRS_SCHEMA)
    + [
        ("kind", pa.string()),
        ("row", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("record", pa.string()),
    ]
    + [(name, pa.bool_()) for name in (*_TRUNC, "boundary_merge")]
)


class PrepareError(UserError, RuntimeError):
    """The stage cannot produce a usable artifact (e.g. every row was rejected)."""


class Tokenize:
    """Ray Data actor: records (RECORDS_SCHEMA batches) → UNIFIED_SCHEMA rows. Loads the tokenizer once."""

    def __init__(self, cfg: dict[str, Any], progress: Any = None) -> None:
        from dpo_ray.data.tokenization import PairTokenizer
        from dpo_ray.models.loading import load_tokenizer

        self.cfg = PrepareConfig.model_validate(cfg)
        tok = load_tokenizer(self.cfg.tokenizer, trust_remote_code=self.cfg.trust_remote_code)
        self.pt = PairTokenizer(
            tok, self.cfg.max_length, self.cfg.max_prompt_length, self.cfg.truncation, self.cfg.max_text_chars
        )
        self.columns = self.cfg.columns.model_dump()
        self.progress = progress  # a pipeline.core.progress.Counter handle, advanced by the rows of each batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        from dpo_ray.data.tokenization import RowRejected, pair_id, records_to_pairs, split_of

        cols = [batch[c].to_pylist() for c in ("row", "source", "record", "reason", "detail")]
        todo = [i for i, reason in enumerate(cols[3]) if not reason]
        found = dict(
            zip(
                todo,
                records_to_pairs(
                    [json.loads(cols[2][i]) for i in todo],
                    self.pt,
                    self.columns,
                    self.cfg.format,
                    self.cfg.implicit_marker,
                ),
                strict=True,
            )
        )
        rows = []
        for i, (row, source, record, reason, detail) in enumerate(zip(*cols, strict=True)):
            out: dict[str, Any] = {"row": row, "source": source, "record": record}
            p = found.get(i)
            if isinstance(p, RowRejected):
                reason, detail = p.reason, p.detail
            elif p is not None:
                pid = pair_id(p.prompt, p.chosen, p.rejected)
                out.update(
                    kind="pair",
                    pair_id=pid,
                    split=split_of(p.prompt, self.cfg.eval_fraction),
                    prompt=p.prompt,
                    chosen=p.chosen,
                    rejected=p.rejected,
                    prompt_ids=p.prompt_ids,
                    chosen_ids=p.chosen_ids,
                    rejected_ids=p.rejected_ids,
                    trunc_prompt=p.truncated["prompt"],
                    trunc_chosen=p.truncated["chosen"],
                    trunc_rejected=p.truncated["rejected"],
                    boundary_merge=p.boundary_merge,
                )
                rows.append(out)
                continue
            out.update(kind="reject", reason=reason, detail=detail)
            rows.append(out)
        if self.progress is not None:
            self.progress.add.remote(len(rows))
        return pa.Table.from_pylist(rows, schema=UNIFIED_SCHEMA)


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {"p50": 0, "p95": 0, "max": 0}
    return {
        "p50": int(np.percentile(values, 50)),
        "p95": int(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def _keys(block: pa.Table) -> tuple[int, pa.Table]:
    """A tokenized block's row count and its pairs' (pair_id, row, position in the block): what the dedup
    needs, a small part of the block."""
    is_pair = pc.equal(block["kind"], "pair")
    positions = pa.array(np.arange(block.num_rows, dtype=np.int64))
    return block.num_rows, pa.table(
        {
            "pair_id": block["pair_id"].filter(is_pair),
            "row": block["row"].filter(is_pair),
            "position": positions.filter(is_pair),
        }
    )


def _duplicates(keys: list[pa.Table]) -> list[dict[str, str]]:
    """Per block: {row: kept row} for each pair whose pair_id an earlier pair holds. Of a group of equal
    pair_ids the first in input order (blocks are in input order) is kept, wherever the others are."""
    tagged = [k.append_column("block", pa.array(np.full(k.num_rows, i, dtype=np.int64))) for i, k in enumerate(keys)]
    found: list[dict[str, str]] = [{} for _ in keys]
    if not tagged:
        return found
    table = pa.concat_tables(tagged).sort_by(
        [("pair_id", "ascending"), ("block", "ascending"), ("position", "ascending")]
    )
    ids = table["pair_id"].to_numpy(zero_copy_only=False)
    if ids.size < 2:
        return found
    repeated = np.flatnonzero(ids[1:] == ids[:-1]) + 1  # a pair_id equal to the one before (sorted)
    if repeated.size == 0:
        return found
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # where each group of equal pair_ids starts
    keeper = first[np.searchsorted(first, repeated, side="right") - 1]
    rows, blocks = table["row"].to_numpy(zero_copy_only=False), table["block"].to_numpy()
    for i, k in zip(repeated.tolist(), keeper.tolist(), strict=True):
        found[int(blocks[i])][str(rows[i])] = str(rows[k])
    return found


def _finalize(
    index: int, blocks: list[Any], duplicates: dict[str, str], output: str, rejects_uri: str, rows_per_shard: int
) -> dict[str, Any]:
    """Output shards from consecutive tokenized blocks: duplicates become rejects; pairs go to
    `part-<index>-<j>.parquet`, rejects to `rejects/part-<index>-<j>.parquet` (j > 0 only for a block over
    rows_per_shard); returns the counts and the columns the stats need."""
    import os

    import ray

    from dpo_ray.hooks import UNIT_HOOK_ENV, named_hook

    hook = named_hook(os.environ.get(UNIT_HOOK_ENV))  # a test's hold (dpo_ray.testing.faults), before each write
    table = pa.concat_tables(ray.get(blocks))
    if duplicates:
        rows = table["row"].to_pylist()
        dup = pa.array([r in duplicates for r in rows])
        kind = pc.if_else(dup, "reject", table["kind"])
        reason = pc.if_else(dup, "duplicate", table["reason"])
        detail = pc.if_else(dup, pa.array([f"same pair_id as {duplicates.get(r)}" for r in rows]), table["detail"])
        for name, values in (("kind", kind), ("reason", reason), ("detail", detail)):
            table = table.set_column(table.schema.get_field_index(name), name, values)
    is_pair = pc.equal(table["kind"], "pair")
    kept = table.filter(is_pair)
    pairs = kept.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA)
    rejects = table.filter(pc.invert(is_pair)).select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
    for uri, part in ((output, pairs), (rejects_uri, rejects)):
        for j, start in enumerate(range(0, part.num_rows, rows_per_shard)):
            if hook is not None:
                hook("shard")
            artifacts.write_table(part.slice(start, rows_per_shard), uri, f"part-{index:05d}-{j:03d}.parquet")
    return {
        "rows": table.num_rows,
        "pairs": pairs.num_rows,
        "rejects": Counter(rejects["reason"].to_pylist()),
        "columns": {
            "prompt": pc.list_value_length(kept["prompt_ids"]).to_numpy(),
            "chosen": pc.list_value_length(kept["chosen_ids"]).to_numpy(),
            "rejected": pc.list_value_length(kept["rejected_ids"]).to_numpy(),
            "eval": pc.equal(kept["split"], "eval").to_numpy(zero_copy_only=False),
            **{n: kept[n].to_numpy(zero_copy_only=False) for n in (*_TRUNC, "boundary_merge")},
        },
    }


def _pair_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-length percentiles, truncation counts and split sizes over the shards' columns."""
    cols = {
        name: np.concatenate([p["columns"][name] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        for name in ("prompt", "chosen", "rejected", "eval", *_TRUNC, "boundary_merge")
    }
    n, n_eval = int(cols["prompt"].size), int(cols["eval"].sum())
    return {
        "tokens": {k: _percentiles(cols[k]) for k in ("prompt", "chosen", "rejected")},
        "truncated": {k.removeprefix("trunc_"): int(cols[k].sum()) for k in _TRUNC},
        # Pairs whose prompt merged with the completion at the boundary (dpo_ray.data.tokenization's fallback rule).
        "boundary_merges": int(cols["boundary_merge"].sum()),
        "splits": {"train": n - n_eval, "eval": n_eval},
    }


def _summary(manifest: Manifest, rows_in: int, output: str) -> str:
    s = manifest.stats
    tok = s["tokens"]
    lines = [
        f"prepare: {rows_in} rows in -> {manifest.rows} pairs "
        f"(train {s['splits']['train']}, eval {s['splits']['eval']}), {s['rows_rejected']} rejected",
        f"  output: {output}",
        "  tokens p50/p95/max: " + ", ".join(f"{k} {v['p50']}/{v['p95']}/{v['max']}" for k, v in tok.items()),
        "  truncated: "
        + ", ".join(f"{k} {v}" for k, v in s["truncated"].items())
        + f"; boundary merges {s.get('boundary_merges', 0)}",
    ]
    if s["rejects"]:
        lines.append(
            "  rejects: " + ", ".join(f"{k} {v}" for k, v in s["rejects"].items()) + f" (see {output}/rejects)"
        )
    return "\n".join(lines)


def run(cfg: PrepareConfig) -> Manifest:
    """Run the prepare stage (skipped when a complete artifact with this config and these inputs exists)."""
    from dpo_ray.models.loading import load_tokenizer

    files = resolve_inputs(cfg.inputs, cfg.input_type)
    upstream = stage_inputs("prepare", cfg)
    build = stage.begin("pairs", cfg, upstream, cfg.output)
    if isinstance(build, Manifest):
        return build
    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if cfg.format == "conversational" and not getattr(tokenizer, "chat_template", None):
        raise PrepareError(f"prepare.format is conversational but tokenizer {cfg.tokenizer} has no chat template")
    fingerprints = {"tokenizer": upstream["tokenizer:tokenizer"]}
    ensure_ray()
    check_pool_fits("prepare.num_actors", cfg.num_actors, 1, needs_free_cpu=True)
    console.header(
        f"prepare: {len(files)} input file(s), {cfg.format} format -> {cfg.output}; tokenizer {cfg.tokenizer}, "
        f"max_length {cfg.max_length} (prompt {cfg.max_prompt_length}), {cfg.num_actors} tokenize actor(s)"
    )
    rejects_uri = artifacts.join(cfg.output, "rejects")
    with remote_progress("prepare: tokenized", None, "rows") as counter:
        blocks = _tokenized(cfg, files, build.config, counter)
    parts = _write_shards(cfg, blocks, rejects_uri)
    rows_in, rows_out = sum(p["rows"] for p in parts), sum(p["pairs"] for p in parts)
    reject_counts = dict(sorted(sum((p["rejects"] for p in parts), Counter()).items()))
    artifacts.write_manifest(
        rejects_uri, "rejects", build.config, fingerprints, build.upstream, {"reasons": reject_counts}
    )
    if rows_out == 0:
        top = ", ".join(f"{k} {v}" for k, v in sorted(reject_counts.items(), key=lambda kv: -kv[1])[:5])
        raise PrepareError(
            f"prepare: all {rows_in} rows were rejected ({top}); see {rejects_uri}. "
            "Check prepare.columns and prepare.format against your data."
        )
    artifacts.check_shard_schemas(cfg.output, PAIRS_SCHEMA)
    stats = {"rejects": reject_counts, **_pair_stats(parts)}
    manifest = stage.finish(build, fingerprints, stats, accounting=(rows_in, rows_out, rows_in - rows_out))
    console.result(_summary(manifest, rows_in, cfg.output))
    return manifest


def _tokenized(cfg: PrepareConfig, files: list[Any], config: dict[str, Any], counter: Any) -> list[Any]:
    """Every input row through the Tokenize actors, in input order (one streaming Ray Data execution): the
    blocks' object refs, each block's rows a pair or a reject with its reason."""
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # output shards in input order, the same every run
    try:
        records = read_records(files, (cfg.columns.chosen, cfg.columns.rejected), cfg.hf_split)
        tokenized = records.map_batches(
            Tokenize,
            fn_constructor_args=(config, counter),
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.num_actors),
        )
        refs: list[Any] = tokenized.to_arrow_refs()
        return refs
    except Exception as e:
        user_error = unwrap_user_error(e, (InputError,))
        if user_error is not None:
            raise InputError(str(user_error)) from None
        raise
    finally:
        context.execution_options.preserve_order = preserve


def _write_shards(cfg: PrepareConfig, blocks: list[Any], rejects_uri: str) -> list[dict[str, Any]]:
    """The dedup (on the pairs' keys only) and the shards: consecutive blocks of at most rows_per_shard rows
    form one output shard, written by a Ray task; returns each shard's counts and stats columns."""
    import ray

    keys = ray.get([ray.remote(_keys).remote(b) for b in blocks])
    duplicates = _duplicates([k for _, k in keys]) if cfg.dedup else [{} for _ in blocks]
    groups: list[list[int]] = []
    rows = 0
    for i, (n, _) in enumerate(keys):
        if not groups or rows + n > cfg.rows_per_shard:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    finalize = ray.remote(_finalize)
    refs = [
        finalize.remote(
            g,
            [blocks[i] for i in group],
            {r: k for i in group for r, k in duplicates[i].items()},
            cfg.output,
            rejects_uri,
            cfg.rows_per_shard,
        )
        for g, group in enumerate(groups)
    ]
    return gather(refs, "prepare: written", "shards")
