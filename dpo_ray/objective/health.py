"""Training health: the signals every log step records, and the guards that warn about or stop a run going bad.

Loss, reward accuracy and margins say whether the policy separates chosen from rejected, not whether it is
still a good model: DPO can push both completions' likelihoods down together ("likelihood displacement", Razin
et al., ICLR 2025; Pal et al. 2024, DPOP) while every curve looks ideal, and the policy then degenerates. The
signals (SIGNALS; computed by dpo_ray.objective.metrics, dpo_ray.train.step and the loop, logged as
`health/...`) show it as it happens, and each guard of HealthSpec (`train.health`) acts on one of them: `warn`
logs it and records it in the metrics, `stop` ends the stage with a message naming the signal, step, value
and remedies, keeping the checkpoints from before the alarm. A non-finite loss or gradient always stops.

No torch here: the config validates HealthSpec, and the workers get it whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALARM",
    "fired_steps",
    "CHOSEN_SHIFT",
    "GRAD_NORM_RATIO",
    "KL",
    "NONFINITE",
    "REJECTED_SHIFT",
    "REMEDIES",
    "SIGNALS",
    "Alarm",
    "Guard",
    "HealthSpec",
    "KLGuard",
    "RatioGuard",
    "ShiftGuard",
    "alarms",
    "grad_norm_ratio",
]

CHOSEN_SHIFT = "health/chosen_logp_shift"
REJECTED_SHIFT = "health/rejected_logp_shift"
KL = "health/kl"
GRAD_NORM_RATIO = "health/grad_norm_ratio"
NONFINITE = "health/nonfinite"
ALARM = "health/alarm/"  # + a guarded signal's name without "health/": set to 1 in the metrics of a step it fired at

# Each signal and the failure it reveals (docs/reference/losses.md lists them).
SIGNALS: dict[str, str] = {
    CHOSEN_SHIFT: "Per-token mean of log π − log πref over the chosen completions of the batch (nats per token). "
    "Falling well below 0 is likelihood displacement: the policy makes the preferred answers less likely than "
    "the reference did, and the probability goes to text neither completion holds (degenerate samples).",
    REJECTED_SHIFT: "The same over the rejected completions. Falling is what DPO does; falling together with the "
    "chosen shift is the displacement above.",
    KL: "Mean over the batch's chosen and rejected completions of log πref − log π (nats per sequence): KL(πref‖π) "
    "when the completions were sampled from πref (on-policy rounds), otherwise how far the policy moved on the "
    "training data. Growing without bound is the policy leaving the reference.",
    GRAD_NORM_RATIO: "The step's gradient norm over the median of the steps before it: a spike is an unstable "
    "step (learning rate too high, a bad batch).",
    NONFINITE: "1 when the step's loss or gradient norm is not finite (NaN or inf), else 0.",
}

REMEDIES = (
    "lower train.optim.lr; raise train.loss.beta; add an NLL term (train.loss.name: [sigmoid, sft]) or use dpop "
    "(DPO-Positive); train on on-policy data (generate)"
)


class Guard(BaseModel):
    """One guard: fires when its signal crosses `limit` (below it for the shifts, above it otherwise). Each
    signal's guard is a subclass with its own default limit, so setting only the action keeps that limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: float | None = Field(None, description="The threshold; null: the guard is off.")
    action: Literal["warn", "stop"] = Field("warn", description="warn: log and record it; stop: end the stage.")


class ShiftGuard(Guard):
    limit: float | None = Field(-1.0, description="nats per token; null: off.")


class KLGuard(Guard):
    limit: float | None = Field(None, description="nats per sequence; null: off.")


class RatioGuard(Guard):
    limit: float | None = Field(20.0, description="times the median gradient norm; null: off.")


class HealthSpec(BaseModel):
    """The guards of `train.health`. Defaults: docs/explanation/health.md says how they were chosen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chosen_logp_shift: ShiftGuard = Field(
        default_factory=ShiftGuard,
        description="Fires when the chosen completions' per-token log-prob shift falls below `limit` (nats/token).",
    )
    kl: KLGuard = Field(
        default_factory=KLGuard,
        description="Fires when the training-completion KL estimate exceeds `limit` (nats per sequence).",
    )
    grad_norm_ratio: RatioGuard = Field(
        default_factory=RatioGuard,
        description="Fires when a step's gradient norm exceeds `limit` times the median of the steps before it.",
    )
    after_step: int = Field(
        1, ge=1, description="Guards act from this step on (a short warmup before the signals mean anything)."
    )

    def guards(self) -> dict[str, tuple[Guard, bool]]:
        """signal name → (its guard, whether it fires below the limit)."""
        return {
            CHOSEN_SHIFT: (self.chosen_logp_shift, True),
            KL: (self.kl, False),
            GRAD_NORM_RATIO: (self.grad_norm_ratio, False),
        }


@dataclass(frozen=True)
class Alarm:
    """A guard that fired: its signal, the step, the value, the limit and the action."""

    signal: str
    step: int
    value: float
    limit: float
    action: str

    def message(self) -> str:
        side = "below" if self.signal in (CHOSEN_SHIFT, REJECTED_SHIFT) else "above"
        return (
            f"{self.signal} {self.value:.4g} at step {self.step}, {side} its limit {self.limit:g} "
            f"(train.health.{self.signal.removeprefix('health/')}); {SIGNALS[self.signal]} Remedies: {REMEDIES}"
        )

    @property
    def key(self) -> str:
        """The metric recording that it fired (ALARM + the signal's name)."""
        return ALARM + self.signal.removeprefix("health/")


def fired_steps(history: Iterable[Mapping[str, Any]]) -> dict[str, list[int]]:
    """The steps each guard fired at, by signal name without "health/", from a run's metrics (metrics.jsonl's
    lines: a step it fired at holds its Alarm.key)."""
    steps: dict[str, list[int]] = {}
    for h in history:
        for key in h:
            if key.startswith(ALARM):
                steps.setdefault(key.removeprefix(ALARM), []).append(int(h.get("step", 0)))
    return steps


def grad_norm_ratio(grad_norm: float, previous: list[float]) -> float:
    """`grad_norm` over the median of the previous steps' norms (1.0 at the first step or a zero median)."""
    finite = sorted(g for g in previous if math.isfinite(g))
    if not finite:
        return 1.0
    n = len(finite)
    median = finite[n // 2] if n % 2 else 0.5 * (finite[n // 2 - 1] + finite[n // 2])
    return grad_norm / median if median > 0 else 1.0


def alarms(metrics: dict[str, float], spec: HealthSpec, step: int) -> list[Alarm]:
    """The guards of `spec` that fire on this step's metrics (none before spec.after_step; a signal the metrics
    do not hold, e.g. the shifts of a reference-free loss, never fires)."""
    if step < spec.after_step:
        return []
    fired = []
    for signal, (guard, below) in spec.guards().items():
        value = metrics.get(signal)
        if guard.limit is None or value is None or not math.isfinite(value):
            continue
        if (value < guard.limit) if below else (value > guard.limit):
            fired.append(Alarm(signal, step, float(value), guard.limit, guard.action))
    return fired
