"""The DPO training step, without Ray: settings, the batching-mode registry, micro-batches and the loss.

`train_step` takes this worker's pairs of a global batch, splits them into token-budget micro-batches
(gradient accumulation) and makes one optimizer step. Each worker's loss is
    (world_size / global_batch_size) · Σ_{its pairs} loss_i
so that after DDP/FSDP average the gradients across workers, every update is the gradient of the mean
loss over the global batch, however the pairs were split across workers and micro-batches. Tests and the
benchmarks (one GPU, no Ray) use it directly; dpo_ray.train.loop runs it inside Ray Train.

torch only at import (transformers through the model object, and in the segment attention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpo_ray.compute.attention import SDPA_BACKENDS
from dpo_ray.compute.batching import (
    BATCHING,
    PairLogps,
    PairTokens,
    collate_padded,
    plan_micro_batches,
    policy_logps,
)
from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_logps
from dpo_ray.compute.logps import DEFAULT_CHUNK_TOKENS
from dpo_ray.data.schema import SEQUENCE_COLUMNS
from dpo_ray.objective.losses import BatchState, LossState, aot_partners, aot_values, preference_loss
from dpo_ray.objective.metrics import (
    GRAD_NORM,
    HEALTH_SUMS,
    LR,
    NONFINITE,
    PAIR_METRICS,
    health_means,
    health_sums,
    metric_means,
    pair_metric_sums,
    throughput,
    unpaired_metric_means,
    unpaired_metric_sums,
)
from dpo_ray.objective.spec import LossSpec
from dpo_ray.objective.unpaired import reference_point, unpaired_losses
from dpo_ray.train.collectives import aligned, all_reduce_sum, gather_rows

__all__ = [
    "KTO_KL",
    "KTO_Z0",
    "MODES",
    "BatchingMode",
    "StepBatch",
    "StepResult",
    "TrainSettings",
    "eval_sums",
    "micro_batch_logps",
    "model_device",
    "train_step",
    "uses_fused_head",
]


@dataclass(frozen=True)
class TrainSettings:
    """What one optimizer step needs to know: the loss, whole, and how to compute it. The batching mode and
    attention kernel arrive resolved (pipeline.stages.train decides `auto` once, before the workers start)."""

    loss: LossSpec = LossSpec()
    token_budget: int = 16_384
    max_grad_norm: float | None = 1.0
    autocast_dtype: torch.dtype | None = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    pad_token_id: int = 0
    batching: str = "padded"  # padded | packed | prefix_shared (dpo_ray.compute.batching.BATCHING)
    cudnn_attention: bool = False  # allow cuDNN SDPA too (slower here: see dpo_ray.compute.attention.SDPA_BACKENDS)
    fused_head: bool = False  # segment modes: log-probs through dpo_ray.compute.fused_head (enabled on the model)
    # segment modes: a row of at least this many tokens takes the fused head even without fused_head (0: none);
    # the model must have the fused head enabled when this is set
    fused_head_from: int = 0
    attention: str = "blocks"  # segment modes: blocks | flex (dpo_ray.compute.attention)
    # k ranks share each row's tokens (dpo_ray.compute.sequence_parallel; its join_groups made the group): the k
    # ranks of a group train the same pairs, so the step's all-reduced sums count each pair k times
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"TrainSettings.batching {self.batching!r}: expected one resolved mode of {BATCHING}")
        if self.attention not in ("blocks", "flex"):
            raise ValueError(f"TrainSettings.attention {self.attention!r}: expected a resolved kernel, blocks or flex")
        if self.sequence_parallel > 1:
            refused = [
                what
                for what, on in (
                    (f"batching {self.batching} (a padding-free mode shards one row)", self.batching == "padded"),
                    (f"loss {self.loss.label} (AOT sorts a batch gathered from every rank)", self.loss.sorting),
                )
                if on
            ]
            if refused:
                raise ValueError(f"sequence_parallel {self.sequence_parallel} does not apply {'; '.join(refused)}")


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: its metrics (global: all-reduced) and the loss state after it (LossState)."""

    metrics: dict[str, float]
    loss_state: LossState


@dataclass(frozen=True)
class StepBatch:
    """This worker's pairs of one global batch, with their reference log-prob sums (B,) float64.

    Unpaired rows (an unpaired loss: kto, apo_zero_unpaired) travel in the same shape, so every batching mode
    computes them unchanged: the row's completion in the chosen slot, its mismatched KL completion (another
    row's completion after this row's prompt, dpo_ray.data.unpaired.kl_partners) in the rejected slot, and
    `labels` (B,) bool, True for a desirable completion."""

    pairs: list[PairTokens]
    ref_chosen: Tensor
    ref_rejected: Tensor
    partners: Tensor | None = None  # (B, 2): AOT's sorted partners over the global batch (_with_aot_partners)
    labels: Tensor | None = None  # (B,) bool: unpaired rows only

    @classmethod
    def from_columns(cls, batch: dict[str, Any]) -> StepBatch:
        """From a columnar batch with prompt_ids, chosen_ids, rejected_ids, ref_chosen_logp, ref_rejected_logp
        (pairs), or with prompt_ids, completion_ids, kl_completion_ids, ref_completion_logp, ref_kl_logp and
        label (unpaired rows)."""
        unpaired = "label" in batch
        (first, _, ref_first), (second, _, ref_second) = SEQUENCE_COLUMNS["unpaired" if unpaired else "pairs"]
        pairs = [
            PairTokens(list(map(int, p)), list(map(int, c)), list(map(int, r)))
            for p, c, r in zip(batch["prompt_ids"], batch[first], batch[second], strict=True)
        ]
        labels = torch.tensor(np.asarray(batch["label"], dtype=bool)) if unpaired else None
        return cls(
            pairs,
            torch.tensor(np.asarray(batch[ref_first], dtype=np.float64)),
            torch.tensor(np.asarray(batch[ref_second], dtype=np.float64)),
            labels=labels,
        )

    def select(self, index: list[int]) -> StepBatch:
        partners = None if self.partners is None else self.partners[index]
        labels = None if self.labels is None else self.labels[index]
        return StepBatch(
            [self.pairs[i] for i in index], self.ref_chosen[index], self.ref_rejected[index], partners, labels
        )

    @property
    def tokens(self) -> int:
        return sum(p.num_tokens for p in self.pairs)


def _sync(model: Any, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradient sync on or off for this backward (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class BatchingMode:
    """How one batching mode lays out and computes a micro-batch (dpo_ray.compute.batching's module docstring).

    collate: (pairs, pad_token_id) → a batch with `.to(device)`; logps: (model, batch, settings) →
    PairLogps (the segment modes through the configured fused head and attention kernel);
    segment_attention: the model needs dpo_ray.compute.attention's function switched on. Each mode's cost
    (tokens a forward computes, the planner's budget unit) is dpo_ray.compute.batching.computed_tokens.
    """

    collate: Callable[[Sequence[PairTokens], int], Any]
    logps: Callable[[Any, Any, TrainSettings], PairLogps]
    segment_attention: bool


def uses_fused_head(s: TrainSettings, row_tokens: int) -> bool:
    """Whether a padding-free row of `row_tokens` tokens takes the fused head: always with fused_head, else from
    fused_head_from tokens on (its unfused logits would be the step's largest tensor)."""
    return s.fused_head or 0 < s.fused_head_from <= row_tokens


def _segment_logps(model: Any, batch: Any, s: TrainSettings) -> PairLogps:
    fused = uses_fused_head(s, batch.num_tokens)
    if s.sequence_parallel > 1:
        from dpo_ray.compute.sequence_parallel import current_group, sequence_parallel_logps

        group = current_group(s.sequence_parallel)
        return sequence_parallel_logps(model, batch, group, s.chunk_tokens, s.attention, fused=fused)
    return segment_logps(model, batch, s.chunk_tokens, fused=fused, kernel=s.attention)


MODES: dict[str, BatchingMode] = {
    "padded": BatchingMode(
        collate_padded, lambda model, batch, s: policy_logps(model, batch, s.chunk_tokens), segment_attention=False
    ),
    "packed": BatchingMode(lambda pairs, pad: collate_packed(pairs), _segment_logps, segment_attention=True),
    "prefix_shared": BatchingMode(
        lambda pairs, pad: collate_prefix_shared(pairs), _segment_logps, segment_attention=True
    ),
}
assert tuple(MODES) == BATCHING


def micro_batch_logps(model: Any, batch: StepBatch, s: TrainSettings) -> PairLogps:
    """Summed completion log-probs of the batch's pairs, in the configured batching mode."""
    device = model_device(model)
    mode = MODES[s.batching]
    autocast = torch.autocast(device.type, dtype=s.autocast_dtype) if s.autocast_dtype else contextlib.nullcontext()
    backends = [*SDPA_BACKENDS, SDPBackend.CUDNN_ATTENTION] if s.cudnn_attention else SDPA_BACKENDS
    with autocast, sdpa_kernel(backends):
        return mode.logps(model, mode.collate(batch.pairs, s.pad_token_id).to(device), s)


def _micro_batch_loss(
    model: Any, batch: StepBatch, s: TrainSettings, delta: float, z0: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Summed loss of the batch's pairs (graph attached), and its metric sums followed by the sums of the
    two shift rewards (LossOutput.shift_rewards; zeros when no member reads BCO's δ) and the health sums
    (dpo_ray.objective.metrics.health_sums). Unpaired rows: their loss with KTO's reference point `z0`, and
    unpaired_metric_sums in the same layout."""
    device = model_device(model)
    lp = micro_batch_logps(model, batch, s)
    if s.loss.unpaired:
        if batch.labels is None:
            raise ValueError(f"loss {s.loss.label} trains on unpaired rows: this batch holds pairs (no labels)")
        labels, ref = batch.labels.to(device), batch.ref_chosen.to(device)
        spec = s.loss
        rows = unpaired_losses(
            str(spec.name), lp.chosen, ref, labels, z0, spec.beta, spec.desirable_weight, spec.undesirable_weight
        )
        sums, health = unpaired_metric_sums(rows.losses, rows.rewards, lp.chosen, labels, lp.chosen_lengths, ref)
        no_shift = torch.zeros(2, dtype=torch.float64, device=device)
        return rows.losses.sum(), torch.cat([sums, no_shift, health])
    partners = None if batch.partners is None else batch.partners.to(device)
    out = preference_loss(
        s.loss,
        lp.chosen,
        lp.rejected,
        batch.ref_chosen.to(device),
        batch.ref_rejected.to(device),
        lp.chosen_lengths,
        lp.rejected_lengths,
        BatchState(bco_delta=delta, aot_partners=partners),
    )
    shift = torch.zeros(2, dtype=torch.float64, device=device)
    if out.shift_rewards is not None:
        shift = out.shift_rewards.double().sum(dim=1)
    health = health_sums(lp, batch.ref_chosen.to(device), batch.ref_rejected.to(device))
    return out.losses.sum(), torch.cat([pair_metric_sums(out, lp.chosen, lp.rejected), shift, health])


# The layout of a step's sums: pair_metric_sums (the pair count last), the two shift-reward sums, the health sums.
_SUMS = len(PAIR_METRICS) + 1
_SHIFT = _SUMS
_HEALTH = _SUMS + 2
_WIDTH = _HEALTH + HEALTH_SUMS


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: StepBatch,
    settings: TrainSettings,
    global_batch_size: int,
    world_size: int = 1,
    loss_state: LossState | None = None,
) -> StepResult:
    """One optimizer step on this worker's pairs of a global batch; metrics are global (all-reduced).

    batch: this worker's share (>= 1 pair) of a global batch of `global_batch_size` pairs.
    loss_state: what the loss carries between steps (BCO's δ; default: the first step's).
    Returns the metrics of dpo_ray.objective.metrics for the whole global batch, plus grad_norm and lr, and the loss
    state after this step (for BCO, δ updated with this global batch's mean rewards: the same on every rank).
    """
    if not batch.pairs:
        raise ValueError("train_step: this worker got no pairs; global batch_size must be >= the worker count")
    state = loss_state or LossState()
    model.train()
    t0 = time.perf_counter()
    groups = aligned(plan_micro_batches(batch.pairs, settings.token_budget, settings.batching), model_device(model))
    scale = world_size / global_batch_size
    batch = _with_aot_partners(model, batch, settings, groups)
    z0, kl = _kto_reference_point(model, batch, settings, groups)
    sums = torch.zeros(_WIDTH, dtype=torch.float64)
    for k, index in enumerate(groups):
        with _sync(model, enabled=k == len(groups) - 1):
            if index is None:  # keeps this rank's collectives in step with ranks that have more micro-batches
                loss_sum, _ = _micro_batch_loss(model, _placeholder(settings), settings, state.bco_delta, z0)
                (loss_sum * 0.0).backward()
                continue
            loss_sum, metric_sums = _micro_batch_loss(model, batch.select(index), settings, state.bco_delta, z0)
            (loss_sum * scale).backward()
        sums += metric_sums.cpu()
    max_norm = settings.max_grad_norm if settings.max_grad_norm else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.tensor([float(batch.tokens)], dtype=torch.float64)
    reduced = all_reduce_sum(torch.cat([sums, tokens]).to(model_device(model))).cpu() / settings.sequence_parallel
    seconds = time.perf_counter() - t0
    metrics = unpaired_metric_means(reduced[:_SUMS]) if settings.loss.unpaired else metric_means(reduced[:_SUMS])
    metrics.update({GRAD_NORM: float(grad_norm), LR: lr})
    if settings.loss.name == "kto":
        metrics[KTO_Z0], metrics[KTO_KL] = z0, kl
    pairs = int(reduced[_SUMS - 1])
    metrics.update(throughput(int(reduced[-1]), pairs, seconds))
    metrics.update(health_means(reduced[_HEALTH:_WIDTH], pairs if settings.loss.unpaired else 2 * pairs))
    metrics[NONFINITE] = float(not (math.isfinite(metrics["loss"]) and math.isfinite(float(grad_norm))))
    if settings.loss.shifted:
        metrics["bco/delta"] = state.bco_delta  # the δ this step used
        state = state.after(float(reduced[_SHIFT]) / pairs, float(reduced[_SHIFT + 1]) / pairs)
    return StepResult(metrics, state)


def eval_sums(model: Any, batch: StepBatch, settings: TrainSettings, loss_state: LossState | None = None) -> Tensor:
    """pair_metric_sums (not yet all-reduced) of a batch without gradients, with the loss state's δ."""
    delta = (loss_state or LossState()).bco_delta
    model.eval()
    sums = torch.zeros(_SUMS, dtype=torch.float64)
    groups = aligned(plan_micro_batches(batch.pairs, settings.token_budget, settings.batching), model_device(model))
    batch = _with_aot_partners(model, batch, settings, groups)
    z0, _ = _kto_reference_point(model, batch, settings, groups)
    with torch.no_grad():
        for index in groups:
            if index is None:
                _micro_batch_loss(model, _placeholder(settings), settings, delta, z0)
            else:
                sums += _micro_batch_loss(model, batch.select(index), settings, delta, z0)[1][:_SUMS].cpu()
    return sums


KTO_Z0 = "kto/z0"  # the reference point of the step's global batch (dpo_ray.objective.unpaired.reference_point)
KTO_KL = "kto/kl"  # the KL estimate z₀ clamps at 0: the batch's mean log-ratio of the KL completions


def _kto_reference_point(
    model: Any, batch: StepBatch, s: TrainSettings, groups: list[list[int] | None]
) -> tuple[float, float]:
    """KTO's z₀ for the whole global batch and the KL estimate it clamps (the mean log-ratio before max(0, ·)):
    the policy's log-probs of each row's KL completion (a forward without gradients, _logps_without_grad); the
    sums of log π − log πref over them and their count are all-reduced over every rank, so z₀ is the same for any
    number of workers or micro-batches. (0, 0) for any other loss (no forward)."""
    if s.loss.name != "kto":
        return 0.0, 0.0
    _, kl_logps, _ = _logps_without_grad(model, batch, s, groups)
    total = torch.tensor([float((kl_logps - batch.ref_rejected.double()).sum()), len(batch.pairs)], dtype=torch.float64)
    reduced = all_reduce_sum(total.to(model_device(model))).cpu()
    total_sum, count = float(reduced[0]), int(reduced[1])
    return reference_point(total_sum, count), total_sum / count if count else 0.0


def _logps_without_grad(
    model: Any, batch: StepBatch, s: TrainSettings, groups: list[list[int] | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """The chosen and the rejected log-prob sums (B,) of this rank's pairs and their lengths (2, B), float64 on
    the CPU, from a forward without gradients over its micro-batches: the same count on every rank, placeholders
    included (collectives.aligned), so that FSDP's all-gathers stay in step."""
    n = len(batch.pairs)
    chosen = torch.zeros(n, dtype=torch.float64)
    rejected = torch.zeros(n, dtype=torch.float64)
    lengths = torch.ones(2, n, dtype=torch.float64)
    with torch.no_grad():
        for index in groups:
            part = _placeholder(s) if index is None else batch.select(index)
            lp = micro_batch_logps(model, part, s)
            if index is not None:
                chosen[index], rejected[index] = lp.chosen.double().cpu(), lp.rejected.double().cpu()
                lengths[0, index] = lp.chosen_lengths.double().cpu()
                lengths[1, index] = lp.rejected_lengths.double().cpu()
    return chosen, rejected, lengths


def _with_aot_partners(model: Any, batch: StepBatch, s: TrainSettings, groups: list[list[int] | None]) -> StepBatch:
    """For an AOT loss: `batch` with each pair's partners in the sorted order of the whole global batch. A
    forward without gradients over this rank's micro-batches (_logps_without_grad) gives its pairs' values;
    every rank gathers all of them (rank order), so the loss is the same for any number of workers or
    micro-batches. Other losses: `batch` as it is."""
    name = s.loss.sorting
    if name is None:
        return batch
    n = len(batch.pairs)
    chosen, rejected, lengths = _logps_without_grad(model, batch, s, groups)
    ref_c, ref_r = batch.ref_chosen.double(), batch.ref_rejected.double()
    if s.loss.average_logps:
        chosen, rejected = chosen / lengths[0], rejected / lengths[1]
        ref_c, ref_r = ref_c / lengths[0], ref_r / lengths[1]
    x, y = aot_values(name, chosen - ref_c, rejected - ref_r, ref_c - ref_r)
    everything, start = gather_rows(torch.stack([x, y], dim=1))
    partners = aot_partners(everything[:, 0], everything[:, 1])[start : start + n]
    return dataclasses.replace(batch, partners=partners)


def _placeholder(settings: TrainSettings) -> StepBatch:
    """A one-token pair whose loss is multiplied by 0 or discarded: a forward (and backward) that only
    takes part in the collectives."""
    t = settings.pad_token_id
    zero = torch.zeros(1, dtype=torch.float64)
    labels = torch.ones(1, dtype=torch.bool) if settings.loss.unpaired else None
    return StepBatch([PairTokens([t], [t], [t])], zero, zero, labels=labels)
