"""KTO and APO-zero (unpaired) through the real train step, against a computation written here: each sequence's
log-probs from its own eager forward, z₀ and the per-row losses from the KTO paper's formulas in float64, and
the gradient (no clipping) from autograd through
those unbatched forwards. Every batching mode and a micro-batch per row must give that gradient (read by the
optimizer at its step, before the step zeroes it)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.numerics import GRADS, LOGPS, assert_close_to_scale
from tests.unit.test_distributed_alignment import _model

# (prompt, completion, KL completion: another row's completion), label
ROWS = [
    (([1, 5, 6], [7, 8, 2], [6, 2]), True),
    (([1, 4], [6, 2], [3, 2]), False),
    (([1, 9, 9, 9], [3, 2], [8, 2]), True),
    (([1], [8, 2], [7, 8, 2]), False),
    (([1, 3, 3], [5, 5, 5, 2], [6, 2]), True),
]


class _Recording(torch.optim.SGD):
    """SGD that keeps a copy of each parameter's gradient as its step sees it."""

    def step(self, closure=None):  # type: ignore[override]
        self.seen = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _unbatched_logps(model, seqs):
    """Σ log π(completion | prompt) of each (prompt, completion), one eager forward each, with the graph."""
    out = []
    for prompt, completion in seqs:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("batching,budget", [("padded", 1000), ("packed", 1), ("prefix_shared", 12)])
def test_the_step_is_the_papers_loss_of_unbatched_forwards(name, batching, budget):
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_scheduler
    from dpo_ray.train.step import KTO_Z0, StepBatch, TrainSettings, train_step

    beta, wd, wu = 0.5, 1.0, 1.5
    model = _model()
    model.config._attn_implementation = "eager"
    # The reference: the policy's own log-probs moved by fixed amounts, so log-ratios and z0 are not 0.
    with torch.no_grad():
        pol_c = _unbatched_logps(model, [(p, c) for (p, c, _), _ in ROWS])
        pol_kl = _unbatched_logps(model, [(p, k) for (p, _, k), _ in ROWS])
    ref_c = pol_c + torch.tensor([0.8, -1.1, 0.3, 2.0, -0.6], dtype=torch.float64)
    ref_kl = pol_kl - torch.tensor([3.0, 1.0, 2.5, 0.5, 2.0], dtype=torch.float64)
    labels = [good for _, good in ROWS]

    # The expectation: z0 from the KL rows (before the step, without gradient), the per-row losses of the paper.
    z0 = max(0.0, float((pol_kl - ref_kl).mean())) if name == "kto" else 0.0
    logps = _unbatched_logps(model, [(p, c) for (p, c, _), _ in ROWS])
    losses = []
    for i, good in enumerate(labels):
        r = logps[i] - ref_c[i]
        if name == "kto":
            losses.append(
                wd * (1 - torch.sigmoid(beta * (r - z0))) if good else wu * (1 - torch.sigmoid(beta * (z0 - r)))
            )
        else:
            losses.append(wd * (1 - torch.sigmoid(beta * r)) if good else wu * torch.sigmoid(beta * r))
    want_loss = torch.stack(losses).mean()
    params = dict(model.named_parameters())
    want_grads = dict(zip(params, torch.autograd.grad(want_loss, list(params.values())), strict=True))
    model.zero_grad(set_to_none=True)
    ratios = (logps.detach() - ref_c).tolist()
    float_loss = sum(
        (wd * (1 - _sig(beta * (r - z0))) if g else wu * (1 - _sig(beta * (z0 - r))))
        if name == "kto"
        else (wd * (1 - _sig(beta * r)) if g else wu * _sig(beta * r))
        for r, g in zip(ratios, labels, strict=True)
    ) / len(labels)

    model.config._attn_implementation = "sdpa"
    if batching != "padded":
        model = enable_segment_attention(model)
    spec = LossSpec(name=name, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    settings = TrainSettings(loss=spec, token_budget=budget, batching=batching, max_grad_norm=None)
    batch = StepBatch([PairTokens(p, c, k) for (p, c, k), _ in ROWS], ref_c, ref_kl, labels=torch.tensor(labels))
    opt = _Recording(model.parameters(), lr=1e-3)
    metrics = train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), batch, settings, len(ROWS)).metrics

    # Loss: float32 forwards against the float64 formula; the log-probs agree to LOGPS relative (numerics.py),
    # ~3e-5 nats here, and the loss moves by at most β·max(weight)/4 per nat: far below 1e-5.
    assert metrics["loss"] == pytest.approx(float_loss, abs=1e-5)
    if name == "kto":
        assert metrics[KTO_Z0] == pytest.approx(z0, rel=LOGPS, abs=1e-5) and z0 > 1.0  # not clamped
    else:
        assert KTO_Z0 not in metrics
    assert metrics["count/desirable"] == 3 and metrics["count/undesirable"] == 2
    rewards = [beta * r for r in ratios]
    assert metrics["rewards/chosen"] == pytest.approx(
        sum(r for r, g in zip(rewards, labels, strict=True) if g) / 3, abs=1e-5
    )
    assert metrics["rewards/rejected"] == pytest.approx(
        sum(r for r, g in zip(rewards, labels, strict=True) if not g) / 2, abs=1e-5
    )
    for n, got in zip(params, opt.seen, strict=True):
        assert_close_to_scale(got, want_grads[n].float(), GRADS, f"{name} {batching} {n}")


def test_pairs_and_an_unpaired_loss_do_not_mix():
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    model = _model()
    zero = torch.zeros(1, dtype=torch.float64)
    pairs = StepBatch([PairTokens([1], [2], [3])], zero, zero)  # no labels: pairs
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="trains on unpaired rows: this batch holds pairs"):
        train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), pairs, TrainSettings(LossSpec(name="kto")), 1)


def test_a_config_feeds_an_unpaired_loss_unpaired_rows_and_a_paired_loss_pairs(tmp_path):
    """The stage that writes train's data (prepare, or generate on-policy) must write what the loss reads."""
    from pipeline.config import ConfigError, load_config

    base = [f"run_dir={tmp_path}", "prepare.inputs=[x.jsonl]", "prepare.tokenizer=t", "train.model=m"]
    with pytest.raises(ConfigError, match="trains on unpaired rows: set prepare.unpaired"):
        load_config(None, [*base, "train.loss.name=kto"])
    with pytest.raises(ConfigError, match="prepare.unpaired records: train.loss sigmoid trains on pairs"):
        load_config(None, [*base, "prepare.unpaired=records"])
    assert load_config(None, [*base, "train.loss.name=kto", "prepare.unpaired=pairs"]).prepare.unpaired == "pairs"
    on_policy = [*base, "on_policy_first_round=true", "generate.policy=m", "reference.model=m"]
    with pytest.raises(ConfigError, match="set generate.unpaired"):
        load_config(None, [*on_policy, "train.loss.name=kto"])
    cfg = load_config(None, [*on_policy, "train.loss.name=kto", "generate.unpaired=threshold"])
    assert cfg.generate.unpaired == "threshold" and cfg.prepare.unpaired is None  # prepare gives prompts only
    with pytest.raises(ConfigError, match="desirable_threshold is read with unpaired: threshold only"):
        load_config(
            None, [*on_policy, "train.loss.name=kto", "generate.unpaired=pairs", "generate.desirable_threshold=1"]
        )
