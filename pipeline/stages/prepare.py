"""prepare: raw preference data → a `pairs` artifact (token ids, QA'd, split) plus `rejects/`.

One streaming Ray Data execution reads the inputs (pipeline.core.sources) and turns every record into a tokenized
pair or a reject with its reason (dpo_ray.data.tokenization; the Tokenize actors encode each batch's texts in one
tokenizer call), in input order. As each tokenized block comes out, a Ray task writes it to `<output>/.staging/`
and returns its row count and its pairs' keys (16-byte identities and positions, numpy arrays); no block waits
for the whole execution to end. The execution's blocks are at most BLOCK_BYTES and its share of the object store
STORE_BUDGET, so the reads do not run ahead of the tokenizers by more than that (a file is read as a stream:
pipeline.core.sources; benchmarks/RESULTS.md, scale.py). Then the dedup on keys only: the driver finds the repeated
pair_ids (the first in input order is kept), and Ray tasks write consecutive staged blocks as the Parquet shards
of `pairs` and `rejects` (explicit Arrow schemas), returning the columns the stats need; the staged blocks are
removed. The manifests come last.
Every input row is accounted for: rows_in == rows_out + rows_rejected, checked before the manifest is written.

With `unpaired` the rows are unpaired feedback (dpo_ray.data.unpaired) and the artifact `unpaired`: records of
(prompt, completion, label), or pairs each split into a desirable and an undesirable row (an input record is
then two rows, `<row>/chosen` and `<row>/rejected`, each kept or rejected). The dedup is by row_id, and each
shard's kept rows get their KL completions from the shard's other prompts of their split (split_partners, seeded
by prepare.seed): rows of a shard and split with no other prompt are rejected as no_kl_partner.
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
from dpo_ray.data.schema import PAIRS_SCHEMA, REJECTS_SCHEMA, UNPAIRED_SCHEMA
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
# The same for unpaired rows (kind "row"); their KL completions are assigned when the shard is written.
_UNPAIRED_TRUNC = ("trunc_prompt", "trunc_completion")
_UNPAIRED_OWN = [f for f in UNPAIRED_SCHEMA if f.name not in ("kl_completion_ids", "kl_row_id")]
UNIFIED_UNPAIRED_SCHEMA = pa.schema(
    _UNPAIRED_OWN
    + [(name, UNIFIED_SCHEMA.field(name).type) for name in ("kind", "row", "reason", "detail", "record")]
    + [(name, pa.bool_()) for name in (*_UNPAIRED_TRUNC, "boundary_merge")]
)


# Tokenized blocks being written to the staging directory at once, per tokenizer actor: the driver takes no further
# block from the execution while this many are unwritten, so the object store holds a bounded number of blocks
# (each batch_size rows), however many rows there are (benchmarks/RESULTS.md, scale.py).
STAGING_WINDOW = 4
# The largest block the execution makes (Ray Data's target_max_block_size, 128 MiB by default): an input file's
# records (streamed out as the file is read) and a tokenizer task's output are cut into blocks of this size, so the
# object store holds a few of them at a time, whatever the size of the input files or the dataset.
BLOCK_BYTES = 16 * 2**20
# The execution's share of the object store (Ray Data's resource_limits): the reads stop running ahead of the
# tokenizers once their blocks fill it (benchmarks/RESULTS.md, scale.py: 202 MiB at its peak at 100k rows read from
# one file, 256-305 MiB at a million, the staged writes in flight included).
STORE_BUDGET = 16 * BLOCK_BYTES


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
        if self.cfg.unpaired is not None:
            return self._unpaired(batch)
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

    def _unpaired(self, batch: pa.Table) -> pa.Table:
        """Unpaired rows (UNIFIED_UNPAIRED_SCHEMA): a record's one row, or a pair record's two."""
        from dpo_ray.data.tokenization import RowRejected, batch_encoded, record_to_pair, split_of
        from dpo_ray.data.unpaired import TokenizedUnpaired, pair_to_unpaired, record_to_unpaired, row_id

        c = self.cfg
        cols = [batch[k].to_pylist() for k in ("row", "source", "record", "reason", "detail")]
        todo = [i for i, reason in enumerate(cols[3]) if not reason]
        records = [json.loads(cols[2][i]) for i in todo]

        def convert(record: Any) -> list[TokenizedUnpaired]:
            if c.unpaired == "records":
                return [record_to_unpaired(record, self.pt, self.columns, c.format)]
            return list(pair_to_unpaired(record_to_pair(record, self.pt, self.columns, c.format, c.implicit_marker)))

        found = batch_encoded(self.pt, records, convert)
        by_index = dict(zip(todo, found, strict=True))
        sides = ("",) if c.unpaired == "records" else ("/chosen", "/rejected")
        rows: list[dict[str, Any]] = []
        for i, (row, source, record, reason, detail) in enumerate(zip(*cols, strict=True)):
            got = by_index.get(i)
            if isinstance(got, RowRejected):
                reason, detail = got.reason, got.detail
            for k, side in enumerate(sides):
                out: dict[str, Any] = {"row": row + side, "source": source, "record": record}
                if got is None or isinstance(got, RowRejected):
                    rows.append(out | {"kind": "reject", "reason": reason, "detail": detail})
                    continue
                u: TokenizedUnpaired = got[k]
                rows.append(
                    out
                    | {
                        "kind": "row",
                        "row_id": row_id(u.prompt, u.completion, u.label),
                        "split": split_of(u.prompt, c.eval_fraction),
                        "prompt_ids": u.prompt_ids,
                        "completion_ids": u.completion_ids,
                        "label": u.label,
                        "prompt": u.prompt,
                        "completion": u.completion,
                        "trunc_prompt": u.truncated.get("prompt", False),
                        "trunc_completion": u.truncated.get("completion", False),
                        "boundary_merge": u.boundary_merge,
                    }
                )
        if self.progress is not None:
            self.progress.add.remote(len(cols[0]))
        return pa.Table.from_pylist(rows, schema=UNIFIED_UNPAIRED_SCHEMA)


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {"p50": 0, "p95": 0, "max": 0}
    return {
        "p50": int(np.percentile(values, 50)),
        "p95": int(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def _id(block: pa.Table) -> tuple[str, str]:
    """A tokenized block's (identity column, kind of its kept rows): pairs or unpaired rows."""
    return ("row_id", "row") if "row_id" in block.column_names else ("pair_id", "pair")


def _stage(block: pa.Table, uri: str, name: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Write one tokenized block to the staging directory; its row count and keys (see _keys)."""
    artifacts.write_table(block, uri, name)
    return _keys(block)


def _block(index: int) -> str:
    """The staged file of the index-th tokenized block."""
    return f"block-{index:06d}.parquet"


def _staged(uri: str, name: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = artifacts.artifact_fs(uri)
    with fs.open(artifacts.join(path, name), "rb") as f:
        return pq.read_table(f, columns=columns, page_checksum_verification=True)


def _keys(block: pa.Table) -> tuple[int, np.ndarray, np.ndarray]:
    """A tokenized block's row count, and of its pairs (unpaired rows: row_id) the identity as 16 bytes (the 32
    hex digits of pair_id: an (n, 2) uint64 array) and the position in the block: what the dedup needs, 20 bytes
    a pair at the driver."""
    key, kept = _id(block)
    is_pair = pc.equal(block["kind"], kept).to_numpy(zero_copy_only=False)
    ids = block[key].filter(pa.array(is_pair)).to_pylist()
    digests = np.frombuffer(b"".join(bytes.fromhex(i) for i in ids), dtype=np.uint64).reshape(len(ids), 2)
    return block.num_rows, digests, np.flatnonzero(is_pair).astype(np.int32)


def _duplicates(keys: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[int, tuple[int, int]]]:
    """Per block: {position: (block, position) of the pair kept} for each pair whose identity an earlier pair holds
    (keys: each block's (digests, positions), see _keys). Of a group of equal identities the first in input order
    (blocks are in input order) is kept, wherever the others are. Numpy arrays only: 36 bytes a pair at most."""
    found: list[dict[int, tuple[int, int]]] = [{} for _ in keys]
    counts = [len(p) for _, p in keys]
    if sum(counts) < 2:
        return found
    digests = np.concatenate([d for d, _ in keys])
    blocks = np.repeat(np.arange(len(keys), dtype=np.int32), counts)
    positions = np.concatenate([p for _, p in keys])
    order = np.lexsort((positions, blocks, digests[:, 1], digests[:, 0]))
    sorted_digests = digests[order]
    same = (sorted_digests[1:] == sorted_digests[:-1]).all(axis=1)  # equal to the one before (sorted)
    del sorted_digests
    repeated = np.flatnonzero(same) + 1
    if repeated.size == 0:
        return found
    first = np.flatnonzero(np.r_[True, ~same])  # where each group of equal identities starts
    keeper = order[first[np.searchsorted(first, repeated, side="right") - 1]]
    for i, k in zip(order[repeated].tolist(), keeper.tolist(), strict=True):
        found[int(blocks[i])][int(positions[i])] = (int(blocks[k]), int(positions[k]))
    return found


def _reject(table: pa.Table, which: pa.Array, reason: str, details: pa.Array) -> pa.Table:
    """`table` with the rows where `which` is true turned into rejects with `reason` and their detail."""
    kind = pc.if_else(which, "reject", table["kind"])
    reasons = pc.if_else(which, reason, table["reason"])
    detail = pc.if_else(which, details, table["detail"])
    for name, values in (("kind", kind), ("reason", reasons), ("detail", detail)):
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _with_kl_completions(table: pa.Table, seed: int, max_length: int, rows_per_shard: int) -> pa.Table:
    """Unpaired rows of one group of blocks with their KL completions and the output shard each goes to (column
    `shard`: the kept rows, in order, cut into rows_per_shard): dpo_ray.data.unpaired.kl_assignments within each
    shard and split; a kept row without a partner becomes a no_kl_partner reject."""
    from dpo_ray.data.unpaired import kl_assignments

    kept = np.flatnonzero(pc.equal(table["kind"], "row").to_numpy(zero_copy_only=False))
    shard = np.full(table.num_rows, -1, dtype=np.int64)
    shard[kept] = np.arange(kept.size) // rows_per_shard
    take = pa.array(kept)
    ids, splits, prompts, completions = (
        table[c].take(take).to_pylist() for c in ("row_id", "split", "prompt", "completion_ids")
    )
    lengths = pc.list_value_length(table["prompt_ids"]).take(take).to_pylist()
    groups = [f"{shard[i]}/{s}" for i, s in zip(kept, splits, strict=True)]
    found = kl_assignments(ids, groups, prompts, lengths, completions, seed, max_length)
    kl_ids: list[list[int] | None] = [None] * table.num_rows
    kl_rows: list[str | None] = [None] * table.num_rows
    alone = np.zeros(table.num_rows, dtype=bool)
    for i, kl in zip(kept.tolist(), found, strict=True):
        if kl is None:
            alone[i] = True
        else:
            kl_ids[i], kl_rows[i] = kl
    table = table.append_column("kl_completion_ids", pa.array(kl_ids, UNPAIRED_SCHEMA.field("kl_completion_ids").type))
    table = table.append_column("kl_row_id", pa.array(kl_rows, pa.string()))
    table = table.append_column("shard", pa.array(shard))
    detail = pa.array([f"split {s}: no other prompt in this shard" for s in table["split"].to_pylist()], pa.string())
    return _reject(table, pa.array(alone), "no_kl_partner", detail)


def _finalize(
    index: int,
    blocks: list[tuple[str, str]],
    duplicates: dict[int, tuple[str, int]],
    output: str,
    rejects_uri: str,
    rows_per_shard: int,
    unpaired: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Output shards from consecutive tokenized blocks (staged: (directory, file)): duplicates become rejects;
    pairs go to `part-<index>-<j>.parquet`, rejects to `rejects/part-<index>-<j>.parquet` (j > 0 only for a block over
    rows_per_shard); returns the counts and the columns the stats need. unpaired: (seed, max_length) of unpaired
    rows, which get their KL completions here."""
    import os

    from dpo_ray.hooks import UNIT_HOOK_ENV, named_hook

    hook = named_hook(os.environ.get(UNIT_HOOK_ENV))  # a test's hold (dpo_ray.testing.faults), before each write
    table = pa.concat_tables([_staged(uri, name) for uri, name in blocks])
    key, kept_kind = _id(table)
    if duplicates:  # {row of the group: (staged block, position) of the pair kept}: named by its row
        kept_rows = {name: _staged(blocks[0][0], name, ["row"])["row"] for name in {b for b, _ in duplicates.values()}}
        dup = np.zeros(table.num_rows, dtype=bool)
        dup[list(duplicates)] = True
        details: list[str | None] = [None] * table.num_rows
        for i, (name, position) in duplicates.items():
            details[i] = f"same {key} as {kept_rows[name][position].as_py()}"
        table = _reject(table, pa.array(dup), "duplicate", pa.array(details, pa.string()))
    if unpaired is not None:
        table = _with_kl_completions(table, *unpaired, rows_per_shard)
    schema = PAIRS_SCHEMA if unpaired is None else UNPAIRED_SCHEMA
    is_pair = pc.equal(table["kind"], kept_kind)
    kept = table.filter(is_pair)
    pairs = kept.select(schema.names).cast(schema)
    rejects = table.filter(pc.invert(is_pair)).select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
    for uri, part in ((output, pairs), (rejects_uri, rejects)):
        if unpaired is not None and part is pairs:  # the shards the KL completions were drawn within
            shard = kept["shard"].to_numpy()
            pieces = [part.filter(pa.array(shard == j)) for j in np.unique(shard)]
        else:
            pieces = [part.slice(start, rows_per_shard) for start in range(0, part.num_rows, rows_per_shard)]
        for j, piece in enumerate(pieces):
            if hook is not None:
                hook("shard")
            artifacts.write_table(piece, uri, f"part-{index:05d}-{j:03d}.parquet")
    texts, trunc = (("chosen", "rejected"), _TRUNC) if unpaired is None else (("completion",), _UNPAIRED_TRUNC)
    return {
        "rows": table.num_rows,
        "pairs": pairs.num_rows,
        "rejects": Counter(rejects["reason"].to_pylist()),
        "columns": {
            "prompt": pc.list_value_length(kept["prompt_ids"]).to_numpy(),
            **{t: pc.list_value_length(kept[f"{t}_ids"]).to_numpy() for t in texts},
            "eval": pc.equal(kept["split"], "eval").to_numpy(zero_copy_only=False),
            **{n: kept[n].to_numpy(zero_copy_only=False) for n in (*trunc, "boundary_merge")},
            **({"label": kept["label"].to_numpy(zero_copy_only=False)} if unpaired is not None else {}),
        },
    }


def _pair_stats(parts: list[dict[str, Any]], unpaired: bool = False) -> dict[str, Any]:
    """Token-length percentiles, truncation counts and split sizes over the shards' columns (and, of unpaired
    rows, the label counts)."""
    texts, trunc = (("completion",), _UNPAIRED_TRUNC) if unpaired else (("chosen", "rejected"), _TRUNC)
    names = ("prompt", *texts, "eval", *trunc, "boundary_merge", *(("label",) if unpaired else ()))
    cols = {
        name: np.concatenate([p["columns"][name] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        for name in names
    }
    n, n_eval = int(cols["prompt"].size), int(cols["eval"].sum())
    stats = {
        "tokens": {k: _percentiles(cols[k]) for k in ("prompt", *texts)},
        "truncated": {k.removeprefix("trunc_"): int(cols[k].sum()) for k in trunc},
        # Pairs whose prompt merged with the completion at the boundary (dpo_ray.data.tokenization's fallback rule).
        "boundary_merges": int(cols["boundary_merge"].sum()),
        "splits": {"train": n - n_eval, "eval": n_eval},
    }
    if unpaired:
        desirable = int(cols["label"].sum())
        stats["labels"] = {"desirable": desirable, "undesirable": n - desirable}
    return stats


def _summary(manifest: Manifest, rows_in: int, output: str) -> str:
    s = manifest.stats
    tok = s["tokens"]
    what = (
        "pairs"
        if "labels" not in s
        else "unpaired rows ({desirable} desirable, {undesirable} undesirable)".format(**s["labels"])
    )
    lines = [
        f"prepare: {rows_in} rows in -> {manifest.rows} {what} "
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
    kind = "pairs" if cfg.unpaired is None else "unpaired"
    build = stage.begin(kind, cfg, upstream, cfg.output)
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
    staging = artifacts.join(cfg.output, ".staging")
    with remote_progress("prepare: tokenized", None, "rows") as counter:
        keys = _tokenized(cfg, files, build.config, counter, staging)
    parts = _write_shards(cfg, keys, staging, rejects_uri)
    fs, path = artifacts.artifact_fs(staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)
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
    artifacts.check_shard_schemas(cfg.output, PAIRS_SCHEMA if cfg.unpaired is None else UNPAIRED_SCHEMA)
    stats = {"rejects": reject_counts, **_pair_stats(parts, cfg.unpaired is not None)}
    manifest = stage.finish(build, fingerprints, stats, accounting=(rows_in, rows_out, rows_in - rows_out))
    console.result(_summary(manifest, rows_in, cfg.output))
    return manifest


def _tokenized(
    cfg: PrepareConfig, files: list[Any], config: dict[str, Any], counter: Any, staging: str
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Every input row through the Tokenize actors, in input order (one streaming Ray Data execution), each block
    (its rows a pair or a reject with its reason) staged as it comes out (`<staging>/block-<i>.parquet`): each
    block's row count and keys, in input order."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    options = context.execution_options
    preserve, limits, block_size = options.preserve_order, options.resource_limits, context.target_max_block_size
    options.preserve_order = True  # output shards in input order, the same every run
    set_limit = limits.object_store_memory  # a smaller limit set by the user stays
    options.resource_limits = limits.copy(object_store_memory=min(STORE_BUDGET, set_limit or float("inf")))
    context.target_max_block_size = BLOCK_BYTES
    try:
        text_columns = (
            (cfg.columns.completion,) if cfg.unpaired == "records" else (cfg.columns.chosen, cfg.columns.rejected)
        )
        records = read_records(files, text_columns, cfg.hf_split)
        tokenized = records.map_batches(
            Tokenize,
            fn_constructor_args=(config, counter),
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.num_actors),
        )
        # No CPU of its own: a write waits on storage, and the driver waits on the writes (the window below), so a
        # write must not wait for a CPU held by a read task that waits for the tokenizers' blocks to be taken.
        stage = ray.remote(num_cpus=0)(_stage)
        refs: list[Any] = []
        writing: list[Any] = []
        window = STAGING_WINDOW * cfg.num_actors
        for bundle in tokenized.iter_internal_ref_bundles():
            for block in bundle.block_refs:
                if len(writing) >= window:  # backpressure: the execution waits while its blocks are written
                    _, writing = ray.wait(writing, num_returns=len(writing) - window + 1)
                refs.append(stage.remote(block, staging, _block(len(refs))))
                writing.append(refs[-1])
        keys: list[tuple[int, np.ndarray, np.ndarray]] = gather(refs, "prepare: staged", "blocks")
        return keys
    except Exception as e:
        user_error = unwrap_user_error(e, (InputError,))
        if user_error is not None:
            raise InputError(str(user_error)) from None
        raise
    finally:
        options.preserve_order, options.resource_limits, context.target_max_block_size = preserve, limits, block_size


def _write_shards(
    cfg: PrepareConfig, keys: list[tuple[int, np.ndarray, np.ndarray]], staging: str, rejects_uri: str
) -> list[dict[str, Any]]:
    """The dedup (on the pairs' keys only) and the shards: consecutive staged blocks of at most rows_per_shard rows
    form one output shard, written by a Ray task; returns each shard's counts and stats columns."""
    import ray

    duplicates = _duplicates([(d, p) for _, d, p in keys]) if cfg.dedup else [{} for _ in keys]
    counts = [n for n, _, _ in keys]
    offsets = np.concatenate([[0], np.cumsum(counts)])  # each block's first row in the input order
    del keys[:]  # the identities are not needed any more (the caller's list: its memory is freed now)
    groups: list[list[int]] = []
    rows = 0
    for i, n in enumerate(counts):
        if not groups or rows + n > cfg.rows_per_shard:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    finalize = ray.remote(_finalize)
    refs = [
        finalize.remote(
            g,
            [(staging, _block(i)) for i in group],
            {
                int(offsets[i] - offsets[group[0]]) + p: (_block(b), k)
                for i in group
                for p, (b, k) in duplicates[i].items()
            },
            cfg.output,
            rejects_uri,
            cfg.rows_per_shard,
            None if cfg.unpaired is None else (cfg.seed, cfg.max_length),
        )
        for g, group in enumerate(groups)
    ]
    return gather(refs, "prepare: written", "shards")
