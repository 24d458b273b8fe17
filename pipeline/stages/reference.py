"""reference: a `pairs` artifact → a `scored` artifact with the frozen reference model's per-token log-probs
(an `unpaired` artifact → `scored_unpaired`: each row's completion and KL completion scored after its prompt, as a
pair's chosen and rejected are).

The input's shards are cut into units of `rows_per_unit` pairs. A pool of actors (pipeline.core.units; one vLLM engine
per actor, created once; or a transformers model with `backend: hf`) scores unit after unit and writes each
unit's output shard itself, atomically, under a deterministic name. A unit lost with its actor (a node died)
is scored again by a restarted actor, and counted; a rerun after a crash scores only the units whose shard is
missing, so completed work is never redone and no pair is duplicated or lost.

After scoring, a parity gate re-scores a sample of pairs with a transformers forward through
dpo_ray.compute.logps and fails the stage when the per-token difference exceeds the tolerance: the guard against
vLLM-vs-transformers log-prob drift. The manifest is written only when everything above passed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import Manifest, ShardInfo
from dpo_ray.data.schema import KINDS, REJECTS_SCHEMA, SCORED_KIND, SEQUENCE_COLUMNS
from dpo_ray.errors import UserError
from pipeline.config import ReferenceConfig
from pipeline.core import console, stage
from pipeline.core.engines import engine_key, engine_spec
from pipeline.core.inputs import matching_tokenizer, stage_inputs
from pipeline.core.runtime import ensure_ray
from pipeline.core.units import UnitsResult, actor_bundle, describe, make_room, run_units

logger = logging.getLogger(__name__)

__all__ = ["ParityError", "run"]


class ParityError(UserError, RuntimeError):
    """vLLM's reference log-probs disagree with a transformers forward beyond the tolerance."""


# Per input kind: the id column, the text columns a reject keeps, and the two sequences scored after each row's
# prompt (dpo_ray.data.schema.SEQUENCE_COLUMNS).
_ID = {"pairs": "pair_id", "unpaired": "row_id"}
_TEXTS = {"pairs": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label", "kl_row_id")}
_SIDES = SEQUENCE_COLUMNS


def _units(manifest: Manifest, rows_per_unit: int) -> list[dict[str, Any]]:
    units = []
    for index, shard in enumerate(manifest.shards):
        for start in range(0, shard.rows, rows_per_unit):
            units.append(
                {
                    "shard": json.dumps(asdict(shard)),
                    "start": start,
                    "stop": min(shard.rows, start + rows_per_unit),
                    "name": f"part-{index:05d}-{start:09d}.parquet",
                    "kind": manifest.kind,
                }
            )
    return units


def _engine(cfg: ReferenceConfig) -> tuple[Any, ...] | None:
    """What the pool's actors share with other stages (pipeline.core.units.sharing): the vLLM engine; nothing for HF."""
    return engine_key(cfg, cfg.model) if cfg.backend == "vllm" else None


class ScoreUnits:
    """The pool's unit handler: scores units (shard/start/stop/name) and writes their shards."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = ReferenceConfig.model_validate(cfg)
        self.cache: tuple[str, pa.Table] | None = None
        if self.cfg.backend == "vllm":
            from dpo_ray.models.engine import shared_engine

            self.llm = shared_engine(engine_spec(self.cfg, self.cfg.model))
        else:
            from dpo_ray.models.loading import load_causal_lm, load_tokenizer

            self.model = load_causal_lm(self.cfg.model, self.cfg.dtype, self.cfg.trust_remote_code)
            self.pad = load_tokenizer(self.cfg.model, self.cfg.trust_remote_code).pad_token_id
            if _cuda():
                self.model.cuda()

    def _shard(self, shard: str) -> pa.Table:
        """The input shard (a ShardInfo as JSON), read and verified once per actor while its units run."""
        if self.cache is None or self.cache[0] != shard:
            self.cache = (shard, artifacts.read_shard(self.cfg.pairs, ShardInfo(**json.loads(shard))))
        return self.cache[1]

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        if self.cfg.backend == "vllm":
            from dpo_ray.models.engine import score_completions

            return score_completions(self.llm, prompts, completions)
        from dpo_ray.compute.batching import completion_logps

        return completion_logps(self.model, prompts, completions, self.pad, self.cfg.hf_token_budget)

    def unit(self, shard: str, start: int, stop: int, name: str, kind: str = "pairs") -> dict[str, Any]:
        t0 = time.perf_counter()
        table = self._shard(shard).slice(start, stop - start)
        rows = table.to_pylist()
        limit = self.cfg.max_model_len - 1  # vLLM needs room for the one token it generates
        (first, *first_out), (second, *second_out) = _SIDES[kind]
        rid = _ID[kind]
        keep, rejects = [], []
        for r in rows:
            longest = len(r["prompt_ids"]) + max(len(r[first]), len(r[second]))
            if longest > limit:
                detail = f"{longest} tokens > max_model_len - 1 = {limit}"
                record = json.dumps({k: r[k] for k in (rid, *_TEXTS[kind])})
                rejects.append({"row": r[rid], "reason": "too_long", "detail": detail, "record": record})
            else:
                keep.append(r)
        prompts = [r["prompt_ids"] for r in keep]
        scores = self.score(prompts * 2, [r[first] for r in keep] + [r[second] for r in keep])
        for i, r in enumerate(keep):
            for (logps, total), found in ((first_out, scores[i]), (second_out, scores[len(keep) + i])):
                r.update({logps: found, total: float(np.sum(found, dtype=np.float64))})
        out_uri = self.cfg.output
        artifacts.write_table(
            pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), artifacts.join(out_uri, "rejects"), name
        )
        schema = KINDS[SCORED_KIND[kind]]
        artifacts.write_table(pa.Table.from_pylist(keep, schema=schema), out_uri, name)  # last: "done"
        tokens = sum(len(p) * 2 + len(r[first]) + len(r[second]) for p, r in zip(prompts, keep, strict=True))
        seconds = time.perf_counter() - t0
        logger.info("reference: %s: %d rows, %d tokens in %.1fs", name, len(keep), tokens, seconds)
        return {"name": name, "rows": len(keep), "rejected": len(rejects), "tokens": tokens, "seconds": seconds}

    def __call__(self, unit: dict[str, Any]) -> dict[str, Any]:
        return self.unit(unit["shard"], unit["start"], unit["stop"], unit["name"], unit.get("kind", "pairs"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parity_check(cfg: dict[str, Any], sample: list[dict[str, Any]], kind: str = "pairs") -> dict[str, Any]:
    """Re-score `sample` (scored rows of the input kind `kind`) with a transformers forward; max/mean |difference|
    per token and sequence."""
    from dpo_ray.compute.batching import completion_logps
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer

    c = ReferenceConfig.model_validate(cfg)
    model = load_causal_lm(c.model, c.dtype, c.trust_remote_code)
    if _cuda():
        model.cuda()
    pad = load_tokenizer(c.model, c.trust_remote_code).pad_token_id
    (first, first_logps, _), (second, second_logps, _) = _SIDES[kind]
    prompts = [r["prompt_ids"] for r in sample] * 2
    completions = [r[first] for r in sample] + [r[second] for r in sample]
    stored = [r[first_logps] for r in sample] + [r[second_logps] for r in sample]
    hf = completion_logps(model, prompts, completions, pad, c.hf_token_budget)
    token_diffs = np.concatenate(
        [np.abs(np.asarray(a, np.float64) - np.asarray(b)) for a, b in zip(hf, stored, strict=True)]
    )
    seq_diffs = np.array([abs(np.sum(a) - np.sum(np.asarray(b, np.float64))) for a, b in zip(hf, stored, strict=True)])
    return {
        "pairs": len(sample),
        "token_max_abs": float(token_diffs.max()),
        "token_mean_abs": float(token_diffs.mean()),
        "sequence_max_abs": float(seq_diffs.max()),
        "sequence_mean_abs": float(seq_diffs.mean()),
    }


def _parity_sample(output: str, k: int) -> list[dict[str, Any]]:
    fs, path = artifacts.artifact_fs(output)
    rows: list[dict[str, Any]] = []
    for name in artifacts.list_shards(output):
        if len(rows) >= k:
            break
        with fs.open(artifacts.join(path, name), "rb") as f:
            rows += pq.read_table(f, page_checksum_verification=True).slice(0, k - len(rows)).to_pylist()
    return rows


def run(cfg: ReferenceConfig) -> Manifest:
    """Run the reference stage; resumes an interrupted run, skips a complete one."""
    pairs_manifest = artifacts.require_complete(cfg.pairs, tuple(SCORED_KIND))
    upstream = stage_inputs("reference", cfg)
    build = stage.begin(SCORED_KIND[pairs_manifest.kind], cfg, upstream, cfg.output, resumable=True)
    if isinstance(build, Manifest):
        return build
    fingerprints = {
        "tokenizer": matching_tokenizer(upstream["tokenizer:model"], cfg.model, pairs_manifest, cfg.pairs),
        "model": upstream["model:model"],
    }
    units = _units(pairs_manifest, cfg.rows_per_unit)
    done = set(artifacts.list_shards(cfg.output))
    pending = [u for u in units if u["name"] not in done]
    bundle = actor_bundle(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.accelerator_type)
    console.header(
        f"reference: {cfg.pairs} ({pairs_manifest.rows} {pairs_manifest.kind} rows, {len(units)} units of <= "
        f"{cfg.rows_per_unit}, "
        f"{len(pending)} to score) -> {cfg.output}; model {cfg.model} ({cfg.backend}, {cfg.dtype}), "
        f"{cfg.num_actors} actor(s) x {{{describe(bundle)}}}"
    )
    t0 = time.perf_counter()
    ran = UnitsResult([], 0)
    if pending:
        ensure_ray()
        ran = run_units(ScoreUnits, pending, build.config, cfg, engine=_engine(cfg))
    seconds = time.perf_counter() - t0
    return _finish(cfg, build, fingerprints, pairs_manifest, units, ran, seconds)


def _finish(
    cfg: ReferenceConfig,
    build: stage.Build,
    fingerprints: dict[str, str],
    pairs_manifest: Manifest,
    units: list[dict[str, Any]],
    ran: UnitsResult,
    seconds: float,
) -> Manifest:
    import ray

    summaries = ran.summaries
    names = [u["name"] for u in units]
    missing = sorted(set(names) - set(artifacts.list_shards(cfg.output)))
    if missing:
        raise RuntimeError(f"reference: units {missing[:5]} produced no shard; rerun to resume")
    rejects_uri = artifacts.join(cfg.output, "rejects")
    scored_shards = [s for s in artifacts.shard_infos(cfg.output) if s.file in set(names)]
    reject_shards = [s for s in artifacts.shard_infos(rejects_uri) if s.file in set(names)]
    rows_out, rows_rejected = sum(s.rows for s in scored_shards), sum(s.rows for s in reject_shards)
    config = build.config
    artifacts.check_shard_schemas(cfg.output, KINDS[build.kind])  # a scored kind holds every input column
    parity: dict[str, Any] = {"skipped": "backend hf is itself the transformers forward"}
    if cfg.backend == "vllm" and cfg.parity_samples > 0 and rows_out > 0:
        # Ray as the stage starts it, also on a resume with every unit already scored: ray.remote would otherwise
        # init Ray itself and join whatever Ray cluster runs on this machine (found with two runs side by side).
        ensure_ray()
        # The task needs a CPU that actors kept for later stages may hold (with a gate, round r's evaluation
        # engines are kept through round r+1's reference): they make room, or the task waits forever.
        make_room(actor_bundle(1, cfg.num_gpus_per_actor, cfg.accelerator_type), 1)
        sample = _parity_sample(cfg.output, cfg.parity_samples)
        task = ray.remote(parity_check).options(
            num_gpus=cfg.num_gpus_per_actor or None, num_cpus=1, accelerator_type=cfg.accelerator_type
        )
        measured: dict[str, Any] = ray.get(task.remote(config, sample, pairs_manifest.kind))
        parity = {**measured, "tolerance": cfg.tolerance}
        logger.info(
            "reference: parity vs transformers on %d pairs: per-token max %.2e (tolerance %.0e), mean %.2e",
            parity["pairs"],
            parity["token_max_abs"],
            cfg.tolerance,
            parity["token_mean_abs"],
        )
        if parity["token_max_abs"] > cfg.tolerance:
            raise ParityError(
                f"reference log-probs from vLLM differ from a transformers forward by up to "
                f"{parity['token_max_abs']:.3g} per token (> parity_tolerance {cfg.tolerance:g}); the `scored` "
                f"shards are kept but the artifact is not marked complete. Check dtype, the model, or raise "
                f"reference.parity_tolerance if this precision is expected."
            )
    tokens = sum(s["tokens"] for s in summaries)
    stats = {
        "rejects": {"too_long": rows_rejected} if rows_rejected else {},
        "parity": parity,
        "units": len(units),
        "units_scored_this_run": len(summaries),
        "units_retried_this_run": ran.retried,
        "tokens_scored_this_run": tokens,
        "tokens_per_sec_this_run": tokens / seconds if summaries and seconds > 0 else None,
        "backend": cfg.backend,
    }
    artifacts.write_manifest(rejects_uri, "rejects", config, fingerprints, build.upstream, {}, shards=reject_shards)
    accounting = (pairs_manifest.rows, rows_out, rows_rejected)
    manifest = stage.finish(build, fingerprints, stats, accounting=accounting, shards=scored_shards)
    console.result(
        f"reference: {pairs_manifest.rows} {pairs_manifest.kind} rows -> {rows_out} scored, {rows_rejected} "
        "rejected (too_long); "
        f"{len(summaries)}/{len(units)} units scored this run, {tokens} tokens in {seconds:.1f}s -> {cfg.output}"
    )
    return manifest
