"""prepare: raw preference data → a `pairs` artifact (token ids, QA'd, split) plus `rejects/`.

Reads files or datasets with Ray Data (pipeline.sources), turns every record into a tokenized pair or a
reject with a reason (dpo_ray.tokenization) in a Ray Data actor pool, removes exact duplicates, and
writes Parquet shards with explicit Arrow schemas, then the manifests (last). Every input row is
accounted for: rows_in == rows_out + rows_rejected, checked before the manifest is written.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_ray import artifacts
from dpo_ray.artifacts import Manifest
from dpo_ray.errors import UserError
from dpo_ray.schema import PAIRS_SCHEMA, REJECTS_SCHEMA
from pipeline import console, stage
from pipeline.config import PrepareConfig
from pipeline.runtime import check_pool_fits, ensure_ray, unwrap_user_error, write_dataset
from pipeline.sources import InputError, inputs_fingerprint, read_records, resolve_inputs

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

    def __init__(self, cfg: dict[str, Any]) -> None:
        from dpo_ray.models import load_tokenizer
        from dpo_ray.tokenization import PairTokenizer

        self.cfg = PrepareConfig.model_validate(cfg)
        tok = load_tokenizer(self.cfg.tokenizer, trust_remote_code=self.cfg.trust_remote_code)
        self.pt = PairTokenizer(
            tok, self.cfg.max_length, self.cfg.max_prompt_length, self.cfg.truncation, self.cfg.max_text_chars
        )
        self.columns = self.cfg.columns.model_dump()

    def one(self, row: str, source: str, record: str, reason: str, detail: str) -> dict[str, Any]:
        from dpo_ray.tokenization import RowRejected, pair_id, record_to_pair, split_of

        out: dict[str, Any] = {"row": row, "source": source, "record": record}
        if not reason:
            try:
                p = record_to_pair(json.loads(record), self.pt, self.columns, self.cfg.format, self.cfg.implicit_marker)
                pid = pair_id(p.prompt, p.chosen, p.rejected)
                out.update(
                    kind="pair",
                    pair_id=pid,
                    split=split_of(pid, self.cfg.eval_fraction),
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
                return out
            except RowRejected as e:
                reason, detail = e.reason, e.detail
        out.update(kind="reject", reason=reason, detail=detail)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = [batch[c].to_pylist() for c in ("row", "source", "record", "reason", "detail")]
        rows = [self.one(*values) for values in zip(*cols, strict=True)]
        return pa.Table.from_pylist(rows, schema=UNIFIED_SCHEMA)


def _dedupe(group: pa.Table) -> pa.Table:
    """One pair_id group: keep the row with the smallest row id, the rest become `duplicate` rejects."""
    if group.num_rows == 1:
        return group
    group = group.sort_by("row")
    kept = group["row"][0].as_py()
    rest = group.slice(1)
    n = rest.num_rows
    for name, values in (
        ("kind", pa.array(["reject"] * n)),
        ("reason", pa.array(["duplicate"] * n)),
        ("detail", pa.array([f"same pair_id as {kept}"] * n)),
    ):
        rest = rest.set_column(rest.schema.get_field_index(name), name, values)
    return pa.concat_tables([group.slice(0, 1), rest])


def _select(kind: str, columns: list[str]) -> Any:
    def fn(t: pa.Table) -> pa.Table:
        return t.filter(pc.equal(t["kind"], kind)).select(columns)

    return fn


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {"p50": 0, "p95": 0, "max": 0}
    return {
        "p50": int(np.percentile(values, 50)),
        "p95": int(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def _pair_stats(pairs_full: Any) -> dict[str, Any]:
    """Token-length percentiles, truncation counts and split sizes, streamed from the pairs dataset."""

    def lengths(t: pa.Table) -> pa.Table:
        return pa.table(
            {
                "prompt": pc.list_value_length(t["prompt_ids"]),
                "chosen": pc.list_value_length(t["chosen_ids"]),
                "rejected": pc.list_value_length(t["rejected_ids"]),
                "eval": pc.equal(t["split"], "eval"),
                **{name: t[name] for name in (*_TRUNC, "boundary_merge")},
            }
        )

    parts: dict[str, list[np.ndarray]] = {}
    for batch in pairs_full.map_batches(lengths, batch_format="pyarrow").iter_batches(batch_format="numpy"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(np.asarray(values))
    cols = {name: np.concatenate(v) for name, v in parts.items()}
    empty = np.zeros(0, dtype=np.int64)
    n_eval = int(cols.get("eval", empty).sum())
    n = int(cols.get("prompt", empty).size)
    return {
        "tokens": {k: _percentiles(cols.get(k, empty)) for k in ("prompt", "chosen", "rejected")},
        "truncated": {k.removeprefix("trunc_"): int(cols.get(k, empty).sum()) for k in _TRUNC},
        # Pairs whose prompt merged with the completion at the boundary (dpo_ray.tokenization's fallback rule).
        "boundary_merges": int(cols.get("boundary_merge", empty).sum()),
        "splits": {"train": n - n_eval, "eval": n_eval},
    }


def _reject_counts(rejects_ds: Any) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for batch in rejects_ds.select_columns(["reason"]).iter_batches(batch_format="pyarrow"):
        counts.update(batch["reason"].to_pylist())
    return dict(sorted(counts.items()))


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
    from dpo_ray.models import load_tokenizer, tokenizer_fingerprint

    files = resolve_inputs(cfg.inputs, cfg.input_type)
    build = stage.begin("pairs", cfg, {"inputs": inputs_fingerprint(files)}, cfg.output)
    if isinstance(build, Manifest):
        return build
    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if cfg.format == "conversational" and not getattr(tokenizer, "chat_template", None):
        raise PrepareError(f"prepare.format is conversational but tokenizer {cfg.tokenizer} has no chat template")
    fingerprints = {"tokenizer": tokenizer_fingerprint(tokenizer)}
    ensure_ray()
    check_pool_fits("prepare.num_actors", cfg.num_actors, 1, needs_free_cpu=True)
    unified = _tokenized(cfg, files, build.config)
    rows_in = unified.count()
    pairs_full, rejects = _deduplicated(cfg, unified, rows_in)
    rows_out, rows_rejected = pairs_full.count(), rejects.count()
    rejects_uri = artifacts.join(cfg.output, "rejects")
    reject_counts = _reject_counts(rejects)
    if rows_rejected:
        write_dataset(rejects, rejects_uri, REJECTS_SCHEMA, cfg.rows_per_shard)
    artifacts.write_manifest(
        rejects_uri, "rejects", build.config, fingerprints, build.upstream, {"reasons": reject_counts}
    )
    if rows_out == 0:
        top = ", ".join(f"{k} {v}" for k, v in sorted(reject_counts.items(), key=lambda kv: -kv[1])[:5])
        raise PrepareError(
            f"prepare: all {rows_in} rows were rejected ({top}); see {rejects_uri}. "
            "Check prepare.columns and prepare.format against your data."
        )
    write_dataset(pairs_full.select_columns(PAIRS_SCHEMA.names), cfg.output, PAIRS_SCHEMA, cfg.rows_per_shard)
    artifacts.check_shard_schemas(cfg.output, PAIRS_SCHEMA)
    stats = {"rejects": reject_counts, **_pair_stats(pairs_full)}
    manifest = stage.finish(build, fingerprints, stats, accounting=(rows_in, rows_out, rows_rejected))
    console.result(_summary(manifest, rows_in, cfg.output))
    return manifest


def _tokenized(cfg: PrepareConfig, files: list[Any], config: dict[str, Any]) -> Any:
    """Every input row through the Tokenize actors: one unified row each (a pair, or a reject with its reason)."""
    from ray.data import ActorPoolStrategy

    try:
        records = read_records(files, (cfg.columns.chosen, cfg.columns.rejected), cfg.hf_split)
        return records.map_batches(
            Tokenize,
            fn_constructor_args=(config,),
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.num_actors),
        ).materialize()
    except Exception as e:
        user_error = unwrap_user_error(e, (InputError,))
        if user_error is not None:
            raise InputError(str(user_error)) from None
        raise


def _deduplicated(cfg: PrepareConfig, unified: Any, rows_in: int) -> tuple[Any, Any]:
    """(pairs, rejects), materialized: duplicates by pair_id (when dedup is on) become rejects."""
    pairs_all = unified.map_batches(_select("pair", UNIFIED_SCHEMA.names), batch_format="pyarrow")
    rejects_parts = [unified.map_batches(_select("reject", REJECTS_SCHEMA.names), batch_format="pyarrow")]
    if cfg.dedup:
        # One hash partition per ~50k pairs: Ray's default (200) costs more than it saves on small inputs.
        partitions = max(1, min(200, rows_in // 50_000 + 1))
        grouped = pairs_all.groupby("pair_id", num_partitions=partitions)
        deduped = grouped.map_groups(_dedupe, batch_format="pyarrow").materialize()
        pairs_full = deduped.map_batches(_select("pair", UNIFIED_SCHEMA.names), batch_format="pyarrow")
        rejects_parts.append(deduped.map_batches(_select("reject", REJECTS_SCHEMA.names), batch_format="pyarrow"))
    else:
        pairs_full = pairs_all
    rejects = rejects_parts[0].union(*rejects_parts[1:]) if len(rejects_parts) > 1 else rejects_parts[0]
    return pairs_full.materialize(), rejects.materialize()
