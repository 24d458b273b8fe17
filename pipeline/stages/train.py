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

from dpo_ray.data import artifacts
from dpo_ray.data.artifacts import ArtifactError, Manifest, ShardInfo
from dpo_ray.errors import UserError
from dpo_ray.hooks import STEP_HOOK_ENV
from pipeline.config import ConfigError, TrainConfig
from pipeline.core import console, stage
from pipeline.core.inputs import matching_tokenizer, stage_inputs
from pipeline.core.progress import remote_progress
from pipeline.core.runtime import check_pool_fits, embedded, ensure_ray
from pipeline.core.trackers import tracking_settings
from pipeline.core.units import actor_bundle, check_feasible, describe

logger = logging.getLogger(__name__)


__all__ = ["run"]


def _storage(cfg: TrainConfig) -> str:
    path = cfg.checkpoint.storage_path
    return path if "://" in path else os.path.abspath(path)


class TrainCheckError(UserError, RuntimeError):
    """A check before or at the first step refused the run (a user error: the message says why)."""


class TrainHealthError(UserError, RuntimeError):
    """A health guard (train.health), or a non-finite loss or gradient, stopped the run: the message names the
    signal, step, value and remedies. Exit status 3; nothing is exported, the checkpoints before it are kept."""

    exit_status = 3


def _loop_config(
    cfg: TrainConfig, total_steps: int, batching: tuple[str, str], starts_from_reference: bool, has_eval: bool,
    shards: list[ShardInfo], model_config: Any = None,
) -> Any:  # fmt: skip
    import torch

    from dpo_ray.models.loading import load_tokenizer
    from dpo_ray.objective.losses import step_zero
    from dpo_ray.train.loop import LoopConfig
    from dpo_ray.train.lora import LoraSettings
    from dpo_ray.train.step import TrainSettings

    lora_targets = tuple(cfg.lora.target_modules) if cfg.lora is not None else ()
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and cfg.workers.use_gpu)
    mode, attention = batching
    settings = TrainSettings(
        loss=cfg.loss,
        token_budget=cfg.batching.token_budget,
        batching=mode,
        fused_head=cfg.batching.fused_head,
        fused_head_from=_fused_head_from(cfg, mode, model_config),
        attention=attention,
        max_grad_norm=cfg.optim.max_grad_norm,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        pad_token_id=int(load_tokenizer(cfg.model, cfg.trust_remote_code).pad_token_id),
        sequence_parallel=cfg.sequence_parallel,
    )
    return LoopConfig(
        model=cfg.model,
        settings=settings,
        optimizer=cfg.optim.name,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        schedule=cfg.optim.schedule,
        batch_size=cfg.batch_size,
        total_steps=total_steps,
        seed=cfg.seed,
        log_every=cfg.log_every,
        eval_every=(cfg.eval_every or total_steps) if has_eval else 0,
        checkpoint_every=cfg.checkpoint.every,
        parallelism=cfg.workers.parallelism,
        gradient_checkpointing=cfg.gradient_checkpointing,
        compile=cfg.batching.compile,
        output=cfg.output,
        export=cfg.export,
        scored=cfg.scored,
        scored_shards=tuple(shards),
        # Rewards of a reference-free loss are no log-ratios (and it uses no stored reference log-probs): there
        # is nothing for step 0 to check. The loss's own step-0 value the workers take from the spec.
        check_initial_margin=starts_from_reference and step_zero(cfg.loss).margins_zero,
        initial_tolerance=cfg.initial_check_tolerance or (5e-2 if bf16 else 1e-3),
        step_hook=os.environ.get(STEP_HOOK_ENV) or None,
        health=cfg.health,
        use_gpu=cfg.workers.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        lora=None if cfg.lora is None else LoraSettings(**(cfg.lora.model_dump() | {"target_modules": lora_targets})),
        tracking=tracking_settings(cfg.tracking, key=cfg.export),
        tracking_params=cfg.model_dump(mode="json"),
    )


def _model_config(cfg: TrainConfig) -> Any:
    """The policy's transformers config (config.json only, no weights)."""
    from transformers import AutoConfig

    from dpo_ray.models.loading import resolve_model_dir

    return AutoConfig.from_pretrained(str(resolve_model_dir(cfg.model)), trust_remote_code=cfg.trust_remote_code)


def _fused_head_from(cfg: TrainConfig, mode: str, config: Any = None) -> int:
    """The row length from which a padding-free micro-batch takes the fused head (0: never): the configured one,
    or 0 in the padded mode, with the fused head on for every row, or for a model whose logits it cannot compute
    (those rows stay on the exact unfused path; an explicit fused_head: true is refused instead)."""
    from dpo_ray.compute.fused_head import UnsupportedHeadError, check_fused_head

    if mode == "padded" or cfg.batching.fused_head or not cfg.batching.fused_head_from:
        return 0
    try:
        check_fused_head(config if config is not None else _model_config(cfg))
    except UnsupportedHeadError:
        return 0
    return cfg.batching.fused_head_from


def _batching(cfg: TrainConfig, config: Any = None) -> tuple[str, str]:
    """The batching mode and attention kernel the workers use, decided here once (they get them resolved).

    `auto` is the fastest measured on the device (benchmarks/RESULTS.md): packed on GPU, prefix_shared on CPU,
    with blocks attention; padded when the model (`config`: its transformers config, read when not given) has
    a feature the padding-free modes cannot compute exactly. A setting that cannot apply is refused before any
    work, never dropped."""
    from dpo_ray.compute.attention import unsupported_features

    b = cfg.batching
    config = config if config is not None else _model_config(cfg)
    features = unsupported_features(config)
    if features and b.mode not in ("auto", "padded"):
        raise ConfigError(
            f"train.batching.mode {b.mode!r} cannot apply {config.model_type} {', '.join(features)}; "
            "use 'padded' or 'auto'"
        )
    if features and b.mode == "auto":
        dropped = [k for k, on in (("attention 'flex'", b.attention == "flex"), ("fused_head", b.fused_head)) if on]
        if dropped:
            raise ConfigError(
                f"train.batching.{' and train.batching.'.join(dropped)} needs a padding-free batching mode, which "
                f"cannot apply {config.model_type} {', '.join(features)}; use attention auto or blocks and "
                "fused_head: false"
            )
    if features and cfg.sequence_parallel > 1:
        raise ConfigError(
            f"train.sequence_parallel {cfg.sequence_parallel} shards a padding-free row, which cannot apply "
            f"{config.model_type} {', '.join(features)}"
        )
    if features:
        mode = "padded"
    elif b.mode == "auto":
        mode = "packed" if cfg.workers.use_gpu else "prefix_shared"
    else:
        mode = b.mode
    return mode, "blocks" if b.attention == "auto" else b.attention


def _error_file(output: str) -> tuple[Any, str]:
    """(filesystem, path) of the file where the workers record why they stopped the run on purpose."""
    import fsspec

    from dpo_ray.train.loop import ERROR_FILE

    fs, path = fsspec.core.url_to_fs(output)
    return fs, f"{path}/{ERROR_FILE}"


def _clear_error(output: str) -> None:
    fs, path = _error_file(output)
    if fs.exists(path):
        fs.rm(path)


def _raise_recorded_error(output: str) -> None:
    """The workers stopped on a failed check (exit status 2) or a health guard (3): a user error, no traceback."""
    fs, path = _error_file(output)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            recorded = json.load(f)
        error = TrainHealthError if recorded.get("kind") == "health" else TrainCheckError
        raise error(f"train stopped: {recorded['error']}")


def run(cfg: TrainConfig) -> Manifest:
    """Train; skipped when the export is complete for this config and scored artifact."""
    from dpo_ray.models.loading import model_fingerprint, resolve_model_dir
    from dpo_ray.objective.spec import ENTRIES

    if cfg.loss.unpaired:
        kinds: tuple[str, ...] = ("scored_unpaired",)
        hint = (
            f" (loss {cfg.loss.label} trains on unpaired rows: prepare with prepare.unpaired, or generate with "
            "generate.unpaired, then reference)"
        )
    else:
        kinds = ("scored", "pairs") if cfg.reference_free else ("scored",)
        free = ", ".join(n for n, e in ENTRIES.items() if e.reference_free)
        hint = f" (a 'pairs' artifact serves a reference-free loss only: {free}; unpaired rows need an unpaired loss)"
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
    labels = _label_counts(cfg, scored) if cfg.loss.unpaired else {}
    if labels:
        from dpo_ray.objective.unpaired import weight_guidance

        advice = weight_guidance(labels["desirable"], labels["undesirable"], cfg.loss.desirable_weight,
                                 cfg.loss.undesirable_weight)  # fmt: skip
        if advice is not None:
            console.write(f"train: warning: {advice}")
    _check_placement(cfg)
    if cfg.sequence_parallel > 1:  # refused before any work when the heads do not divide among the group
        from dpo_ray.compute.sequence_parallel import check_heads

        check_heads(model_config, cfg.sequence_parallel)
    if cfg.batching.fused_head:  # refused before any work when the model's logits get a scale it does not apply
        from dpo_ray.compute.fused_head import check_fused_head

        check_fused_head(model_config)
    loop = _loop_config(cfg, total_steps, batching, starts_from_reference, n_eval > 0, scored.shards, model_config)
    loop = dataclasses.replace(loop, reference_logps=scored.kind in ("scored", "scored_unpaired"))
    _clear_error(cfg.output)
    with remote_progress("train", total_steps, "steps") as counter:
        result = _trainer(cfg, dataclasses.replace(loop, progress=counter)).fit()
    _raise_recorded_error(cfg.output)
    stats = {
        "steps": total_steps,
        "train_pairs": n_train,
        "eval_pairs": n_eval,
        **({"train_labels": labels} if labels else {}),
        "final_metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "policy_started_from_reference": starts_from_reference,
        # a layout key (pipeline.core.stage.LAYOUT_KEYS), not in the config's identity: recorded here
        "sequence_parallel": cfg.sequence_parallel,
    }
    lineage = {**build.upstream, "scored_path": cfg.scored}
    fingerprints = {"model": model_fingerprint(resolve_model_dir(cfg.export)), "tokenizer": tok_fp}
    manifest = stage.finish(build, fingerprints, {**stats, **lineage}, shards=[])
    console.result(_result_line(cfg, total_steps, result.metrics or {}))
    return manifest


def _header(cfg: TrainConfig, counts: tuple[int, int, int], batching: tuple[str, str], from_reference: bool) -> str:
    n_train, n_eval, total_steps = counts
    mode, attention = batching
    rows = "unpaired rows" if cfg.loss.unpaired else "pairs"
    return (
        f"train: {cfg.scored} ({n_train} train / {n_eval} eval {rows}) -> {cfg.export}; {total_steps} steps of "
        f"{cfg.batch_size} {rows}, loss {cfg.loss.label} (beta {cfg.loss.beta:g}), batching {mode}"
        + (f" ({attention} attention)" if cfg.batching.attention != "auto" and mode != "padded" else "")
        + (", fused head" if cfg.batching.fused_head else "")
        + (", compiled layers" if cfg.batching.compile else "")
        + (f", sequence parallel over {cfg.sequence_parallel} workers" if cfg.sequence_parallel > 1 else "")
        + f", {max(1, cfg.workers.count)} worker(s) x {{{describe(_worker_bundle(cfg))}}}; "
        + (
            "reference-free (no reference log-probs)"
            if cfg.reference_free
            else "policy " + ("starts at the reference" if from_reference else "differs from the reference")
        )
    )


def _result_line(cfg: TrainConfig, steps: int, final: dict[str, Any]) -> str:
    def value(key: str) -> float:
        return float(final.get(key, float("nan")))

    accuracy = "" if cfg.loss.unpaired else f"reward accuracy {value('rewards/accuracies'):.3f}, "
    return (
        f"train: {steps} steps, final loss {value('loss'):.4f}, {accuracy}"
        f"margin {value('rewards/margins'):.3f} -> {cfg.export}"
    )


def _steps(cfg: TrainConfig, scored: Manifest) -> tuple[int, int, int]:
    """(train pairs, eval pairs, optimizer steps) of this config over the scored artifact."""
    from dpo_ray.data.order import split_counts

    counts = split_counts(cfg.scored, scored.shards)
    n_train, n_eval = counts.get("train", 0), counts.get("eval", 0)
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise ArtifactError(f"{cfg.scored} has {n_train} train pairs, fewer than train.batch_size {cfg.batch_size}")
    return n_train, n_eval, cfg.max_steps or cfg.epochs * steps_per_epoch


def _label_counts(cfg: TrainConfig, scored: Manifest) -> dict[str, int]:
    """Desirable and undesirable rows of the train split of a `scored_unpaired` artifact verified whole
    (require_complete): only its two columns fetched."""
    import pyarrow.compute as pc

    desirable = undesirable = 0
    for shard in scored.shards:
        table = artifacts.read_columns(cfg.scored, shard, ["split", "label"])
        labels = table.filter(pc.equal(table["split"], "train"))["label"]
        n_d = int(pc.sum(labels).as_py() or 0)
        desirable, undesirable = desirable + n_d, undesirable + len(labels) - n_d
    return {"desirable": desirable, "undesirable": undesirable}


def _check_placement(cfg: TrainConfig) -> None:
    """Refuse, before any work, workers that the embedded Ray or the cluster's node types cannot place."""
    ensure_ray()
    w = cfg.workers
    per_worker = float((w.resources or {}).get("CPU", 1))
    check_pool_fits("train.workers.count", max(1, w.count), per_worker, False, w.accelerator_type)
    check_feasible(
        "train's workers", _worker_bundle(cfg), "workers.resources, workers.use_gpu, workers.accelerator_type"
    )


def _worker_bundle(cfg: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker asks for (Ray Train adds one GPU per worker with use_gpu)."""
    res = dict(cfg.workers.resources or {})
    gpus = res.pop("GPU", 1.0 if cfg.workers.use_gpu else 0.0)
    return {**actor_bundle(res.pop("CPU", 1.0), gpus, cfg.workers.accelerator_type), **res}


def _trainer_class() -> Any:
    """Ray Train's TorchTrainer; on the embedded Ray (no RAY_ADDRESS) without its PlacementGroupCleaner.

    The cleaner is a detached actor that asks Ray's State API, every second, whether the controller is alive, to
    free the workers' placement group if it died. The embedded Ray runs no dashboard, so there is no State API: the
    cleaner logs a warning a second and frees nothing, and where /tmp/ray/ray_current_cluster names a Ray that is
    gone (a `ray start` cluster that died) each question blocks 40 s and stopping the cleaner costs the run 12 s.
    Where that file names another live Ray on the machine, the cleaner asks that Ray's dashboard about this
    controller, which it does not know, and would free this run's placement group. The embedded Ray ends with the
    process, placement groups included. On a cluster (RAY_ADDRESS, a dashboard) the cleaner stays."""
    from ray.train.torch import TorchTrainer

    if not embedded():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class EmbeddedTorchTrainer(TorchTrainer):  # type: ignore[misc,valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]  # Train V2; mypy sees V1
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return EmbeddedTorchTrainer


def _trainer(cfg: TrainConfig, loop: Any) -> Any:
    """Ray Train's TorchTrainer for the worker loop: workers, resources, checkpoints by run name, retries."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from dpo_ray.train.loop import worker_loop

    return _trainer_class()(
        worker_loop,
        train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if cfg.workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers.count,
            use_gpu=cfg.workers.use_gpu,
            resources_per_worker=cfg.workers.resources or None,
            accelerator_type=cfg.workers.accelerator_type,
        ),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2 RunConfig; mypy sees the V1 stub
            name=cfg.run_name,
            storage_path=_storage(cfg),
            failure_config=FailureConfig(max_failures=cfg.workers.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # per-report lines; our rank-0 log is the progress
        ),
    )
