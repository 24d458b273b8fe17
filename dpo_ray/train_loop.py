"""The DPO training step and the Ray Train per-worker loop.

`train_step` runs without Ray (tests, benchmarks on one GPU): a global batch of pairs, split across
workers and then into token-budget micro-batches with gradient accumulation. Each worker's loss is
    (world_size / global_batch_size) · Σ_{its pairs} loss_i
so that after DDP/FSDP average the gradients across workers, every update is the gradient of the mean
loss over the global batch, however the pairs were split across workers and micro-batches.

`worker_loop` is the function Ray Train runs on each worker: it restores from the latest checkpoint,
feeds each worker its slice of every global batch from the `scored` dataset, checks step 0, logs,
evaluates, checkpoints and finally exports an HF model directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpo_ray.batching import PairLogps, PairTokens, collate_padded, plan_micro_batches, policy_logps
from dpo_ray.logps import DEFAULT_CHUNK_TOKENS
from dpo_ray.lora import LoraSettings, apply_lora, peft_model_from_state
from dpo_ray.losses import preference_loss
from dpo_ray.metrics import GRAD_NORM, LR, PAIR_METRICS, metric_means, pair_metric_sums, throughput
from dpo_ray.packing import (
    SDPA_BACKENDS,
    collate_packed,
    collate_prefix_shared,
    enable_segment_attention,
    segment_logps,
)

logger = logging.getLogger(__name__)

__all__ = [
    "StepBatch",
    "TrainSettings",
    "eval_sums",
    "make_optimizer",
    "make_scheduler",
    "resolve_batching",
    "train_step",
]


@dataclass(frozen=True)
class TrainSettings:
    """What one optimizer step needs to know (a subset of pipeline.config.TrainConfig)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    average_logps: bool = False
    token_budget: int = 16_384
    max_grad_norm: float | None = 1.0
    autocast_dtype: torch.dtype | None = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    pad_token_id: int = 0
    batching: str = "padded"  # padded | packed | prefix_shared (dpo_ray.batching.BATCHING); auto: resolve_batching
    cudnn_attention: bool = False  # allow cuDNN SDPA too (slower here: see dpo_ray.packing.SDPA_BACKENDS)


@dataclass(frozen=True)
class StepBatch:
    """This worker's pairs of one global batch, with their reference log-prob sums (B,) float64."""

    pairs: list[PairTokens]
    ref_chosen: Tensor
    ref_rejected: Tensor

    @classmethod
    def from_columns(cls, batch: dict[str, Any]) -> StepBatch:
        """From a columnar batch with prompt_ids, chosen_ids, rejected_ids, ref_chosen_logp, ref_rejected_logp."""
        pairs = [
            PairTokens(list(map(int, p)), list(map(int, c)), list(map(int, r)))
            for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], strict=True)
        ]
        return cls(
            pairs,
            torch.tensor(np.asarray(batch["ref_chosen_logp"], dtype=np.float64)),
            torch.tensor(np.asarray(batch["ref_rejected_logp"], dtype=np.float64)),
        )

    def select(self, index: list[int]) -> StepBatch:
        return StepBatch([self.pairs[i] for i in index], self.ref_chosen[index], self.ref_rejected[index])

    @property
    def tokens(self) -> int:
        return sum(p.num_tokens for p in self.pairs)


def resolve_batching(settings: TrainSettings, use_gpu: bool) -> TrainSettings:
    """`batching: auto` → the mode measured fastest on this kind of device: packed on GPU (1.26x padded on
    an H100), prefix_shared on CPU (2.7x TRL; benchmarks/, README)."""
    if settings.batching != "auto":
        return settings
    return dataclasses.replace(settings, batching="packed" if use_gpu else "prefix_shared")


def _sync(model: Any, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradient sync on or off for this backward (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _micro_batch_logps(model: Any, batch: StepBatch, s: TrainSettings) -> PairLogps:
    """Summed completion log-probs of the batch's pairs, in the configured batching mode."""
    device = _device(model)
    autocast = torch.autocast(device.type, dtype=s.autocast_dtype) if s.autocast_dtype else contextlib.nullcontext()
    backends = [*SDPA_BACKENDS, SDPBackend.CUDNN_ATTENTION] if s.cudnn_attention else SDPA_BACKENDS
    with autocast, sdpa_kernel(backends):
        if s.batching == "padded":
            return policy_logps(model, collate_padded(batch.pairs, s.pad_token_id).to(device), s.chunk_tokens)
        collate = collate_packed if s.batching == "packed" else collate_prefix_shared
        return segment_logps(model, collate(batch.pairs).to(device), s.chunk_tokens)


def _micro_batch_loss(model: Any, batch: StepBatch, s: TrainSettings) -> tuple[Tensor, Tensor]:
    """Summed loss of the batch's pairs (graph attached) and its metric sums."""
    device = _device(model)
    lp = _micro_batch_logps(model, batch, s)
    out = preference_loss(
        s.loss,
        lp.chosen,
        lp.rejected,
        batch.ref_chosen.to(device),
        batch.ref_rejected.to(device),
        lp.chosen_lengths,
        lp.rejected_lengths,
        beta=s.beta,
        label_smoothing=s.label_smoothing,
        sft_weight=s.sft_weight,
        average_logps=s.average_logps,
    )
    return out.losses.sum(), pair_metric_sums(out, lp.chosen, lp.rejected)


def _all_reduce(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: StepBatch,
    settings: TrainSettings,
    global_batch_size: int,
    world_size: int = 1,
) -> dict[str, float]:
    """One optimizer step on this worker's pairs of a global batch; metrics are global (all-reduced).

    batch: this worker's share (>= 1 pair) of a global batch of `global_batch_size` pairs.
    Returns the metrics of dpo_ray.metrics for the whole global batch, plus grad_norm and lr.
    """
    if not batch.pairs:
        raise ValueError("train_step: this worker got no pairs; global batch_size must be >= num_workers")
    model.train()
    t0 = time.perf_counter()
    groups = _aligned(plan_micro_batches(batch.pairs, settings.token_budget, settings.batching), _device(model))
    scale = world_size / global_batch_size
    sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64)
    for k, index in enumerate(groups):
        with _sync(model, enabled=k == len(groups) - 1):
            if index is None:  # keeps this rank's collectives in step with ranks that have more micro-batches
                loss_sum, _ = _micro_batch_loss(model, _placeholder(settings), settings)
                (loss_sum * 0.0).backward()
                continue
            loss_sum, metric_sums = _micro_batch_loss(model, batch.select(index), settings)
            (loss_sum * scale).backward()
        sums += metric_sums.cpu()
    max_norm = settings.max_grad_norm if settings.max_grad_norm else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.tensor([float(batch.tokens)], dtype=torch.float64)
    reduced = _all_reduce(torch.cat([sums, tokens]).to(_device(model))).cpu()
    seconds = time.perf_counter() - t0
    metrics = metric_means(reduced[:-1])
    metrics.update({GRAD_NORM: float(grad_norm), LR: lr})
    metrics.update(throughput(int(reduced[-1]), int(reduced[-2]), seconds))
    return metrics


def eval_sums(model: Any, batch: StepBatch, settings: TrainSettings) -> Tensor:
    """Metric sums (not yet all-reduced) of a batch without gradients."""
    model.eval()
    sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64)
    groups = _aligned(plan_micro_batches(batch.pairs, settings.token_budget, settings.batching), _device(model))
    with torch.no_grad():
        for index in groups:
            if index is None:
                _micro_batch_loss(model, _placeholder(settings), settings)
            else:
                sums += _micro_batch_loss(model, batch.select(index), settings)[1].cpu()
    return sums


def _aligned(groups: list[list[int]], device: torch.device) -> list[list[int] | None]:
    """`groups` padded with None up to the largest micro-batch count of any rank.

    Every rank must run the same number of forwards: FSDP all-gathers parameters in each one, and a rank
    that stopped early would leave the others waiting forever (a rank's share of an eval batch can be
    empty, and token budgets split different pairs differently).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(groups)
    n = torch.tensor([len(groups)], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [*groups, *([None] * (int(n.item()) - len(groups)))]


def _placeholder(settings: TrainSettings) -> StepBatch:
    """A one-token pair whose loss is multiplied by 0 or discarded: a forward (and backward) that only
    takes part in the collectives."""
    t = settings.pad_token_id
    zero = torch.zeros(1, dtype=torch.float64)
    return StepBatch([PairTokens([t], [t], [t])], zero, zero)


def make_optimizer(model: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or RMSprop as in the DPO paper's reference code."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown {name!r}; expected adamw or rmsprop")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str) -> Any:
    """Linear warmup from 0, then constant or cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    scored_files: tuple[str, ...]
    initial_loss: float | None  # expected step-0 loss when the policy starts from the reference (None: unknown)
    initial_slope: float  # |d loss / d margin| at h = 0 (dpo_ray.losses.initial_loss)
    check_initial_margin: bool
    initial_tolerance: float
    fault_injection: str | None = None
    trust_remote_code: bool = False
    lora: LoraSettings | None = None


class _State:
    """Mutable loop state that goes into checkpoints."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None


def decoder_layers(model: Any) -> list[Any]:
    """The modules FSDP2 shards one by one: those of a class the model names in `_no_split_modules` (its
    decoder layers, in every transformers family: LlamaDecoderLayer, Gemma2DecoderLayer, GPT2Block, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT (LoRA) or plain
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"FSDP: {type(base).__name__} names no decoder layer class in _no_split_modules ({sorted(names)}); "
            "use train.parallelism: ddp"
        )
    return layers


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
        save_json(os.path.join(path, "trainer.json"), {**trainer, "history": state.history})
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
    loss, margin = metrics["loss"], metrics["rewards/margins"]
    loss_tol = tol + cfg.initial_slope * tol
    bad_loss = cfg.initial_loss is not None and abs(loss - cfg.initial_loss) > loss_tol
    if not bad_loss and abs(margin) <= tol:
        return None
    want = f"loss {cfg.initial_loss:.6f} (±{loss_tol:g}) and " if cfg.initial_loss is not None else ""
    return (
        f"step 0 check failed: the policy starts from the reference weights, so {want}margins 0 (±{tol:g}) are "
        f"expected; found loss {loss:.6f}, margins {margin:.6f}. The stored reference log-probs do not match this "
        "model's forward. Likely causes: the scored artifact was made with another model or tokenizer "
        "(reference.model vs train.model), the reference backend computes the model differently (e.g. vLLM "
        "without the model's sliding window or softcapping: see the reference stage's parity numbers), or, "
        "in bf16, a tolerance too tight (train.initial_check_tolerance)."
    )


def batching_mismatch(
    model: Any, pairs: list[PairTokens], settings: TrainSettings, tolerance: float = 1e-3
) -> str | None:
    """The train forward in `settings.batching` against unbatched forwards with eager attention, on `pairs`.

    Run before training, in float32 without autocast: any model feature the batching mode gets wrong (a
    sliding window it ignores, a softcap, an attention variant nobody listed) shows up as a difference.
    Returns a message naming the largest difference (nats per sequence), or None when within `tolerance`.
    """
    from dpo_ray.logps import token_logps

    implementation = model.config._attn_implementation
    s = dataclasses.replace(settings, autocast_dtype=None)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            zero = torch.zeros(len(pairs), dtype=torch.float64)
            batched = _micro_batch_logps(model, StepBatch(pairs, zero, zero), s)
            model.set_attn_implementation("eager")
            want = []
            for side in (0, 1):
                for p in pairs:
                    completion = p.chosen_ids if side == 0 else p.rejected_ids
                    ids = torch.tensor([[*p.prompt_ids, *completion]], device=device)
                    lp = token_logps(model(input_ids=ids, use_cache=False).logits, ids)[0, len(p.prompt_ids) :]
                    want.append(float(lp.sum()))
    finally:
        model.set_attn_implementation(implementation)
        model.train(was_training)
    got = torch.cat([batched.chosen, batched.rejected]).double().cpu()
    worst = float((got - torch.tensor(want, dtype=torch.float64)).abs().max())
    if worst <= tolerance:
        return None
    return (
        f"batching {settings.batching!r} is not exact for this model ({model.config.model_type}): completion "
        f"log-probs differ from unbatched eager forwards by up to {worst:.4g} nats (tolerance {tolerance:g}) on "
        f"{len(pairs)} of the longest train pairs. Use train.batching: padded (or auto)."
    )


def _maybe_fail(spec: str | None, step: int, rank: int, output: str) -> None:
    """Testing hook: 'STEP:RANK' makes RANK exit abruptly once when it reaches STEP."""
    if not spec:
        return
    fail_step, fail_rank = (int(x) for x in spec.split(":"))
    marker = os.path.join(output, f".fault-injected-{fail_step}-{fail_rank}")
    if step == fail_step and rank == fail_rank and not os.path.exists(marker):
        os.makedirs(output, exist_ok=True)
        open(marker, "w").close()
        logger.warning("fault injection: rank %d exits at step %d", rank, step)
        # Ray Train registers reported checkpoints when it polls the workers (every 2 s); a crash this
        # soon after a report would also lose it in real life, so the simulated crash comes a little later.
        time.sleep(5)
        os._exit(1)


def _evaluate(model: Any, columns: dict[str, Any], cfg: LoopConfig, rank: int, world: int) -> dict[str, float]:
    sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64)
    n_rows = len(columns["prompt_ids"])
    for start in range(0, n_rows, cfg.batch_size):
        rows = np.arange(start, min(start + cfg.batch_size, n_rows))
        mine = rows[rank::world] if len(rows) >= world else (rows if rank == 0 else rows[:0])
        # Every rank calls eval_sums for every batch, with its pairs or none (see _aligned).
        sums += eval_sums(model, StepBatch.from_columns({k: v[mine] for k, v in columns.items()}), cfg.settings)
    return metric_means(_all_reduce(sums.to(_device(model))).cpu(), prefix="eval/")


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
    from dpo_ray.order import epoch_batches, read_split

    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available()
    cfg = dataclasses.replace(cfg, settings=resolve_batching(cfg.settings, use_gpu))
    seed_everything(cfg.seed)
    train_rows = read_split(cfg.scored_files, "train")
    eval_rows = read_split(cfg.scored_files, "eval") if cfg.eval_every else None
    model = disable_dropout(load_causal_lm(cfg.model, "float32", cfg.trust_remote_code))
    if cfg.settings.batching != "padded":
        enable_segment_attention(model)
    if use_gpu:
        model = model.cuda()
    problem = batching_mismatch(model, _check_pairs(train_rows), cfg.settings)
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
    while state.step < cfg.total_steps:
        batches = epoch_batches(len(train_rows["pair_id"]), cfg.batch_size, cfg.seed, state.epoch)
        for rows in batches[state.batch_in_epoch :]:
            batch = StepBatch.from_columns(worker_slice(train_rows, rows, rank, world))
            metrics = train_step(model, optimizer, scheduler, batch, cfg.settings, cfg.batch_size, world)
            state.step += 1
            state.batch_in_epoch += 1
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
                metrics.update(_evaluate(model, eval_rows, cfg, rank, world))
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
            if state.step % cfg.checkpoint_every == 0 or last:
                path = _save_checkpoint(model, optimizer, scheduler, state, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
            else:
                ray.train.report(metrics)
            if last:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    _export(model, cfg, rank)
