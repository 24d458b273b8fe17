"""generate (on-policy): a policy samples n completions per prompt with vLLM, a reward scores them, and
pairs are formed per prompt → a `generations` artifact and a `pairs` artifact that reference/train take. With
`unpaired` set, the samples are labelled desirable or not instead (from the pairs, or by a reward threshold) and
written as an `unpaired` artifact, each row with a KL completion of another prompt of its unit and split.

Prompts are the unique train-split prompts of a `pairs` artifact (their stored ids, so the tokenization
rule holds). Each prompt's request has its own seed (the config seed mixed with the prompt id), so a rerun
samples the same completions. Rewards are checked (count, NaN) and nothing is paired from partial scores.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import Manifest
from dpo_ray.data.schema import GENERATIONS_SCHEMA, KINDS
from pipeline.config import GenerateConfig
from pipeline.core import console, stage
from pipeline.core.engines import engine_key, engine_spec
from pipeline.core.inputs import matching_tokenizer, stage_inputs
from pipeline.core.prompts import prompt_index, read_unit, unit_names, write_plan
from pipeline.core.runtime import ensure_ray
from pipeline.core.units import actor_bundle, describe, run_units

logger = logging.getLogger(__name__)

__all__ = ["run"]


def generation_stops(model: str) -> set[int]:
    """The token ids in the model's generation_config.json `eos_token_id` (instruct models list the end of
    turn there beside EOS), or none."""
    import os

    from dpo_ray.models.loading import resolve_model_dir

    path = os.path.join(resolve_model_dir(model), "generation_config.json")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


class GenerateUnits:
    """The pool's unit handler: one vLLM engine and the reward, loaded once; each unit of prompts is sampled, scored
    and paired, and its shards written: generations, the unit's counts, then its pairs (last: "done")."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from dpo_ray.data.tokenization import end_of_turn_id
        from dpo_ray.models.engine import shared_engine
        from dpo_ray.models.loading import load_tokenizer
        from dpo_ray.models.rewards import load_reward

        self.cfg = GenerateConfig.model_validate(cfg)
        self.llm = shared_engine(engine_spec(self.cfg, self.cfg.policy))
        self.tok = load_tokenizer(self.cfg.policy, self.cfg.trust_remote_code)
        # What a finished sample ends with: the chat template's end of turn where the tokenizer has a template
        # (the prompts were rendered with it), else EOS; any of the model's stop tokens counts as an ending.
        self.stop = end_of_turn_id(self.tok) or self.tok.eos_token_id
        self.stops = {self.stop, self.tok.eos_token_id, *generation_stops(self.cfg.policy)}
        self.reward = load_reward(self.cfg.reward)

    def sample(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """n samples per prompt, each request seeded by (config seed, prompt id): independent of the units."""
        from dpo_ray.models.engine import sample

        c = self.cfg
        seeds = [(c.seed * 1_000_003 + int(r["prompt_id"][:8], 16)) % 2**31 for r in prompts]
        results = sample(self.llm, [r["prompt_ids"] for r in prompts], c.n, c.temperature, c.top_p, c.max_tokens, seeds)
        out = []
        for r, samples in zip(prompts, results, strict=True):
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
        return out

    def unit(self, name: str, prompts: list[dict[str, Any]]) -> dict[str, Any]:
        from dpo_ray.models.rewards import score

        t0 = time.perf_counter()
        gens = self.sample(prompts)
        rewards = score(self.reward, self.cfg.reward, [g["prompt"] for g in gens], [g["completion"] for g in gens])
        for g, value in zip(gens, rewards, strict=True):
            g["reward"] = value
        if self.cfg.unpaired == "threshold":  # every sample labelled by its reward: no pairing
            pairs, counts = _label(self.cfg, gens, [])
        else:
            pairs, counts = _pair(self.cfg, gens)
            if self.cfg.unpaired is not None:
                pairs, more = _label(self.cfg, gens, pairs)
                counts |= more
        artifacts.write_table(pa.Table.from_pylist(gens, schema=GENERATIONS_SCHEMA), self.cfg.generations, name)
        counts |= {"prompts": len(prompts), "samples": len(gens), "pairs": len(pairs)}
        fs, path = artifacts.artifact_fs(_counts_uri(self.cfg.output, name))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump(counts, f)
        schema = KINDS[_kind(self.cfg)]
        artifacts.write_table(pa.Table.from_pylist(pairs, schema=schema), self.cfg.output, name)  # last: "done"
        seconds = time.perf_counter() - t0
        logger.info("generate: %s: %d prompts, %d rows in %.1fs", name, len(prompts), len(pairs), seconds)
        return {"name": name, **counts}

    def __call__(self, unit: dict[str, Any]) -> dict[str, Any]:
        return self.unit(unit["name"], read_unit(unit))


def _column(uri: str, names: list[str], column: str) -> list[np.ndarray]:
    fs, path = artifacts.artifact_fs(uri)
    out = []
    for name in names:
        with fs.open(artifacts.join(path, name), "rb") as f:
            table = pq.read_table(f, columns=[column], page_checksum_verification=True)
        out.append(table[column].to_numpy(zero_copy_only=False))
    return out


def _counts_uri(output: str, name: str) -> str:
    return artifacts.join(output, "units", name.replace(".parquet", ".json"))


def _pair(c: GenerateConfig, gens: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pairs from each prompt's samples (pairing strategy of the config), with the ties and identical
    completions dropped, counted."""
    from dpo_ray.data.pairing import pair_samples
    from dpo_ray.data.tokenization import pair_id, split_of

    groups: dict[str, list[dict[str, Any]]] = {}
    for g in gens:
        groups.setdefault(g["prompt_id"], []).append(g)
    out, counts = [], {"ties": 0, "identical": 0}
    for rows in groups.values():
        rows.sort(key=lambda r: r["sample_index"])
        ids, rewards = [r["completion_ids"] for r in rows], [r["reward"] for r in rows]
        result = pair_samples(ids, rewards, c.strategy, c.margin, c.max_pairs_per_prompt)
        counts["ties"] += result.ties
        counts["identical"] += result.identical
        for hi, lo in result.pairs:
            chosen, rejected = rows[hi], rows[lo]
            pid = pair_id(chosen["prompt"], chosen["completion"], rejected["completion"])
            out.append(
                {
                    "pair_id": pid,
                    "split": split_of(chosen["prompt"], c.eval_fraction, salt="generate"),
                    "prompt_ids": chosen["prompt_ids"],
                    "chosen_ids": chosen["completion_ids"],
                    "rejected_ids": rejected["completion_ids"],
                    "prompt": chosen["prompt"],
                    "chosen": chosen["completion"],
                    "rejected": rejected["completion"],
                    "source": f"generate:{c.policy}",
                }
            )
    return out, counts


def _kind(c: GenerateConfig) -> str:
    return "pairs" if c.unpaired is None else "unpaired"


def _label(
    c: GenerateConfig, gens: list[dict[str, Any]], pairs: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The unit's unpaired rows: from its pairs (chosen desirable, rejected undesirable) or from every sample
    by the reward threshold; a completion rated the same way twice for one prompt is one row (counted), and a
    row whose split of the unit holds no other prompt has no KL completion and is dropped (counted)."""
    from dpo_ray.data.tokenization import split_of
    from dpo_ray.data.unpaired import kl_assignments, row_id

    if c.unpaired == "pairs":
        rated = [(p["prompt"], p["prompt_ids"], p[f"{side}_ids"], p[side], side == "chosen") for p in pairs
                 for side in ("chosen", "rejected")]  # fmt: skip
    else:
        rated = [
            (g["prompt"], g["prompt_ids"], g["completion_ids"], g["completion"], g["reward"] >= c.desirable_threshold)
            for g in sorted(gens, key=lambda g: (g["prompt_id"], g["sample_index"]))
        ]
    rows: dict[str, dict[str, Any]] = {}
    for prompt, prompt_ids, ids, text, label in rated:
        rid = row_id(prompt, text, label)
        rows.setdefault(
            rid,
            {
                "row_id": rid,
                "split": split_of(prompt, c.eval_fraction, salt="generate"),
                "prompt_ids": prompt_ids,
                "completion_ids": ids,
                "label": label,
                "prompt": prompt,
                "completion": text,
                "source": f"generate:{c.policy}",
            },
        )
    found = list(rows.values())
    ids, splits, prompts, completions = ([r[k] for r in found] for k in ("row_id", "split", "prompt", "completion_ids"))
    lengths = [len(r["prompt_ids"]) for r in found]
    # cut to fit after each prompt in max_model_len - 1 (vLLM's room, as reference's)
    kls = kl_assignments(ids, splits, prompts, lengths, completions, c.seed, c.max_model_len - 1)
    out = [r | {"kl_completion_ids": kl[0], "kl_row_id": kl[1]} for r, kl in zip(found, kls, strict=True) if kl]
    counts = {
        "ties": 0,
        "identical": 0,
        "repeated_rows": len(rated) - len(found),
        "no_kl_partner": len(found) - len(out),
        "desirable": sum(r["label"] for r in out),
    }
    return out, counts


def run(cfg: GenerateConfig) -> Manifest:
    """Sample, score, pair, unit by unit; resumes an interrupted run (only the missing units are generated),
    skips a complete one."""
    prompts_manifest = artifacts.require_complete(cfg.prompts, ("pairs", "unpaired"))
    upstream = stage_inputs("generate", cfg)
    build = stage.begin(_kind(cfg), cfg, upstream, cfg.output, resumable=True, also_clear=(cfg.generations,))
    if isinstance(build, Manifest):
        return build
    tok_fp = matching_tokenizer(upstream["tokenizer:policy"], cfg.policy, prompts_manifest, cfg.prompts)
    fingerprints = {"tokenizer": tok_fp, "model": upstream["model:policy"]}
    # The driver holds the prompts' index only; each unit reads its prompts from the plan (pipeline.core.prompts).
    index = prompt_index(cfg.prompts, prompts_manifest, "train", cfg.max_prompts)
    names = unit_names(len(index), cfg.prompts_per_unit)
    done = set(artifacts.list_shards(cfg.output))
    pending = [n for n in names if n not in done]
    console.header(
        f"generate: {len(index)} prompts x {cfg.n} samples from {cfg.policy} ({len(names)} units, {len(pending)} "
        f"to generate), reward {cfg.reward}, pairs by {cfg.strategy} -> {cfg.output}; {cfg.num_actors} actor(s) x "
        f"{{{describe(actor_bundle(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.accelerator_type))}}}"
    )
    t0 = time.perf_counter()
    retried = 0
    if pending:
        plan = artifacts.join(cfg.output, "units", "plan")  # the missing units' prompts, written anew by every run
        try:
            units = write_plan(cfg.prompts, prompts_manifest, index, cfg.prompts_per_unit, plan, done)
            del index
            ensure_ray()
            retried = run_units(
                GenerateUnits, units, build.config, cfg, errors=_reward_errors(), engine=engine_key(cfg, cfg.policy)
            ).retried
        finally:
            fs, path = artifacts.artifact_fs(plan)
            if fs.exists(path):
                fs.rm(path, recursive=True)
    return _finish(cfg, build, fingerprints, names, (len(pending), retried), time.perf_counter() - t0)


def _reward_errors() -> tuple[type[BaseException], ...]:
    from dpo_ray.models.rewards import RewardError

    return (RewardError,)


def _finish(
    cfg: GenerateConfig,
    build: stage.Build,
    fingerprints: dict[str, str],
    names: list[str],
    ran: tuple[int, int],
    seconds: float,
) -> Manifest:
    """Every unit has its shards: the generations manifest, then the pairs manifest (from the units' counts)."""
    missing = sorted(set(names) - set(artifacts.list_shards(cfg.output)))
    if missing:
        raise RuntimeError(f"generate: units {missing[:5]} produced no shard; rerun to resume")
    counts: dict[str, int] = {}
    for name in names:
        fs, path = artifacts.artifact_fs(_counts_uri(cfg.output, name))
        with fs.open(path, "r") as f:
            counts = {k: counts.get(k, 0) + v for k, v in json.load(f).items()}
    if counts["pairs"] == 0:
        dropped = (
            f"no KL partner {counts['no_kl_partner']}" if cfg.unpaired == "threshold" else f"ties {counts['ties']}"
        )
        if cfg.unpaired == "pairs":
            dropped += f", no KL partner {counts['no_kl_partner']}"
        raise artifacts.ArtifactError(f"generate: no {_kind(cfg)} rows from {counts['prompts']} prompts ({dropped})")
    rewards = np.concatenate(_column(cfg.generations, names, "reward"))
    gen_stats = {
        "prompts": counts["prompts"],
        "samples": int(rewards.size),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
    }
    gen_shards = [s for s in artifacts.shard_infos(cfg.generations) if s.file in set(names)]
    artifacts.write_manifest(
        cfg.generations, "generations", build.config, fingerprints, build.upstream, gen_stats, shards=gen_shards
    )
    artifacts.check_shard_schemas(cfg.output, KINDS[_kind(cfg)])
    shards = [s for s in artifacts.shard_infos(cfg.output) if s.file in set(names)]
    n_eval = int(sum((split == "eval").sum() for split in _column(cfg.output, names, "split")))
    stats = {
        **gen_stats,
        "splits": {"train": counts["pairs"] - n_eval, "eval": n_eval},
        **(
            {}
            if cfg.unpaired == "threshold"  # no pairing
            else {"ties_dropped": counts["ties"], "identical_dropped": counts["identical"], "strategy": cfg.strategy}
        ),
        **(
            {
                "unpaired": cfg.unpaired,
                "labels": {"desirable": counts["desirable"], "undesirable": counts["pairs"] - counts["desirable"]},
                "repeated_rows_dropped": counts["repeated_rows"],
                "no_kl_partner_dropped": counts["no_kl_partner"],
            }
            if cfg.unpaired
            else {}
        ),
        "units": len(names),
        "units_generated_this_run": ran[0],
        "units_retried_this_run": ran[1],
        "seconds": seconds,
        "lineage": {"policy": cfg.policy, "generations": artifacts.manifest_sha256(cfg.generations)},
    }
    manifest = stage.finish(build, fingerprints, stats, shards=shards)
    console.result(
        f"generate: {counts['prompts']} prompts x {cfg.n} samples, reward mean {gen_stats['reward_mean']:.3f}; "
        + (
            f"{counts['pairs']} pairs ({counts['ties']} ties dropped)"
            if cfg.unpaired is None
            else f"{counts['pairs']} unpaired rows ({counts['desirable']} desirable; {counts['no_kl_partner']} "
            f"without a KL partner dropped)"
        )
        + f"; {ran[0]}/{len(names)} units generated this run"
        + (f" ({ran[1]} retried)" if ran[1] else "")
        + f" -> {cfg.output}"
    )
    return manifest
