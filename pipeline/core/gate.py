"""The evaluation gate of `run` (config `gate`): did a round's policy beat its reference, within the KL budget?

An evaluation (pipeline.stages.evaluation.statistics) holds the policy's reward gain over its reference, paired
per prompt, with its standard error, and the KL(π‖πref) estimate. The gate passes when the gain exceeds
`gate.reward_se` standard errors and the KL is within `gate.max_kl`. `run` judges each round's evaluation before
building the next round on its policy; status, the summary and the report show the verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpo_ray.errors import UserError

__all__ = ["GateFailed", "Verdict", "failed_gate", "gated", "judge"]


class GateFailed(UserError, RuntimeError):
    """A round's policy failed the gate and gate.on_fail is stop: exit status 4, after the summary."""

    exit_status = 4


@dataclass(frozen=True)
class Verdict:
    """passed, and why not (one reason per failed test)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        """ "passed", or "FAILED: " and the reasons (the summary's gate column; failed_gate reads it back)."""
        return "passed" if self.passed else "FAILED: " + "; ".join(self.reasons)


def failed_gate(line: str | None) -> bool:
    """Whether a verdict's line (Verdict.line; None: no gate) says it failed."""
    return bool(line) and str(line).startswith("FAILED")


def gated(gate: Any) -> bool:
    """Whether the gate tests anything (a reward test or a KL budget)."""
    return gate.reward_se is not None or gate.max_kl is not None


def judge(evaluation: dict[str, Any], gate: Any) -> Verdict:
    """The gate's verdict on an evaluation (eval.json's content) under `gate` (a GateConfig)."""
    reasons = []
    if gate.reward_se is not None:
        gain, se = evaluation.get("reward_gain"), evaluation.get("reward_gain_stderr")
        if gain is None:  # an evaluation from before the gain was recorded: the unpaired difference
            gain = evaluation["policy"]["reward_mean"] - evaluation["reference"]["reward_mean"]
            se = _unpaired_se(evaluation)
        bound = gate.reward_se * (se or 0.0)
        if not gain > bound:
            reasons.append(
                f"the reward gain over the reference {gain:+.3f} ± {se or 0.0:.3f} is not above {gate.reward_se:g} "
                f"standard errors ({bound:.3f})"
            )
    if gate.max_kl is not None and evaluation["kl"] > gate.max_kl:
        reasons.append(f"KL(π‖πref) {evaluation['kl']:.2f} is above the budget gate.max_kl {gate.max_kl:g}")
    return Verdict(not reasons, reasons)


def _unpaired_se(evaluation: dict[str, Any]) -> float:
    a, b = evaluation["policy"].get("reward_stderr") or 0.0, evaluation["reference"].get("reward_stderr") or 0.0
    return float((a * a + b * b) ** 0.5)
