"""The Ray Train per-worker loop: data order, pre-training checks, checkpoints, resume, metrics, export.

`worker_loop` is the function Ray Train runs on each worker: it reads the `scored` artifact in the order
of dpo_ray.order, checks the batching mode against unbatched forwards, restores from the latest
checkpoint, feeds each worker its slice of every global batch to dpo_ray.step.train_step, checks step 0,
logs, evaluates, checkpoints and finally exports an HF model directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpo_ray.artifacts import ShardInfo
from dpo_ray.batching import PairTokens
from dpo_ray.errors import UserError
from dpo_ray.fused_head import enable_fused_head
from dpo_ray.lora import LoraSettings, apply_lora, peft_model_from_state
from dpo_ray.losses import LossState, step_zero
from dpo_ray.metrics import PAIR_METRICS, metric_means
from dpo_ray.packing import enable_segment_attention
from dpo_ray.step import (
    MODES,
    StepBatch,
    TrainSettings,
    all_reduce_sum,
    batching_mismatch,
    eval_sums,
    make_optimizer,
    make_scheduler,
    model_device,
    train_step,
)
from dpo_ray.tracking import Tracker, TrackingSettings, train_names

logger = logging.getLogger(__name__)

__all__ = ["ERROR_FILE", "LoopConfig", "decoder_layers", "worker_loop", "write_error"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def temp_dir() -> str:
    return tempfile.mkdtemp(prefix="dpo-ray-")


def worker_slice(columns: dict[str, Any], rows: np.ndarray, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's contiguous share of the global batch `rows` (pairs are never split; equal counts)."""
    per = len(rows) // world_size
    mine = rows[rank * per : (rank + 1) * per]
    return {k: v[mine] for k, v in columns.items()}


ERROR_FILE = "error.json"


def write_error(output: str, message: str) -> None:
    """Record why the run stopped on purpose (read by pipeline.train, which reports it as a user error)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{ERROR_FILE}", "w") as f:
        json.dump({"error": message}, f)


@dataclass(frozen=True)
class LoopConfig:
    """Everything worker_loop needs, as plain values (built by pipeline/train.py from TrainConfig)."""

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
    fault_injection: str | None = None
    trust_remote_code: bool = False
    lora: LoraSettings | None = None
    progress: Any = None  # a pipeline.progress.Counter actor handle: rank 0 raises it to each finished step
    tracking: TrackingSettings | None = None  # experiment trackers rank 0 logs to (dpo_ray.tracking)
    tracking_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the resolved train config


class _State:
    """Mutable loop state that goes into checkpoints."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.loss = LossState()  # what the loss carries between steps (BCO's δ)


def decoder_layers(model: Any, purpose: str = "FSDP", fix: str = "use train.workers.parallelism: ddp") -> list[Any]:
    """The modules FSDP2 shards (and train.batching.compile compiles) one by one: those of a class the model names in
    `_no_split_modules` (its decoder layers, in every transformers family: LlamaDecoderLayer,
    Gemma2DecoderLayer, GPT2Block, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT (LoRA) or plain
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"{purpose}: {type(base).__name__} names no decoder layer class in _no_split_modules ({sorted(names)}); "
            + fix
        )
    return layers


def compile_layers(model: Any) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile: the module stays itself, so LoRA, DDP,
    FSDP2 and checkpoints see the same names); returns how many. The padding-free attention is opaque to the
    compiler (dpo_ray.packing), so layouts that change every micro-batch cost no recompilation; a row length
    that changes does once (dynamic shapes from the second length on)."""
    layers = decoder_layers(model, "train.batching.compile", "set train.batching.compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


def _wrap(model: Any, parallelism: str, world_size: int, use_gpu: bool) -> Any:
    if world_size <= 1:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast in every forward: a Llama's only buffers (rotary frequencies) are computed
    # identically on every rank.
    return DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if use_gpu else None, broadcast_buffers=False
    )


def _save_checkpoint(model: Any, optimizer: Any, scheduler: Any, state: _State, rank: int) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = temp_dir()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "state"))
    torch.save(rng_state(), os.path.join(path, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
        trainer = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}
        loss_state = {"bco": [state.loss.bco_delta, state.loss.bco_steps]}
        save_json(os.path.join(path, "trainer.json"), {**trainer, **loss_state, "history": state.history})
    return path


def _load_checkpoint(path: str, model: Any, optimizer: Any, scheduler: Any, state: _State, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    rng = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(path, "trainer.json")) as f:
        saved = json.load(f)
    state.step, state.epoch, state.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
    state.history = saved["history"]
    state.loss = LossState(float(saved["bco"][0]), int(saved["bco"][1])) if "bco" in saved else LossState()


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
    expected = step_zero(cfg.settings.loss)  # value None: an NLL term or a reference-free member (margins only)
    loss, margin = metrics["loss"], metrics["rewards/margins"]
    loss_tol = tol + expected.slope * tol
    bad_loss = expected.value is not None and abs(loss - expected.value) > loss_tol
    if not bad_loss and abs(margin) <= tol:
        return None
    want = f"loss {expected.value:.6f} (±{loss_tol:g}) and " if expected.value is not None else ""
    return (
        f"step 0 check failed: the policy starts from the reference weights, so {want}margins 0 (±{tol:g}) are "
        f"expected; found loss {loss:.6f}, margins {margin:.6f}. The stored reference log-probs do not match this "
        "model's forward. Likely causes: the scored artifact was made with another model or tokenizer "
        "(reference.model vs train.model), the reference backend computes the model differently (e.g. vLLM "
        "without the model's sliding window or softcapping: see the reference stage's parity numbers), or, "
        "in bf16, a tolerance too tight (train.initial_check_tolerance)."
    )


def _maybe_fail(spec: str | None, step: int, rank: int, output: str) -> None:
    """Testing hook, once per run: 'STEP:RANK' makes RANK's process exit abruptly when it reaches STEP;
    'STEP:RANK:node' kills RANK's node instead (its raylet, the worker's parent: the node's other processes
    go with it), as when a machine is lost. The marker is written to `output` (any fsspec URI) first."""
    if not spec:
        return
    fail_step, fail_rank, *mode = spec.split(":")
    if step != int(fail_step) or rank != int(fail_rank):
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    marker = f"{root.rstrip('/')}/.fault-injected-{fail_step}-{fail_rank}"
    fs.invalidate_cache()
    if fs.exists(marker):
        return
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(marker, b"")
    logger.warning("fault injection: rank %d %s at step %d", rank, "kills its node" if mode else "exits", step)
    # Ray Train registers reported checkpoints when it polls the workers (every 2 s); a crash this
    # soon after a report would also lose it in real life, so the simulated crash comes a little later.
    time.sleep(5)
    if mode == ["node"]:
        import signal

        parent = os.getppid()
        with open(f"/proc/{parent}/comm") as f:
            name = f.read().strip()
        if "raylet" not in name:
            raise RuntimeError(f"fault injection: the worker's parent is {name!r}, not a raylet")
        os.kill(parent, signal.SIGKILL)
        time.sleep(60)  # this process goes with its node
    os._exit(1)


def _evaluate(
    model: Any, columns: dict[str, Any], cfg: LoopConfig, rank: int, world: int, loss_state: LossState
) -> dict[str, float]:
    sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64)
    n_rows = len(columns["prompt_ids"])
    for start in range(0, n_rows, cfg.batch_size):
        rows = np.arange(start, min(start + cfg.batch_size, n_rows))
        mine = rows[rank::world] if len(rows) >= world else (rows if rank == 0 else rows[:0])
        # Every rank calls eval_sums for every batch, with its pairs or none (see _aligned).
        pairs = StepBatch.from_columns({k: v[mine] for k, v in columns.items()})
        sums += eval_sums(model, pairs, cfg.settings, loss_state)
    return metric_means(all_reduce_sum(sums.to(model_device(model))).cpu(), prefix="eval/")


def _check_pairs(columns: dict[str, Any], k: int = 3) -> list[PairTokens]:
    """The k pairs with the longest sequences (past any sliding window the data reaches), by base order."""
    longest = [
        max(len(c), len(r)) + len(p)
        for p, c, r in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], strict=True)
    ]
    picked = sorted(np.argsort(-np.asarray(longest), kind="stable")[:k])
    return StepBatch.from_columns({key: v[picked] for key, v in columns.items()}).pairs


def _export(model: Any, cfg: LoopConfig, rank: int) -> None:
    """Gather the full weights; rank 0 writes an HF model dir (safetensors, config, tokenizer) to cfg.export."""
    import fsspec
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dpo_ray.models import load_tokenizer

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    base = model.module if hasattr(model, "module") else model
    local = temp_dir()
    if cfg.lora is not None:
        peft_model = peft_model_from_state(cfg.model, cfg.lora, full, cfg.trust_remote_code)
        if cfg.lora.save_adapter:
            peft_model.save_pretrained(os.path.join(local, "adapter"))
        peft_model.merge_and_unload().save_pretrained(local, safe_serialization=True)
    else:
        base.save_pretrained(local, state_dict=full, safe_serialization=True)
    load_tokenizer(cfg.model, cfg.trust_remote_code).save_pretrained(local)
    fs, path = fsspec.core.url_to_fs(cfg.export)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(local.rstrip("/") + "/", path, recursive=True)


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: config = {"loop": LoopConfig}.

    A check that fails (the batching mode against unbatched forwards before training, or step 0) makes
    every rank return early with the reason in <output>/error.json: a retry would fail the same way.
    """
    import ray.train

    from dpo_ray.models import disable_dropout, load_causal_lm
    from dpo_ray.order import TRAIN_COLUMNS, epoch_batches, read_splits

    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available()
    seed_everything(cfg.seed)
    columns = TRAIN_COLUMNS if cfg.reference_logps else [c for c in TRAIN_COLUMNS if not c.startswith("ref_")]
    splits = read_splits(cfg.scored, cfg.scored_shards, ["train", "eval"] if cfg.eval_every else ["train"], columns)
    if not cfg.reference_logps:  # a reference-free loss reads none (dpo_ray.losses.REFERENCE_FREE)
        for rows in splits.values():
            rows |= {c: np.zeros(len(rows["pair_id"])) for c in ("ref_chosen_logp", "ref_rejected_logp")}
    train_rows, eval_rows = splits["train"], splits.get("eval")
    model = disable_dropout(load_causal_lm(cfg.model, "float32", cfg.trust_remote_code))
    if MODES[cfg.settings.batching].segment_attention:
        enable_segment_attention(model)
        if cfg.settings.fused_head:
            enable_fused_head(model)  # before LoRA and the DDP/FSDP wrappers (dpo_ray.fused_head)
    if use_gpu:
        model = model.cuda()
    problem = None
    if cfg.compile:  # before the check below, so that it checks the compiled layers
        try:
            compile_layers(model)
        except UserError as e:
            problem = str(e)
    problem = problem or batching_mismatch(model, _check_pairs(train_rows), cfg.settings)
    if problem is not None:
        if rank == 0:
            write_error(cfg.output, problem)
        return
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    model = _wrap(model, cfg.parallelism, world, use_gpu)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.total_steps, cfg.schedule)
    state = _State()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            _load_checkpoint(path, model, optimizer, scheduler, state, rank)
        state.resumed_from = state.step
        if rank == 0:
            logger.info("resumed from step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch_in_epoch)
    started = time.perf_counter()
    tracker = _tracker(cfg, rank)
    while state.step < cfg.total_steps:
        batches = epoch_batches(len(train_rows["pair_id"]), cfg.batch_size, cfg.seed, state.epoch)
        for rows in batches[state.batch_in_epoch :]:
            batch = StepBatch.from_columns(worker_slice(train_rows, rows, rank, world))
            step = train_step(model, optimizer, scheduler, batch, cfg.settings, cfg.batch_size, world, state.loss)
            metrics, state.loss = step.metrics, step.loss_state
            state.step += 1
            state.batch_in_epoch += 1
            if rank == 0 and cfg.progress is not None:
                cfg.progress.reach.remote(state.step)
            if state.step == 1 and cfg.check_initial_margin and checkpoint is None:
                problem = _check_initial(metrics, cfg)
                if problem is not None:
                    if rank == 0:
                        write_error(cfg.output, problem)
                    return
            _maybe_fail(cfg.fault_injection, state.step, rank, cfg.output)
            metrics.update(step=state.step, epoch=state.epoch)
            if state.resumed_from is not None:
                metrics["resumed_from_step"] = state.resumed_from
            last = state.step >= cfg.total_steps
            if cfg.eval_every and eval_rows is not None and (state.step % cfg.eval_every == 0 or last):
                metrics.update(_evaluate(model, eval_rows, cfg, rank, world, state.loss))
            if tracker is not None:
                tracker.metrics(train_names(metrics), state.step)
            if state.step % cfg.log_every == 0 or last or "eval/loss" in metrics:
                state.history.append(metrics)
                if rank == 0:
                    _write_metrics(cfg.output, state.history)
                    logger.info(
                        "step %d/%d loss %.4f acc %.3f margin %.4f %.0f tok/s (%.0fs)",
                        state.step,
                        cfg.total_steps,
                        metrics["loss"],
                        metrics["rewards/accuracies"],
                        metrics["rewards/margins"],
                        metrics["tokens_per_sec"],
                        time.perf_counter() - started,
                    )
            # Only checkpoints go through ray.train.report: a report synchronises every rank with the controller
            # (~2 s each on CPU, 30x a tiny model's step); metrics.jsonl, the trackers and the progress counter
            # carry every step.
            if state.step % cfg.checkpoint_every == 0 or last:
                path = _save_checkpoint(model, optimizer, scheduler, state, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
            if last:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    _export(model, cfg, rank)
    if tracker is not None:
        tracker.tag("export", cfg.export)
        tracker.close()


def _tracker(cfg: LoopConfig, rank: int) -> Tracker | None:
    """Rank 0's tracker run (opened, or resumed after a restart), with the resolved config as its params."""
    if rank != 0 or cfg.tracking is None or not cfg.tracking.report_to:
        return None
    tracker = Tracker(cfg.tracking)
    tracker.params({"train": cfg.tracking_params})
    return tracker
