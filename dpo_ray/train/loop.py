"""The Ray Train per-worker loop: read the data, check the model, restore, then step → log → eval → checkpoint.

`worker_loop` is the function Ray Train runs on each worker. It reads the `scored` artifact (dpo_ray.data.order),
checks the batching mode against unbatched forwards (dpo_ray.train.preflight), restores from the latest checkpoint
(dpo_ray.train.checkpoint), and takes the global batches still to train from `_batches`, which owns epochs and
resume. Each batch: this worker's slice through dpo_ray.train.step.train_step, the health guards
(dpo_ray.objective.health), the step-0 check, a test's step hook, maybe an evaluation, the log, maybe a
checkpoint. Finally rank 0 exports the model (dpo_ray.train.export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpo_ray.compute.attention import enable_segment_attention
from dpo_ray.compute.batching import PairTokens
from dpo_ray.compute.fused_head import enable_fused_head, text_config
from dpo_ray.data.artifacts import ShardInfo
from dpo_ray.data.schema import SEQUENCE_COLUMNS
from dpo_ray.errors import UserError
from dpo_ray.hooks import named_hook
from dpo_ray.objective.health import (
    ALARM,
    CHOSEN_SHIFT,
    GRAD_NORM_RATIO,
    KL,
    NONFINITE,
    REJECTED_SHIFT,
    REMEDIES,
    HealthSpec,
    alarms,
    grad_norm_ratio,
)
from dpo_ray.objective.losses import LossState, step_zero
from dpo_ray.objective.metrics import (
    COUNT_DESIRABLE,
    COUNT_UNDESIRABLE,
    PAIR_METRICS,
    REWARDS_CHOSEN,
    REWARDS_REJECTED,
    metric_means,
    unpaired_metric_means,
)
from dpo_ray.objective.unpaired import unpaired_step_zero
from dpo_ray.train.checkpoint import LoopState, load_checkpoint, save_checkpoint, seed_everything
from dpo_ray.train.collectives import all_reduce_sum
from dpo_ray.train.export import export_model
from dpo_ray.train.lora import LoraSettings, apply_lora
from dpo_ray.train.optim import make_optimizer, make_scheduler
from dpo_ray.train.parallel import compile_layers, wrap
from dpo_ray.train.preflight import batching_mismatch
from dpo_ray.train.rows import SplitRows, read_split_rows
from dpo_ray.train.step import KTO_KL, MODES, StepBatch, TrainSettings, eval_sums, model_device, train_step
from dpo_ray.train.tracking import Tracker, TrackingSettings, train_names

logger = logging.getLogger(__name__)

__all__ = ["ERROR_FILE", "LoopConfig", "worker_loop", "write_error"]


@dataclass(frozen=True)
class LoopConfig:
    """Everything worker_loop needs, as plain values (built by pipeline/stages/train.py from TrainConfig)."""

    model: str
    settings: TrainSettings
    optimizer: str
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    batch_size: int
    total_steps: int
    seed: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    parallelism: str
    gradient_checkpointing: bool
    output: str
    export: str
    scored: str
    scored_shards: tuple[ShardInfo, ...]
    check_initial_margin: bool  # the policy starts at the reference and the loss's rewards are log-ratios
    initial_tolerance: float
    compile: bool = False  # torch.compile each decoder layer (compile_layers)
    reference_logps: bool = True  # False: a `pairs` artifact for a reference-free loss (reference log-probs 0)
    step_hook: str | None = None  # "module:function[:ARG]" called with (step, rank, output) after every step
    health: HealthSpec = dataclasses.field(default_factory=HealthSpec)  # the guards (dpo_ray.objective.health)
    use_gpu: bool = False  # train.workers.use_gpu: the device the batching mode was resolved for
    trust_remote_code: bool = False
    lora: LoraSettings | None = None
    progress: Any = None  # a pipeline.core.progress.Counter actor handle: rank 0 raises it to each finished step
    tracking: TrackingSettings | None = None  # experiment trackers rank 0 logs to (dpo_ray.train.tracking)
    tracking_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the resolved train config


ERROR_FILE = "error.json"


def write_error(output: str, message: str, kind: str = "check") -> None:
    """Record why the run stopped on purpose (read by pipeline.stages.train, which reports it as a user error):
    `kind` check (a check before or at the first step) or health (a guard stopped it)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{ERROR_FILE}", "w") as f:
        json.dump({"error": message, "kind": kind}, f)


def worker_slice(rows: np.ndarray, replica: int, replicas: int) -> np.ndarray:
    """Replica `replica`'s contiguous share of the global batch `rows` (pairs are never split; equal counts)."""
    per = len(rows) // replicas
    return rows[replica * per : (replica + 1) * per]


def _batches(
    train: SplitRows, cfg: LoopConfig, state: LoopState, replica: int, replicas: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """The global batches (row positions) still to train, in order, until cfg.total_steps, each with this
    replica's slice of it as the step's columns: from the state's position (epoch, batch in epoch; a restored
    checkpoint's) on, epoch after epoch in dpo_ray.data.order's order. At the start of each epoch (or of its rest,
    on resume) the slices of the epoch's batches still to train are fetched at once (dpo_ray.train.rows: a
    collective). The position is advanced as each batch is handed out, so a checkpoint taken after its step
    resumes at the next one; the step count is the caller's."""
    from dpo_ray.data.order import epoch_batches

    while state.step < cfg.total_steps:
        order = epoch_batches(train.n, cfg.batch_size, cfg.seed, state.epoch)
        todo = order[state.batch_in_epoch : state.batch_in_epoch + cfg.total_steps - state.step]
        per = cfg.batch_size // replicas
        mine = [worker_slice(rows, replica, replicas) for rows in todo]
        columns = _fetch(cfg, train, np.concatenate(mine) if mine else np.zeros(0, np.int64))
        for j, rows in enumerate(todo):
            state.batch_in_epoch += 1
            yield rows, {k: v[np.arange(j * per, (j + 1) * per)] for k, v in columns.items()}
            if state.step >= cfg.total_steps:
                return
        state.epoch += 1
        state.batch_in_epoch = 0


def _fetch(cfg: LoopConfig, rows: SplitRows, positions: np.ndarray) -> dict[str, Any]:
    """rows.fetch, with the zero reference log-probs of a reference-free loss (it reads none:
    dpo_ray.objective.spec.ENTRIES)."""
    columns = rows.fetch(np.asarray(positions, dtype=np.int64))
    if not cfg.reference_logps:
        columns |= {c: np.zeros(len(columns["pair_id"])) for c in ("ref_chosen_logp", "ref_rejected_logp")}
    return columns


def _write_metrics(output: str, history: list[dict[str, Any]]) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(h) + "\n" for h in history))


def _check_initial(metrics: dict[str, float], cfg: LoopConfig) -> str | None:
    """Policy == reference at step 0: margins must be 0 and the loss its value at h = 0, each within the
    tolerance (the loss's scaled by its slope, so IPO with a small β or a bf16 run is not stopped).
    Returns what failed, or None."""
    tol = cfg.initial_tolerance
    spec = cfg.settings.loss
    expected = step_zero(spec)  # value None: an NLL term or a reference-free member (margins only)
    value, loss, margin = expected.value, metrics["loss"], metrics["rewards/margins"]
    checked, shown = "margins", f"{margin:.6f}"
    if spec.unpaired:  # the value follows the batch's labels; a batch of one label has no margin: its rewards are 0
        n_d, n_u = int(metrics[COUNT_DESIRABLE]), int(metrics[COUNT_UNDESIRABLE])
        value = unpaired_step_zero(n_d, n_u, spec.desirable_weight, spec.undesirable_weight)
        rewards = [metrics[k] for k, n in ((REWARDS_CHOSEN, n_d), (REWARDS_REJECTED, n_u)) if n]
        if KTO_KL in metrics:  # the KL completions' log-ratios, before z₀'s clamp at 0 could hide their error
            rewards.append(spec.beta * metrics[KTO_KL])
        margin = max(abs(r) for r in rewards)
        checked, shown = "rewards (and β·KL estimate)", ", ".join(f"{r:.6f}" for r in rewards)
    loss_tol = tol + expected.slope * tol
    bad_loss = value is not None and abs(loss - value) > loss_tol
    if not bad_loss and abs(margin) <= tol:
        return None
    want = f"loss {value:.6f} (±{loss_tol:g}) and " if value is not None else ""
    return (
        f"step 0 check failed: the policy starts from the reference weights, so {want}{checked} 0 (±{tol:g}) are "
        f"expected; found loss {loss:.6f}, {checked} {shown}. The stored reference log-probs do not match this "
        "model's forward. Likely causes: the scored artifact was made with another model or tokenizer "
        "(reference.model vs train.model), the reference backend computes the model differently (e.g. vLLM "
        "without the model's sliding window or softcapping: see the reference stage's parity numbers), or, "
        "in bf16, a tolerance too tight (train.initial_check_tolerance)."
    )


def _eval_batches(cfg: LoopConfig, rows: SplitRows, replica: int, replicas: int) -> list[dict[str, Any]]:
    """This replica's share of each eval batch, as the step's columns (fetched once: a collective): batch after
    batch of batch_size rows in base order, of which replica r takes every replicas-th row from r (all of a batch
    smaller than the replicas goes to replica 0)."""
    mine = []
    for start in range(0, rows.n, cfg.batch_size):
        batch = np.arange(start, min(start + cfg.batch_size, rows.n))
        mine.append(batch[replica::replicas] if len(batch) >= replicas else (batch if replica == 0 else batch[:0]))
    columns = _fetch(cfg, rows, np.concatenate(mine or [np.zeros(0, np.int64)]))
    bounds = np.concatenate([[0], np.cumsum([len(m) for m in mine])])
    return [{k: v[np.arange(a, b)] for k, v in columns.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _evaluate(model: Any, batches: list[dict[str, Any]], cfg: LoopConfig, loss_state: LossState) -> dict[str, float]:
    sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64)
    for columns in batches:
        # Every rank calls eval_sums for every batch, with its pairs or none (see dpo_ray.train.collectives.aligned).
        sums += eval_sums(model, StepBatch.from_columns(columns), cfg.settings, loss_state)
    means = unpaired_metric_means if cfg.settings.loss.unpaired else metric_means
    group = cfg.settings.sequence_parallel  # a group's ranks evaluate the same rows: one replica each
    return means(all_reduce_sum(sums.to(model_device(model))).cpu() / group, prefix="eval/")


def check_positions(rows: SplitRows, k: int = 3) -> np.ndarray:
    """The positions of the k rows with the longest sequences (prompt + the longer completion), in base order."""
    return np.sort(np.argsort(-rows.longest, kind="stable")[:k])


def _check_pairs(columns: dict[str, Any], k: int = 3, max_tokens: int | None = None) -> list[PairTokens]:
    """The k pairs (or unpaired rows: completion and KL completion) with the longest sequences (past any
    sliding window the data reaches), by base order; each sequence cut to at most `max_tokens` (the prompt's end
    kept, at least half of them, the completions to what is left), since the check's unbatched eager forwards hold a
    [heads × tokens × tokens] score tensor."""
    (first, _, _), (second, _, _) = SEQUENCE_COLUMNS["unpaired" if "label" in columns else "pairs"]
    longest = [
        max(len(c), len(r)) + len(p)
        for p, c, r in zip(columns["prompt_ids"], columns[first], columns[second], strict=True)
    ]
    picked = sorted(np.argsort(-np.asarray(longest), kind="stable")[:k])
    pairs = StepBatch.from_columns({key: v[picked] for key, v in columns.items()}).pairs
    if max_tokens is None:
        return pairs
    cut = []
    for p in pairs:
        keep = max(max_tokens // 2, max_tokens - max(len(p.chosen_ids), len(p.rejected_ids)))
        prompt = p.prompt_ids[-keep:] if len(p.prompt_ids) > keep else p.prompt_ids
        room = max_tokens - len(prompt)
        cut.append(PairTokens(prompt, p.chosen_ids[:room], p.rejected_ids[:room]))
    return cut


# What one eager attention score tensor of the pre-training check may hold: its float32 [heads × T × T].
CHECK_SCORE_BYTES = 1 << 30


def check_tokens(config: Any) -> int:
    """The longest sequence the pre-training check runs: its eager attention scores within CHECK_SCORE_BYTES
    (8192 tokens for 4 heads, 2896 for 32), or 64 tokens past the model's sliding window when that is longer
    (a window the check never crosses is a window it does not check: 4160 tokens for a 4096 window)."""
    config = text_config(config)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    # a window as long as the positions is no window (Phi-3.5-mini ships 262144 with 131072 positions)
    past_window = 0
    if isinstance(window, int) and 0 < window and (not isinstance(positions, int) or window < positions):
        past_window = window + 64
    return max(2, int(math.isqrt(CHECK_SCORE_BYTES // (4 * heads))), past_window)


def _read_rows(cfg: LoopConfig) -> tuple[SplitRows, SplitRows | None]:
    """The train split and (when evaluating) the eval split across the ranks, every column the step reads
    (dpo_ray.train.rows: this rank reads its own shards; a collective)."""
    from dpo_ray.data.order import TRAIN_COLUMNS, UNPAIRED_TRAIN_COLUMNS

    if cfg.settings.loss.unpaired:
        columns = UNPAIRED_TRAIN_COLUMNS
    else:
        columns = TRAIN_COLUMNS if cfg.reference_logps else [c for c in TRAIN_COLUMNS if not c.startswith("ref_")]
    splits = read_split_rows(cfg.scored, cfg.scored_shards, ["train", "eval"] if cfg.eval_every else ["train"], columns)
    return splits["train"], splits.get("eval")


def _model(cfg: LoopConfig, check_rows: dict[str, Any], use_gpu: bool) -> tuple[Any, str | None]:
    """The policy, ready for the configured batching (attention, fused head, compiled layers), and why it must
    not train (the check against unbatched forwards failed), or None."""
    from dpo_ray.models.loading import disable_dropout, load_causal_lm

    model = disable_dropout(load_causal_lm(cfg.model, "float32", cfg.trust_remote_code))
    if MODES[cfg.settings.batching].segment_attention:
        enable_segment_attention(model)
        if cfg.settings.fused_head or cfg.settings.fused_head_from:
            enable_fused_head(model)  # before LoRA and the DDP/FSDP wrappers (dpo_ray.compute.fused_head)
    if use_gpu:
        model = model.cuda()
    if cfg.compile:  # before the check below, so that it checks the compiled layers
        try:
            compile_layers(model)
        except UserError as e:
            return model, str(e)
    pairs = _check_pairs(check_rows, max_tokens=check_tokens(model.config))
    return model, batching_mismatch(model, pairs, cfg.settings)


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: config = {"loop": LoopConfig}.

    A check that fails (the batching mode against unbatched forwards before training, or step 0) makes
    every rank return early with the reason in <output>/error.json: a retry would fail the same way.
    """
    import ray.train

    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()  # the device train.workers.use_gpu chose the batching for
    seed_everything(cfg.seed)
    group = cfg.settings.sequence_parallel
    if group > 1:  # groups of consecutive ranks share each micro-batch's tokens and train the same pairs
        from dpo_ray.compute.sequence_parallel import join_groups

        join_groups(group)
    train_rows, eval_rows = _read_rows(cfg)
    replica, replicas = rank // group, world // group
    eval_batches = _eval_batches(cfg, eval_rows, replica, replicas) if eval_rows is not None else None
    model, problem = _model(cfg, _fetch(cfg, train_rows, check_positions(train_rows)), use_gpu)
    if problem is not None:
        if rank == 0:
            write_error(cfg.output, problem)
        return
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    model = wrap(model, cfg.parallelism, world, use_gpu)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.total_steps, cfg.schedule)
    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            load_checkpoint(path, model, optimizer, scheduler, state, rank)
        state.resumed_from = state.step
        if rank == 0:
            logger.info("resumed from step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch_in_epoch)
    started = time.perf_counter()
    tracker = _tracker(cfg, rank)
    hook = named_hook(cfg.step_hook)  # the tests' fault injection (dpo_ray.hooks)
    for rows, columns in _batches(train_rows, cfg, state, replica, replicas):
        batch = StepBatch.from_columns(columns)
        step = train_step(model, optimizer, scheduler, batch, cfg.settings, cfg.batch_size, world, state.loss)
        metrics, state.loss = step.metrics, step.loss_state
        state.step += 1
        metrics.update(step=state.step, epoch=state.epoch)
        _health(metrics, cfg, state)
        step_zero_due = state.step == 1 and cfg.check_initial_margin and checkpoint is None
        stop = _stop(metrics, cfg, state, train_rows.names(rows), rank, step_zero_due)
        if stop is not None:  # before this step's checkpoint: the checkpoints before it are kept
            if rank == 0:
                write_error(cfg.output, stop[1], kind=stop[0])
                _log(metrics, cfg, state, rank, started)
            return
        if rank == 0 and cfg.progress is not None:
            cfg.progress.reach.remote(state.step)
        if hook is not None:
            hook(state.step, rank, cfg.output)
        if state.resumed_from is not None:
            metrics["resumed_from_step"] = state.resumed_from
        last = state.step >= cfg.total_steps
        if cfg.eval_every and eval_batches is not None and (state.step % cfg.eval_every == 0 or last):
            metrics.update(_evaluate(model, eval_batches, cfg, state.loss))
        if tracker is not None:
            tracker.metrics(train_names(metrics), state.step)
        alarmed = any(k.startswith(ALARM) for k in metrics)  # a warning is recorded whatever log_every
        if state.step % cfg.log_every == 0 or last or "eval/loss" in metrics or alarmed:
            _log(metrics, cfg, state, rank, started)
        # Only checkpoints go through ray.train.report: a report synchronises every rank with the controller
        # (~2 s each on CPU, 30x a tiny model's step); metrics.jsonl, the trackers and the progress counter
        # carry every step.
        if state.step % cfg.checkpoint_every == 0 or last:
            path = save_checkpoint(model, optimizer, scheduler, state, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
    export_model(model, cfg, rank)
    if tracker is not None:
        tracker.tag("export", cfg.export)
        tracker.close()


def _health(metrics: dict[str, Any], cfg: LoopConfig, state: LoopState) -> None:
    """Complete the step's health signals (dpo_ray.objective.health): the gradient-norm ratio to the median of
    the steps before; without stored reference log-probs (a reference-free loss) no shift or KL."""
    metrics[GRAD_NORM_RATIO] = grad_norm_ratio(metrics["grad_norm"], state.grad_norms)
    state.grad_norms.append(float(metrics["grad_norm"]))
    if not cfg.reference_logps:
        for key in (CHOSEN_SHIFT, REJECTED_SHIFT, KL):
            metrics.pop(key, None)


def _stop(
    metrics: dict[str, Any], cfg: LoopConfig, state: LoopState, pair_ids: Any, rank: int, step_zero_due: bool
) -> tuple[str, str] | None:
    """Why the run stops after this step, as (kind for write_error, message), or None. In order: a non-finite
    step (the most specific), then the step-0 check (its diagnosis of mismatched reference log-probs beats a
    guard's), then the health guards."""
    problem = _nonfinite(metrics, state, pair_ids)
    if problem is not None:
        return "health", problem
    problem = _check_initial(metrics, cfg) if step_zero_due else None
    if problem is not None:
        return "check", problem
    problem = _guard(metrics, cfg, state, rank)
    return ("health", problem) if problem is not None else None


def _nonfinite(metrics: dict[str, Any], state: LoopState, pair_ids: Any) -> str | None:
    """A non-finite loss or gradient always stops the run: the message names the step and the batch's pairs."""
    if not metrics.get(NONFINITE):
        return None
    shown = ", ".join(str(p) for p in list(pair_ids)[:8]) + (", ..." if len(pair_ids) > 8 else "")
    return (
        f"non-finite loss or gradient at step {state.step} (loss {metrics['loss']}, grad_norm "
        f"{metrics['grad_norm']}); the batch's pairs: {shown}. The step's update was not checkpointed. "
        f"Remedies: {REMEDIES}; check these pairs' data."
    )


def _guard(metrics: dict[str, Any], cfg: LoopConfig, state: LoopState, rank: int) -> str | None:
    """Act on the guards that fire (the same on every rank: the signals are all-reduced): warnings are logged
    (rank 0) and recorded as health/alarm/<signal> = 1; a guard with action stop returns the message the stage
    ends with."""
    stops = []
    for alarm in alarms(metrics, cfg.health, state.step):
        metrics[alarm.key] = 1.0
        if alarm.action == "stop":
            stops.append(alarm.message())
        elif rank == 0:
            logger.warning("health: %s", alarm.message())
    return f"a health guard stopped the run: {'; '.join(stops)}" if stops else None


def _log(metrics: dict[str, Any], cfg: LoopConfig, state: LoopState, rank: int, started: float) -> None:
    """The step's metrics into the history (metrics.jsonl, rewritten by rank 0) and rank 0's log line."""
    state.history.append(metrics)
    if rank != 0:
        return
    _write_metrics(cfg.output, state.history)
    unpaired = cfg.settings.loss.unpaired  # no accuracy: KTO's reference point instead
    logger.info(
        "step %d/%d loss %.4f " + ("z0 %.3f" if unpaired else "acc %.3f") + " margin %.4f %.0f tok/s (%.0fs)",
        state.step,
        cfg.total_steps,
        metrics["loss"],
        metrics.get("kto/z0", float("nan")) if unpaired else metrics["rewards/accuracies"],
        metrics["rewards/margins"],
        metrics["tokens_per_sec"],
        time.perf_counter() - started,
    )


def _tracker(cfg: LoopConfig, rank: int) -> Tracker | None:
    """Rank 0's tracker run (opened, or resumed after a restart), with the resolved config as its params."""
    if rank != 0 or cfg.tracking is None or not cfg.tracking.report_to:
        return None
    tracker = Tracker(cfg.tracking)
    tracker.params({"train": cfg.tracking_params})
    return tracker
