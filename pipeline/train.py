"""train: DPO on Ray Train's TorchTrainer over a `scored` artifact → checkpoints + an exported HF model dir.

No reference model is loaded: its log-probs come from the artifact. Every worker reads the train split in
the same (artifact) order and keeps its own contiguous slice of each global batch, so the sequence of
updates is the same for any number of workers and any micro-batch token budget (tests hold it to 1e-4).
Checkpoints go through `ray.train.report` to `storage_path/run_name`; a worker failure restarts the
workers from the latest one (FailureConfig), and a new job with the same run name continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from dpo_ray import artifacts
from dpo_ray.artifacts import ArtifactError, Manifest, ShardInfo
from dpo_ray.errors import UserError
from pipeline import console, stage
from pipeline.config import REFERENCE_FREE_LOSSES, ConfigError, TrainConfig
from pipeline.inputs import stage_inputs
from pipeline.progress import remote_progress
from pipeline.runtime import check_pool_fits, ensure_ray, matching_tokenizer, tracking_settings
from pipeline.units import actor_bundle, check_feasible, describe

logger = logging.getLogger(__name__)

__all__ = ["run"]


def _storage(cfg: TrainConfig) -> str:
    return cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)


class TrainCheckError(UserError, RuntimeError):
    """A check before or at the first step refused the run (a user error: the message says why)."""


def _loop_config(
    cfg: TrainConfig, total_steps: int, starts_from_reference: bool, has_eval: bool, shards: list[ShardInfo]
) -> Any:
    import torch

    from dpo_ray.lora import LoraSettings
    from dpo_ray.losses import LossParams, step_zero
    from dpo_ray.models import load_tokenizer
    from dpo_ray.step import TrainSettings
    from dpo_ray.train_loop import LoopConfig

    lora_targets = tuple(cfg.lora.target_modules) if cfg.lora is not None else ()
    defaults = LossParams(cfg.beta)  # the losses' own defaults for parameters the config leaves unset
    params = {
        "discopop_tau": defaults.discopop_tau if cfg.discopop_tau is None else cfg.discopop_tau,
        "dpop_lambda": defaults.dpop_lambda if cfg.dpop_lambda is None else cfg.dpop_lambda,
        "f_alpha": defaults.f_alpha if cfg.f_alpha is None else cfg.f_alpha,
        "simpo_gamma": defaults.simpo_gamma if cfg.simpo_gamma is None else cfg.simpo_gamma,
        "orpo_lambda": defaults.orpo_lambda if cfg.orpo_lambda is None else cfg.orpo_lambda,
    }
    start = step_zero(
        cfg.losses,
        cfg.loss_weights,
        cfg.beta,
        cfg.label_smoothing,
        cfg.sft_weight,
        f_divergence=cfg.f_divergence,
        **params,
    )

    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and cfg.use_gpu)
    settings = TrainSettings(
        loss=cfg.losses[0] if isinstance(cfg.loss, str) else cfg.losses,
        loss_weights=None if cfg.loss_weights is None else tuple(cfg.loss_weights),
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        sft_weight=cfg.sft_weight,
        average_logps=cfg.average_logps,
        discopop_tau=params["discopop_tau"],
        dpop_lambda=params["dpop_lambda"],
        f_divergence=cfg.f_divergence,
        f_alpha=params["f_alpha"],
        simpo_gamma=params["simpo_gamma"],
        orpo_lambda=params["orpo_lambda"],
        token_budget=cfg.token_budget,
        batching=cfg.batching,
        fused_head=cfg.fused_head,
        attention=cfg.attention,
        max_grad_norm=cfg.max_grad_norm,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        pad_token_id=int(load_tokenizer(cfg.model, cfg.trust_remote_code).pad_token_id),
    )
    return LoopConfig(
        model=cfg.model,
        settings=settings,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        schedule=cfg.schedule,
        batch_size=cfg.batch_size,
        total_steps=total_steps,
        seed=cfg.seed,
        log_every=cfg.log_every,
        eval_every=(cfg.eval_every or total_steps) if has_eval else 0,
        checkpoint_every=cfg.checkpoint_every,
        parallelism=cfg.parallelism,
        gradient_checkpointing=cfg.gradient_checkpointing,
        compile=cfg.compile,
        output=cfg.output,
        export=cfg.export,
        scored=cfg.scored,
        scored_shards=tuple(shards),
        # With an NLL term (sft_weight, an "sft" member, a reference-free member) the step-0 loss depends on the
        # model's log-probs: only the margins are checked. Rewards of a reference-free loss are no log-ratios
        # (and it uses no stored reference log-probs): there is nothing for step 0 to check.
        initial_loss=start.value,
        initial_slope=start.slope,
        check_initial_margin=starts_from_reference and start.margins_zero,
        initial_tolerance=cfg.initial_check_tolerance or (5e-2 if bf16 else 1e-3),
        fault_injection=cfg.fault_injection,
        trust_remote_code=cfg.trust_remote_code,
        lora=None if cfg.lora is None else LoraSettings(**(cfg.lora.model_dump() | {"target_modules": lora_targets})),
        tracking=tracking_settings(cfg, key=cfg.export),
        tracking_params=cfg.model_dump(mode="json"),
    )


def _model_config(cfg: TrainConfig) -> Any:
    """The policy's transformers config (config.json only, no weights)."""
    from transformers import AutoConfig

    from dpo_ray.models import resolve_model_dir

    return AutoConfig.from_pretrained(str(resolve_model_dir(cfg.model)), trust_remote_code=cfg.trust_remote_code)


def _batching(cfg: TrainConfig, config: Any = None) -> str:
    """The configured batching mode, refused before any work when the model (`config`: its transformers config,
    read when not given) has a feature that the padding-free modes cannot compute exactly; `auto` then means
    padded (on a GPU packed, on a CPU prefix_shared otherwise)."""
    from dpo_ray.packing import unsupported_features

    config = config if config is not None else _model_config(cfg)
    features = unsupported_features(config)
    if not features:
        return cfg.batching
    if cfg.batching == "auto":
        # A setting of the padding-free modes would be dropped silently by the fall-back to padded: refused.
        dropped = [k for k, on in (("attention 'flex'", cfg.attention == "flex"), ("fused_head", cfg.fused_head)) if on]
        if dropped:
            raise ConfigError(
                f"train.{' and train.'.join(dropped)} needs a padding-free batching mode, which cannot apply "
                f"{config.model_type} {', '.join(features)}; use attention auto or blocks and fused_head: false"
            )
        return "padded"
    if cfg.batching != "padded":
        raise ConfigError(
            f"train.batching {cfg.batching!r} cannot apply {config.model_type} {', '.join(features)}; "
            "use 'padded' or 'auto'"
        )
    return "padded"


def _error_file(output: str) -> tuple[Any, str]:
    """(filesystem, path) of the file where the workers record why they stopped the run on purpose."""
    import fsspec

    from dpo_ray.train_loop import ERROR_FILE

    fs, path = fsspec.core.url_to_fs(output)
    return fs, f"{path}/{ERROR_FILE}"


def _clear_error(output: str) -> None:
    fs, path = _error_file(output)
    if fs.exists(path):
        fs.rm(path)


def _raise_recorded_error(output: str) -> None:
    """The workers stopped on a failed check: report it as a user error (exit 2, no traceback)."""
    fs, path = _error_file(output)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            raise TrainCheckError(f"train stopped: {json.load(f)['error']}")


def run(cfg: TrainConfig) -> Manifest:
    """Train; skipped when the export is complete for this config and scored artifact."""
    from dpo_ray.models import model_fingerprint, resolve_model_dir

    kinds = ("scored", "pairs") if cfg.reference_free else ("scored",)
    hint = f" (a 'pairs' artifact serves a reference-free loss only: {', '.join(REFERENCE_FREE_LOSSES)})"
    scored = artifacts.require_complete(cfg.scored, kinds, hint)
    # The export is rewritten whole by rank 0 at the end; checkpoints resume by run name (stage.claim).
    upstream = stage_inputs("train", cfg)
    build = stage.begin("model", cfg, upstream, cfg.export)
    if isinstance(build, Manifest):
        return build
    tok_fp = matching_tokenizer(upstream["tokenizer:model"], cfg.model, scored, cfg.scored)
    model_config = _model_config(cfg)
    batching = _batching(cfg, model_config)
    starts_from_reference = upstream["model:model"] == scored.fingerprints.get("model")
    fix = "choose another train.run_name or delete that directory"
    stage.claim(artifacts.join(_storage(cfg), cfg.run_name), build.config, build.upstream, "checkpoints", fix)
    n_train, n_eval, total_steps = _steps(cfg, scored)
    console.header(_header(cfg, (n_train, n_eval, total_steps), batching, starts_from_reference))
    _check_placement(cfg)
    if cfg.fused_head:  # refused before any work when the model's logits get a scale it does not apply
        from dpo_ray.fused_head import check_fused_head

        check_fused_head(model_config)
    loop = _loop_config(
        cfg.model_copy(update={"batching": batching}), total_steps, starts_from_reference, n_eval > 0, scored.shards
    )
    loop = dataclasses.replace(loop, reference_logps=scored.kind == "scored")
    _clear_error(cfg.output)
    with remote_progress("train", total_steps, "steps") as counter:
        result = _trainer(cfg, dataclasses.replace(loop, progress=counter)).fit()
    _raise_recorded_error(cfg.output)
    stats = {
        "steps": total_steps,
        "train_pairs": n_train,
        "eval_pairs": n_eval,
        "final_metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "policy_started_from_reference": starts_from_reference,
    }
    lineage = {**build.upstream, "scored_path": cfg.scored}
    fingerprints = {"model": model_fingerprint(resolve_model_dir(cfg.export)), "tokenizer": tok_fp}
    manifest = stage.finish(build, fingerprints, {**stats, **lineage}, shards=[])
    console.result(_result_line(cfg, total_steps, result.metrics or {}))
    return manifest


def _header(cfg: TrainConfig, counts: tuple[int, int, int], batching: str, from_reference: bool) -> str:
    n_train, n_eval, total_steps = counts
    return (
        f"train: {cfg.scored} ({n_train} train / {n_eval} eval pairs) -> {cfg.export}; {total_steps} steps of "
        f"{cfg.batch_size} pairs, loss {_loss_name(cfg)} (beta {cfg.beta:g}), batching {batching}"
        + (f" ({cfg.attention} attention)" if cfg.attention != "auto" and batching != "padded" else "")
        + (", fused head" if cfg.fused_head else "")
        + (", compiled layers" if cfg.compile else "")
        + f", {max(1, cfg.num_workers)} worker(s) x {{{describe(_worker_bundle(cfg))}}}; "
        + (
            "reference-free (no reference log-probs)"
            if cfg.reference_free
            else "policy " + ("starts at the reference" if from_reference else "differs from the reference")
        )
    )


def _loss_name(cfg: TrainConfig) -> str:
    if isinstance(cfg.loss, str):
        return cfg.loss
    weights = cfg.loss_weights or [1.0] * len(cfg.loss)
    return " + ".join(f"{w:g}·{n}" for n, w in zip(cfg.loss, weights, strict=True))


def _result_line(cfg: TrainConfig, steps: int, final: dict[str, Any]) -> str:
    def value(key: str) -> float:
        return float(final.get(key, float("nan")))

    return (
        f"train: {steps} steps, final loss {value('loss'):.4f}, reward accuracy {value('rewards/accuracies'):.3f}, "
        f"margin {value('rewards/margins'):.3f} -> {cfg.export}"
    )


def _steps(cfg: TrainConfig, scored: Manifest) -> tuple[int, int, int]:
    """(train pairs, eval pairs, optimizer steps) of this config over the scored artifact."""
    from dpo_ray.order import split_counts

    counts = split_counts(cfg.scored, scored.shards)
    n_train, n_eval = counts.get("train", 0), counts.get("eval", 0)
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise ArtifactError(f"{cfg.scored} has {n_train} train pairs, fewer than train.batch_size {cfg.batch_size}")
    return n_train, n_eval, cfg.max_steps or cfg.epochs * steps_per_epoch


def _check_placement(cfg: TrainConfig) -> None:
    """Refuse, before any work, workers that the embedded Ray or the cluster's node types cannot place."""
    ensure_ray()
    per_worker = float((cfg.resources_per_worker or {}).get("CPU", 1))
    check_pool_fits("train.num_workers", max(1, cfg.num_workers), per_worker, False, cfg.accelerator_type)
    check_feasible("train's workers", _worker_bundle(cfg), "resources_per_worker, use_gpu, accelerator_type")


def _worker_bundle(cfg: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker asks for (Ray Train adds one GPU per worker with use_gpu)."""
    res = dict(cfg.resources_per_worker or {})
    gpus = res.pop("GPU", 1.0 if cfg.use_gpu else 0.0)
    return {**actor_bundle(res.pop("CPU", 1.0), gpus, cfg.accelerator_type), **res}


def _trainer(cfg: TrainConfig, loop: Any) -> Any:
    """Ray Train's TorchTrainer for the worker loop: workers, resources, checkpoints by run name, retries."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dpo_ray.train_loop import worker_loop

    return TorchTrainer(
        worker_loop,
        train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=cfg.resources_per_worker or None,
            accelerator_type=cfg.accelerator_type,
        ),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2 RunConfig; mypy sees the V1 stub
            name=cfg.run_name,
            storage_path=_storage(cfg),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # per-report lines; our rank-0 log is the progress
        ),
    )
