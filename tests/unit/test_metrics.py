from __future__ import annotations

import pytest
import torch

from dpo_ray.objective.losses import LossOutput
from dpo_ray.objective.metrics import PAIR_METRICS, metric_means, pair_metric_sums, throughput


def test_means_by_hand_and_additivity():
    """Values by hand, chosen and rejected kept apart (their means differ: a swap fails; they used to be equal, so it
    could not), and a tied pair, which is not counted as accurate (the reward must be strictly above)."""
    out = LossOutput(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.5, -1.0, 0.2]), torch.tensor([0.1, 1.0, 0.2]))
    sums = pair_metric_sums(out, torch.tensor([-4.0, -6.0, -5.0]), torch.tensor([-8.0, -4.0, -9.0]))
    m = metric_means(sums)
    assert m == pytest.approx(
        {
            "loss": 2.0,
            "rewards/chosen": -0.3 / 3,
            "rewards/rejected": 1.3 / 3,
            "rewards/accuracies": 1 / 3,
            "rewards/margins": (0.4 - 2.0 + 0.0) / 3,
            "logps/chosen": -5.0,
            "logps/rejected": -7.0,
        }
    )
    # Two parts added give the same means as the whole (what an all-reduce does).
    half = LossOutput(out.losses[:1], out.chosen_rewards[:1], out.rejected_rewards[:1])
    rest = LossOutput(out.losses[1:], out.chosen_rewards[1:], out.rejected_rewards[1:])
    added = pair_metric_sums(half, torch.tensor([-4.0]), torch.tensor([-8.0])) + pair_metric_sums(
        rest, torch.tensor([-6.0, -5.0]), torch.tensor([-4.0, -9.0])
    )
    assert metric_means(added, prefix="eval/") == pytest.approx({"eval/" + k: v for k, v in m.items()})
    assert set(m) == set(PAIR_METRICS)


def test_throughput_and_errors():
    assert throughput(1000, 10, 2.0) == {"tokens_per_sec": 500.0, "pairs_per_sec": 5.0}
    with pytest.raises(ValueError):
        throughput(1, 1, 0)
    with pytest.raises(ValueError, match="no pairs"):
        metric_means(torch.zeros(len(PAIR_METRICS) + 1))
