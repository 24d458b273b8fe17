"""Turning scored samples of one prompt into preference pairs (on-policy regeneration).

Strategies, for the samples of one prompt with rewards r:
- best_vs_worst: the highest- against the lowest-reward sample (one pair), if their rewards differ;
- margin: every pair (i, j) with r_i − r_j >= threshold (highest gaps first), at most `max_pairs`;
- all_pairs: every pair with r_i > r_j (highest gaps first), at most `max_pairs`.
Pairs with equal rewards (ties) or identical completions are never made; they are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["STRATEGIES", "PairingResult", "pair_samples"]

STRATEGIES = ("best_vs_worst", "margin", "all_pairs")


@dataclass(frozen=True)
class PairingResult:
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into the samples
    ties: int  # candidate pairs dropped because rewards were equal
    identical: int  # candidate pairs dropped because completions were the same


def pair_samples(
    completions: Sequence[Sequence[int]],
    rewards: Sequence[float],
    strategy: str = "best_vs_worst",
    margin: float = 0.0,
    max_pairs: int = 1,
) -> PairingResult:
    """Pairs (chosen, rejected) of sample indices for one prompt."""
    if strategy not in STRATEGIES:
        raise ValueError(f"pairing strategy {strategy!r}: expected one of {STRATEGIES}")
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards")
    n = len(rewards)
    if strategy == "best_vs_worst":
        if n < 2:
            return PairingResult([], 0, 0)
        best = max(range(n), key=lambda i: (rewards[i], -i))
        worst = min(range(n), key=lambda i: (rewards[i], i))
        if rewards[best] == rewards[worst]:
            return PairingResult([], 1, 0)
        if list(completions[best]) == list(completions[worst]):
            return PairingResult([], 0, 1)
        return PairingResult([(best, worst)], 0, 0)
    threshold = margin if strategy == "margin" else 0.0
    candidates, ties, identical = [], 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            hi, lo = (i, j) if rewards[i] >= rewards[j] else (j, i)
            gap = rewards[hi] - rewards[lo]
            if gap == 0:
                ties += 1
            elif list(completions[hi]) == list(completions[lo]):
                identical += 1
            elif gap >= threshold:
                candidates.append((gap, hi, lo))
    candidates.sort(key=lambda t: (-t[0], t[1], t[2]))
    return PairingResult([(hi, lo) for _, hi, lo in candidates[:max_pairs]], ties, identical)
