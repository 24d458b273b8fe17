"""generate (on-policy): a policy samples n completions per prompt with vLLM, a reward scores them, and
pairs are formed per prompt → a `generations` artifact and a `pairs` artifact that reference/train take.

Prompts are the unique train-split prompts of a `pairs` artifact (their stored ids, so the tokenization
rule holds). Each prompt's request has its own seed (the config seed mixed with the prompt id), so a rerun
samples the same completions. Rewards are checked (count, NaN) and nothing is paired from partial scores.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray import artifacts
from dpo_ray.artifacts import Manifest
from dpo_ray.schema import GENERATIONS_SCHEMA, PAIRS_SCHEMA
from pipeline import stage
from pipeline.config import GenerateConfig
from pipeline.runtime import engine_spec, ensure_ray, matching_tokenizer, unwrap_user_error, write_dataset

logger = logging.getLogger(__name__)

__all__ = ["run"]


def generation_stops(model: str) -> set[int]:
    """The token ids in the model's generation_config.json `eos_token_id` (instruct models list the end of
    turn there beside EOS), or none."""
    import json
    import os

    from dpo_ray.models import resolve_model_dir

    path = os.path.join(resolve_model_dir(model), "generation_config.json")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def unique_prompts(uri: str, manifest: Manifest, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Unique prompts (by text) of one split of a `pairs` artifact, ordered by prompt id; 3 columns are read."""
    from dpo_ray.tokenization import pair_id

    fs, path = artifacts.artifact_fs(uri)
    seen: dict[str, dict[str, Any]] = {}
    for shard in manifest.shards:
        with fs.open(artifacts.join(path, shard.file), "rb") as f:
            table = pq.read_table(f, columns=["prompt", "prompt_ids", "split"])
        for row in table.to_pylist():
            if row["split"] == split and row["prompt"] not in seen:
                pid = pair_id(row["prompt"], "", "")
                seen[row["prompt"]] = {"prompt_id": pid, "prompt": row["prompt"], "prompt_ids": row["prompt_ids"]}
    prompts = sorted(seen.values(), key=lambda r: r["prompt_id"])
    return prompts[:limit] if limit else prompts


class Sample:
    """Ray Data actor: prompts → n sampled completions each (one vLLM engine per actor)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from dpo_ray.engine import make_engine
        from dpo_ray.models import load_tokenizer

        self.cfg = GenerateConfig.model_validate(cfg)
        self.llm = make_engine(engine_spec(self.cfg, self.cfg.policy, enable_prefix_caching=True))
        self.tok = load_tokenizer(self.cfg.policy, self.cfg.trust_remote_code)
        # What a finished sample ends with: the chat template's end of turn where the tokenizer has a template
        # (the prompts were rendered with it), else EOS; any of the model's stop tokens counts as an ending.
        from dpo_ray.tokenization import end_of_turn_id

        self.stop = end_of_turn_id(self.tok) or self.tok.eos_token_id
        self.stops = {self.stop, self.tok.eos_token_id, *generation_stops(self.cfg.policy)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from dpo_ray.engine import sample

        rows = batch.to_pylist()
        seeds = [(self.cfg.seed * 1_000_003 + int(r["prompt_id"][:8], 16)) % 2**31 for r in rows]
        c = self.cfg
        results = sample(self.llm, [r["prompt_ids"] for r in rows], c.n, c.temperature, c.top_p, c.max_tokens, seeds)
        out = []
        for r, samples in zip(rows, results, strict=True):
            for i, s in enumerate(samples):
                ids = list(s.completion_ids)
                if s.finish_reason == "stop" and (not ids or ids[-1] not in self.stops):
                    ids.append(self.stop)  # the one rule: a completion that ended ends with its stop token
                text = self.tok.decode(ids, skip_special_tokens=True)
                out.append(
                    {
                        **r,
                        "completion_ids": ids,
                        "completion": text,
                        "sample_index": i,
                        "reward": math.nan,
                        "policy_logp": s.logp,
                        "finish_reason": s.finish_reason,
                    }
                )
        return pa.Table.from_pylist(out, schema=GENERATIONS_SCHEMA)


class Reward:
    """Ray Data actor: fills the `reward` column with the configured reward function (loaded once)."""

    def __init__(self, spec: str) -> None:
        from dpo_ray.rewards import load_reward

        self.spec, self.fn = spec, load_reward(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from dpo_ray.rewards import score

        values = score(self.fn, self.spec, batch["prompt"].to_pylist(), batch["completion"].to_pylist())
        return batch.set_column(batch.schema.get_field_index("reward"), "reward", pa.array(values, pa.float64()))


def _pair_group(cfg: dict[str, Any]) -> Any:
    c = GenerateConfig.model_validate(cfg)

    def fn(group: pa.Table) -> pa.Table:
        from dpo_ray.pairing import pair_samples
        from dpo_ray.tokenization import pair_id, split_of

        rows = sorted(group.to_pylist(), key=lambda r: r["sample_index"])
        result = pair_samples(
            [r["completion_ids"] for r in rows],
            [r["reward"] for r in rows],
            c.strategy,
            c.margin,
            c.max_pairs_per_prompt,
        )
        out = []
        for hi, lo in result.pairs:
            chosen, rejected = rows[hi], rows[lo]
            pid = pair_id(chosen["prompt"], chosen["completion"], rejected["completion"])
            out.append(
                {
                    "pair_id": pid,
                    "split": split_of(pid, c.eval_fraction),
                    "prompt_ids": chosen["prompt_ids"],
                    "chosen_ids": chosen["completion_ids"],
                    "rejected_ids": rejected["completion_ids"],
                    "prompt": chosen["prompt"],
                    "chosen": chosen["completion"],
                    "rejected": rejected["completion"],
                    "source": f"generate:{c.policy}",
                    "ties": 0,
                    "identical": 0,
                }
            )
        if not out:  # keep the counts of a prompt that produced no pair in one marker row
            out.append({k: None for k in PAIRS_SCHEMA.names} | {"ties": 0, "identical": 0})
        out[0]["ties"], out[0]["identical"] = result.ties, result.identical
        schema = pa.schema(list(PAIRS_SCHEMA) + [("ties", pa.int64()), ("identical", pa.int64())])
        return pa.Table.from_pylist(out, schema=schema)

    return fn


def run(cfg: GenerateConfig) -> Manifest:
    """Sample, score, pair; skipped when both outputs are complete for this config and these prompts."""
    import ray
    from ray.data import ActorPoolStrategy

    from dpo_ray.models import model_fingerprint, resolve_model_dir
    from dpo_ray.rewards import RewardError

    prompts_manifest = artifacts.require_complete(cfg.prompts, "pairs")
    upstream = {"prompts": artifacts.manifest_sha256(cfg.prompts)}
    build = stage.begin("pairs", cfg, upstream, cfg.output, also_clear=(cfg.generations,))
    if isinstance(build, Manifest):
        return build
    config = build.config
    tok_fp = matching_tokenizer(cfg.policy, prompts_manifest, cfg.prompts, cfg.trust_remote_code)
    fingerprints = {"tokenizer": tok_fp, "model": model_fingerprint(resolve_model_dir(cfg.policy))}
    prompts = unique_prompts(cfg.prompts, prompts_manifest, "train", cfg.max_prompts)
    ensure_ray()
    t0 = time.perf_counter()
    vllm_resources: dict[str, Any] = {
        "num_gpus": cfg.num_gpus_per_actor or None,
        "num_cpus": cfg.num_cpus_per_actor,
        "accelerator_type": cfg.accelerator_type,
    }
    try:
        generations = (
            ray.data.from_items(prompts)
            .map_batches(
                Sample,
                fn_constructor_args=(config,),
                batch_format="pyarrow",
                batch_size=256,
                compute=ActorPoolStrategy(size=cfg.num_actors),
                **vllm_resources,
            )
            .map_batches(
                Reward,
                fn_constructor_args=(cfg.reward,),
                batch_format="pyarrow",
                batch_size=256,
                compute=ActorPoolStrategy(size=1),
            )
            .materialize()
        )
    except Exception as e:
        found = unwrap_user_error(e, (RewardError,))
        if found is not None:
            raise RewardError(str(found)) from None
        raise
    write_dataset(generations, cfg.generations, GENERATIONS_SCHEMA, 100_000)
    rewards = np.concatenate([b["reward"] for b in generations.select_columns(["reward"]).iter_batches()])
    gen_stats = {
        "prompts": len(prompts),
        "samples": int(rewards.size),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
    }
    artifacts.write_manifest(cfg.generations, "generations", config, fingerprints, upstream, gen_stats)
    paired = generations.groupby("prompt_id").map_groups(_pair_group(config), batch_format="pyarrow").materialize()
    counts = {"ties": 0, "identical": 0}
    for b in paired.select_columns(["ties", "identical"]).iter_batches(batch_format="numpy"):
        counts = {k: counts[k] + int(b[k].sum()) for k in counts}
    pairs = paired.filter(lambda r: r["pair_id"] is not None).select_columns(PAIRS_SCHEMA.names).materialize()
    n_pairs = pairs.count()
    if n_pairs == 0:
        raise artifacts.ArtifactError(f"generate: no pairs from {len(prompts)} prompts (ties {counts['ties']})")
    write_dataset(pairs, cfg.output, PAIRS_SCHEMA, 100_000)
    artifacts.check_shard_schemas(cfg.output, PAIRS_SCHEMA)
    n_eval = pairs.filter(lambda r: r["split"] == "eval").count()
    stats = {
        **gen_stats,
        "rows_out": n_pairs,
        "splits": {"train": n_pairs - n_eval, "eval": n_eval},
        "ties_dropped": counts["ties"],
        "identical_dropped": counts["identical"],
        "strategy": cfg.strategy,
        "seconds": time.perf_counter() - t0,
    }
    stats["lineage"] = {"policy": cfg.policy, "generations": artifacts.manifest_sha256(cfg.generations)}
    manifest = stage.finish(build, fingerprints, stats)
    print(
        f"generate: {len(prompts)} prompts x {cfg.n} samples, reward mean {gen_stats['reward_mean']:.3f}; "
        f"{n_pairs} pairs ({counts['ties']} ties dropped) -> {cfg.output}",
        flush=True,
    )
    return manifest
