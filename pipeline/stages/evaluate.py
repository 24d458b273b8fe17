"""evaluate: policy vs reference on held-out prompts → eval.json, samples and PNG plots.

- Samples `n` completions per eval-split prompt from the policy and from the reference (vLLM, one Ray actor
  per model with the configured resources; both engines start at once).
- Reward of every sample; mean/std for each model; win rate of policy vs reference (sample i of a prompt
  against sample i; ties count half).
- KL(π‖πref) estimate: the mean over policy samples of log π(y|x) − log πref(y|x), with log π from the
  sampler and log πref from scoring the same ids with the reference (unbiased at temperature 1).
- Preference accuracy of the policy's implicit reward on eval pairs of the `scored` artifact:
  the share of pairs with (log π − log πref)(chosen) > (log π − log πref)(rejected); on a `pairs` artifact
  (a reference-free loss: SimPO, ORPO) the share with a higher per-token mean log π for the chosen.

Writes an `eval` artifact: its manifest's stats are the evaluation (eval.json, samples and plots beside it).
Skipped, like every stage (pipeline.core.stage), when that artifact is complete for the same config and the same
models, prompts and scored pairs (by fingerprint), so a rerun of `run` does not evaluate again.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import Manifest
from pipeline.config import EvaluateConfig
from pipeline.core import console, stage
from pipeline.core.engines import engine_key, engine_spec
from pipeline.core.inputs import matching_tokenizer, stage_inputs
from pipeline.core.progress import gather
from pipeline.core.prompts import prompt_index, take
from pipeline.core.runtime import check_pool_fits, ensure_ray
from pipeline.core.trackers import tracking_settings
from pipeline.core.units import acquire, actor_bundle, actor_options, check_feasible, describe, give_back, make_room
from pipeline.stages.evaluation import result_line, statistics, track, write_files

logger = logging.getLogger(__name__)

__all__ = ["run"]


class _Model:
    """Handler on a pool actor (pipeline.core.units) holding one vLLM engine: samples from its model and scores
    given completions with it. Its config: {"cfg": the stage's config, "model": which of its models}."""

    def __init__(self, config: dict[str, Any]) -> None:
        from dpo_ray.models.engine import shared_engine
        from dpo_ray.models.loading import load_tokenizer

        model = config["model"]
        self.cfg = EvaluateConfig.model_validate(config["cfg"])
        self.llm = shared_engine(engine_spec(self.cfg, model))
        self.tok = load_tokenizer(model, self.cfg.trust_remote_code)

    def sample(self, prompts: list[list[int]]) -> list[list[dict[str, Any]]]:
        from dpo_ray.models.engine import sample

        c = self.cfg
        # vLLM 0.32 gives request i's n samples seeds s_i, s_i + 1, ... (observed: with consecutive s_i, sample
        # 1 of prompt i equalled sample 0 of prompt i + 1): space the s_i so that no two requests share one.
        seeds = [(c.seed * 1_000_003 + i * max(c.n, 7919)) % 2**31 for i in range(len(prompts))]
        groups = sample(self.llm, prompts, c.n, c.temperature, c.top_p, c.max_tokens, seeds)
        return [
            [
                {
                    "ids": s.completion_ids,
                    "text": self.tok.decode(s.completion_ids, skip_special_tokens=True),
                    "logp": s.logp,
                }
                for s in group
            ]
            for group in groups
        ]

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        from dpo_ray.models.engine import score_completions

        return [sum(x) for x in score_completions(self.llm, prompts, completions)]


# What evaluate.scored may hold: scored pairs, pairs (a reference-free loss) or scored unpaired rows (kto).
_SCORED_KINDS = ("scored", "pairs", "scored_unpaired")


def _preference_accuracy(config: dict[str, Any]) -> dict[str, Any]:
    """Implicit-reward accuracy of the policy on the scored artifact's eval pairs (HF forward, no grad). On
    unpaired rows: the share whose log-ratio log π − log πref has the sign of its label (> 0 when desirable).

    Runs as a Ray task with the stage's resources (see run): never a model forward in the driver, which on a
    cluster is the CPU-only head node."""
    import torch

    cfg = EvaluateConfig.model_validate(config)
    from dpo_ray.compute.batching import completion_logps
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer

    manifest = artifacts.require_complete(cfg.scored, _SCORED_KINDS)
    rows: list[dict[str, Any]] = []
    for shard in manifest.shards:
        table = artifacts.read_shard(cfg.scored, shard)
        rows += [r for r in table.to_pylist() if r["split"] == "eval"][: cfg.max_eval_pairs - len(rows)]
        if len(rows) >= cfg.max_eval_pairs:
            break
    if not rows:
        return {"pairs": 0, "accuracy": None}
    model = load_causal_lm(cfg.policy, cfg.dtype, cfg.trust_remote_code)
    if torch.cuda.is_available():
        model.cuda()
    pad = load_tokenizer(cfg.policy, cfg.trust_remote_code).pad_token_id
    if manifest.kind == "scored_unpaired":  # each row's log-ratio should have its label's sign
        found = completion_logps(model, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad)
        ratios = np.array([sum(x) for x in found]) - np.array([r["ref_completion_logp"] for r in rows])
        signs = np.where([r["label"] for r in rows], 1.0, -1.0)
        return {
            "pairs": len(rows),
            "accuracy": float((signs * ratios > 0).mean()),
            "mean_margin": float((signs * ratios).mean()),
            "implicit_reward": "label_sign",
        }
    prompts = [r["prompt_ids"] for r in rows] * 2
    logps = completion_logps(model, prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad)
    sums = np.array([sum(x) for x in logps])
    n = len(rows)
    if manifest.kind == "pairs":  # a reference-free loss's implicit reward: the per-token mean log-prob
        implicit = "mean_logp"
        lengths = np.array([len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows])
        means = sums / lengths
        margins = means[:n] - means[n:]
    else:
        implicit = "log_ratio"
        margins = (sums[:n] - np.array([r["ref_chosen_logp"] for r in rows])) - (
            sums[n:] - np.array([r["ref_rejected_logp"] for r in rows])
        )
    return {
        "pairs": n,
        "accuracy": float((margins > 0).mean()),
        "mean_margin": float(margins.mean()),
        "implicit_reward": implicit,
    }


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the policy against the reference: an `eval` artifact (manifest stats = the evaluation; eval.json,
    samples and plots beside it). Returns the evaluation."""
    from dpo_ray.models.rewards import load_reward, score

    prompts_manifest = artifacts.require_complete(cfg.prompts, ("pairs", "unpaired"))
    inputs = _inputs(cfg, prompts_manifest)
    # The models' fingerprints are part of the identity: a retrained policy at the same path is evaluated anew.
    build = stage.begin("eval", cfg, inputs, cfg.output)
    if isinstance(build, Manifest):
        return build.stats
    prompts = _prompts(cfg, prompts_manifest)
    bundle = actor_bundle(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.accelerator_type)
    console.header(
        f"evaluate: policy {cfg.policy} vs reference {cfg.reference} on {len(prompts)} prompts x {cfg.n} samples, "
        f"reward {cfg.reward} -> {cfg.output}; 2 actors x {{{describe(bundle)}}}"
    )
    tracking = tracking_settings(cfg.tracking, key=cfg.policy)  # refuses a tracker that is not installed, before work
    ensure_ray()
    ids = [p["prompt_ids"] for p in prompts]
    policy_samples, ref_samples, ref_logps = _sample_both(cfg, build.config, ids)
    flat = [s for group in policy_samples for s in group]
    texts = [p["prompt"] for p in prompts for _ in range(cfg.n)]
    fn = load_reward(cfg.reward)
    pol_rewards = score(fn, cfg.reward, texts, [s["text"] for s in flat])
    ref_rewards = score(fn, cfg.reward, texts, [s["text"] for g in ref_samples for s in g])
    result = statistics(cfg, len(prompts), flat, ref_logps, pol_rewards, ref_rewards)
    result |= {"preference": _preference(cfg, build.config), "config": build.config, "inputs": inputs}
    prompt_texts = [p["prompt"] for p in prompts]
    result["plots"] = write_files(
        cfg, result, ids, prompt_texts, flat, ref_samples, ref_logps, pol_rewards, ref_rewards
    )
    stage.finish(build, {"policy": inputs["model:policy"], "reference": inputs["model:reference"]}, result, shards=[])
    track(cfg, tracking, result)
    console.result(result_line(result) + f" -> {cfg.output}/eval.json")
    return result


def _prompts(cfg: EvaluateConfig, manifest: Manifest) -> list[dict[str, Any]]:
    """The eval split's unique prompts (up to max_prompts); the train split's when there is no eval split."""
    prompts = take(cfg.prompts, manifest, prompt_index(cfg.prompts, manifest, "eval", cfg.max_prompts))
    if not prompts:
        prompts = take(cfg.prompts, manifest, prompt_index(cfg.prompts, manifest, "train", cfg.max_prompts))
        logger.warning("evaluate: %s has no eval split; using train prompts", cfg.prompts)
    return prompts


def _inputs(cfg: EvaluateConfig, prompts_manifest: Manifest) -> dict[str, str]:
    """The evaluation's identity (pipeline.core.inputs): both models and their tokenizers by fingerprint, the prompts
    and the scored pairs by manifest hash; both tokenizers must be the prompts'."""
    if cfg.max_eval_pairs:
        artifacts.require_complete(cfg.scored, _SCORED_KINDS)  # verified before any work (shard sizes and hashes)
    inputs = stage_inputs("evaluate", cfg)
    for field in ("policy", "reference"):
        matching_tokenizer(inputs[f"tokenizer:{field}"], getattr(cfg, field), prompts_manifest, cfg.prompts)
    return inputs


def _resources(cfg: EvaluateConfig) -> dict[str, Any]:
    return {
        "num_gpus": cfg.num_gpus_per_actor or None,
        "num_cpus": cfg.num_cpus_per_actor,
        "accelerator_type": cfg.accelerator_type,
    }


def _sample_both(
    cfg: EvaluateConfig, config: dict[str, Any], ids: list[list[int]]
) -> tuple[list[Any], list[Any], list[float]]:
    """Policy and reference samples (both engines start at once, one actor each), and the reference's log-probs
    of the policy's samples."""
    import ray

    check_pool_fits("evaluate.num_cpus_per_actor", 2, cfg.num_cpus_per_actor, False, cfg.accelerator_type)
    bundle = actor_bundle(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.accelerator_type)
    check_feasible("evaluate's actors", bundle)
    options = actor_options(cfg)
    models = [cfg.policy, cfg.reference]
    engines = [engine_key(cfg, m) for m in models]
    actors = acquire(engines, options, bundle)
    ok = False
    try:
        policy_model, ref_model = ((a, {"cfg": config, "model": m}) for a, m in zip(actors, models, strict=True))
        samples = [a.call.remote(_Model, c, "sample", ids) for a, c in (policy_model, ref_model)]
        policy_samples, ref_samples = gather(samples, "evaluate: sampled", "models")
        flat = [s for group in policy_samples for s in group]
        prompts = [p for p in ids for _ in range(cfg.n)]
        ref_logps = ray.get(ref_model[0].call.remote(_Model, ref_model[1], "score", prompts, [s["ids"] for s in flat]))
        ok = True
    finally:
        for a, engine in zip(actors, engines, strict=True):
            give_back(engine, options, bundle, [a], ok)
    return policy_samples, ref_samples, ref_logps


def _preference(cfg: EvaluateConfig, config: dict[str, Any]) -> dict[str, Any]:
    import ray

    if not cfg.max_eval_pairs:
        return {"pairs": 0, "accuracy": None}
    make_room(actor_bundle(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.accelerator_type), 1)  # kept actors
    task = ray.remote(_preference_accuracy).options(**_resources(cfg))
    found: dict[str, Any] = ray.get(task.remote(config))
    return found
