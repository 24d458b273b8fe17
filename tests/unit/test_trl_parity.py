"""Side by side with TRL 1.16's DPOTrainer, the peer most users compare against: the same pairs (TRL's own
tokenization), the same policy and reference weights; TRL's `compute_loss` + backward against this
project's train step. First-step loss and gradient norm agree (relative 5e-4: TRL's own float32 error, see
RTOL) for every loss both implement, and for a weighted combination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

CORPUS = [
    f"the movie was {w} and the plot {v} until the end"
    for w in ("good", "bad", "fine", "awful", "great", "dull")
    for v in ("worked", "failed", "dragged", "flew")
]
ROWS = [
    {
        "prompt": f"review {i}: the movie",
        "chosen": " was good and the plot worked",
        "rejected": " was bad" + " and the plot failed" * (i % 3),
    }
    for i in range(6)
]
# Chosen completions of several lengths, for the cases with an sft member: TRL's "sft" term averages over all chosen
# tokens of the batch, this project's over each pair's tokens, then over pairs (ORPO/RPO's per-sequence form). On
# ROWS (chosen of one length) the two are one, and the MPO case could not see how its sft member is normalised.
# (Not for every case: longer chosen completions give larger log-ratios, where TRL's float32 error in the losses
# that exponentiate them exceeds RTOL; measured 8e-4 on forward_kl's gradient norm, this project's 1.4e-6.)
MIXED_ROWS = [row | {"chosen": " was good" + " and the plot worked" * (i % 4)} for i, row in enumerate(ROWS)]
# For AOT, pairs whose margins the two models order differently: on ROWS (and MIXED_ROWS) both rank the margins by
# length, sorting pairs each margin with its own, and AOT was DPO (1e-5 apart: a sort-free AOT passed).
_W, _V = ("good", "bad", "fine", "awful", "great", "dull"), ("worked", "failed", "dragged", "flew")
WORD_ROWS = [
    {
        "prompt": f"review {i}: the movie",
        "chosen": f" was {_W[i % 6]} and the plot {_V[i % 4]}",
        "rejected": f" was {_W[(i + 3) % 6]} and the plot {_V[(i + 1) % 4]}",
    }
    for i in range(6)
]
# (TRL loss_type list, TRL config extras, this project's LossSpec extras)
CASES: dict[str, tuple[list[str], dict[str, Any], dict[str, Any]]] = {
    "sigmoid": (["sigmoid"], {}, {}),
    "hinge": (["hinge"], {}, {}),
    "ipo": (["ipo"], {}, {"average_logps": True}),  # TRL's IPO is on per-token means
    "exo_pair": (["exo_pair"], {"label_smoothing": 1e-3}, {"label_smoothing": 1e-3}),
    "nca_pair": (["nca_pair"], {}, {}),
    "robust": (["robust"], {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "bco_pair": (["bco_pair"], {}, {}),  # TRL 1.16 keeps no running shift: δ = 0, this project's δ at step 1
    "sppo_hard": (["sppo_hard"], {}, {}),
    "apo_zero": (["apo_zero"], {}, {}),
    "apo_down": (["apo_down"], {}, {}),
    "discopop": (["discopop"], {"discopop_tau": 0.2}, {"discopop_tau": 0.2}),
    "sigmoid_norm": (["sigmoid_norm"], {}, {}),
    "aot": (["aot"], {}, {}),  # TRL sorts over its batch, here the whole batch of 6
    "aot_unpaired": (["aot_unpaired"], {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "f-js": (["sigmoid"], {"f_divergence_type": "js_divergence"}, {"f_divergence": "js_divergence"}),
    "f-forward": (["sigmoid"], {"f_divergence_type": "forward_kl"}, {"f_divergence": "forward_kl"}),
    "f-alpha": (
        ["sigmoid"],
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"f_divergence": "alpha_divergence", "f_alpha": 0.3},
    ),
    "mpo": (["sigmoid", "nca_pair", "sft"], {"loss_weights": [0.8, 0.3, 1.0]}, {"weights": [0.8, 0.3, 1.0]}),
    "weighted": (["sigmoid", "nca_pair"], {"loss_weights": [0.8, 0.3]}, {"weights": [0.8, 0.3]}),
}
SFT_WEIGHT = {"mpo": 1.0}  # the weight of each case's sft member
CASE_ROWS = {"mpo": MIXED_ROWS, "aot": WORD_ROWS, "aot_unpaired": WORD_ROWS}
# AOT against the pairwise loss it reduces to when sorting pairs each margin with its own: (loss, ε)
UNSORTED = {"aot": ("sigmoid", 0.0), "aot_unpaired": ("sigmoid", 0.1)}
BETA = 0.3
DTYPE = torch.float32
# The bound is TRL's float32 error: on these models its sigmoid loss is 1.9e-5 from a float64 computation
# (this project's 3e-7; tests/unit/test_logps.py holds its log-probs to float64), and losses that square or
# exponentiate log-ratios (sppo_hard, forward_kl, alpha) amplify it: measured up to 1.5e-4 (loss) and 2.8e-4
# (gradient norm). A loss defined differently (sums vs per-token means, another ε) is off by far more.
RTOL = 5e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from dpo_ray.models.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("trl")
    build_tiny_llama(root / "policy", CORPUS, seed=0)
    build_tiny_llama(root / "reference", CORPUS, seed=1)  # another model: log-ratios far from 0
    return {"policy": root / "policy", "reference": root / "reference", "root": root}


def _grad_norm(model: Any) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_step_matches_trl(models, case):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.compute.batching import PairTokens, completion_logps
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    loss_type, trl_extra, ours_extra = CASES[case]
    tok = load_tokenizer(str(models["policy"]))
    args = DPOConfig(
        output_dir=str(models["root"] / "out"),
        report_to=[],
        max_length=None,
        use_cpu=True,
        loss_type=loss_type,
        beta=BETA,
        per_device_train_batch_size=len(ROWS),
        **trl_extra,
    )
    trainer = DPOTrainer(
        model=load_causal_lm(str(models["policy"])).to(DTYPE),
        ref_model=load_causal_lm(str(models["reference"])).to(DTYPE),
        args=args,
        train_dataset=Dataset.from_list(CASE_ROWS.get(case, ROWS)),
        processing_class=tok,
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad = _grad_norm(trainer.model)

    rows = list(trainer.train_dataset)  # TRL's own ids (this project's tokenization matches them: test_tokenization)
    pairs = [PairTokens(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
    reference = load_causal_lm(str(models["reference"])).to(DTYPE)
    with torch.no_grad():
        ref = completion_logps(
            reference,
            [p.prompt_ids for p in pairs] * 2,
            [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
            0,
        )
    sums = torch.tensor([sum(x) for x in ref], dtype=torch.float64)
    n = len(pairs)
    policy = load_causal_lm(str(models["policy"])).to(DTYPE)
    names = loss_type[0] if len(loss_type) == 1 else list(loss_type)
    loss = LossSpec(name=names, beta=BETA, **ours_extra)
    settings = TrainSettings(loss, batching="padded", max_grad_norm=None)
    optimizer = make_optimizer(policy, "adamw", 1e-3, 0.0)
    metrics = train_step(
        policy,
        optimizer,
        make_scheduler(optimizer, 0, 1, "constant"),
        StepBatch(pairs, sums[:n], sums[n:]),
        settings,
        n,
    ).metrics
    expected = float(trl_loss)
    if case in UNSORTED:  # the sort matters on these pairs: AOT is far (> 5 x the bound) from its unsorted form
        from tests.loss_calls import loss as spec_loss

        with torch.no_grad():
            pol = completion_logps(
                load_causal_lm(str(models["policy"])).to(DTYPE),
                [p.prompt_ids for p in pairs] * 2,
                [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                0,
            )
        lp = torch.tensor([sum(x) for x in pol], dtype=torch.float64)
        lengths = torch.tensor([len(x) for x in pol], dtype=torch.float64)
        args = (lp[:n], lp[n:], sums[:n], sums[n:], lengths[:n], lengths[n:])
        name, eps = UNSORTED[case]
        unsorted = float(spec_loss(name, *args, beta=BETA, label_smoothing=eps).losses.mean())
        assert abs(unsorted - expected) > 5 * RTOL * abs(expected)
    if case in SFT_WEIGHT:  # the sft members' definitions differ (ROWS): compare the rest, and the difference is real
        with torch.no_grad():
            chosen = completion_logps(
                load_causal_lm(str(models["policy"])).to(DTYPE),
                [p.prompt_ids for p in pairs],
                [p.chosen_ids for p in pairs],
                0,
            )
        ours_nll = sum(-sum(x) / len(x) for x in chosen) / n
        trl_nll = -sum(sum(x) for x in chosen) / sum(len(x) for x in chosen)
        # the difference is far above the bound, so a project sft normalised as TRL's would fail here
        assert SFT_WEIGHT[case] * abs(ours_nll - trl_nll) > 5 * RTOL * abs(expected)
        expected += SFT_WEIGHT[case] * (ours_nll - trl_nll)
    assert metrics["loss"] == pytest.approx(expected, rel=RTOL), case
    if case not in SFT_WEIGHT:  # the sft members' gradients differ by the same definition ("weighted" is MPO without)
        assert metrics["grad_norm"] == pytest.approx(trl_grad, rel=RTOL), case


REFERENCE_FREE_CASES = {
    # name: (TRL trainer module, trainer and config class names, TRL config extras, this project's settings)
    "orpo": ("trl.experimental.orpo", "ORPO", {"beta": 0.2}, {"orpo_lambda": 0.2}),  # TRL's β is ORPO's λ
    "simpo": (
        "trl.experimental.cpo",
        "CPO",
        {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0},
        {"beta": 2.0, "simpo_gamma": 0.5},
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_FREE_CASES))
def test_reference_free_first_step_matches_trl(models, case):
    """SimPO against TRL's CPOTrainer (loss_type simpo, no BC term), ORPO against its ORPOTrainer."""
    import importlib

    from datasets import Dataset

    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import StepBatch, TrainSettings, train_step

    module, kind, trl_extra, ours_extra = REFERENCE_FREE_CASES[case]
    trl = importlib.import_module(module)
    args = getattr(trl, f"{kind}Config")(
        output_dir=str(models["root"] / f"out-{case}"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=len(ROWS),
        max_length=512,
        **trl_extra,
    )
    trainer = getattr(trl, f"{kind}Trainer")(
        model=load_causal_lm(str(models["policy"])),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=load_tokenizer(str(models["policy"])),
    )
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    trl_loss.backward()
    trl_grad = _grad_norm(trainer.model)

    pairs = []
    for row in trainer.train_dataset:  # TRL's ids: the completion is where the labels are not -100
        sides = []
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            start = next(i for i, x in enumerate(labels) if x != -100)
            sides.append((ids[:start], ids[start:]))
        assert sides[0][0] == sides[1][0], "one prompt for both completions"
        pairs.append(PairTokens(sides[0][0], sides[0][1], sides[1][1]))
    zeros = torch.zeros(len(pairs), dtype=torch.float64)
    policy = load_causal_lm(str(models["policy"]))
    settings = TrainSettings(LossSpec(name=case, **ours_extra), batching="padded", max_grad_norm=None)
    optimizer = make_optimizer(policy, "adamw", 1e-3, 0.0)
    metrics = train_step(
        policy,
        optimizer,
        make_scheduler(optimizer, 0, 1, "constant"),
        StepBatch(pairs, zeros, zeros),
        settings,
        len(pairs),
    ).metrics
    expected = float(trl_loss)
    if case == "orpo":  # TRL's NLL term averages over the prompt and response tokens of all chosen sequences, this
        # project's (the paper's eq. 2) over each chosen response, then over pairs: compare the odds-ratio terms
        from dpo_ray.compute.batching import completion_logps

        with torch.no_grad():
            chosen = completion_logps(
                load_causal_lm(str(models["policy"])), [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], 0
            )
        ours_nll = sum(-sum(x) / len(x) for x in chosen) / len(pairs)
        trl_nll = float(trainer._stored_metrics["train"]["nll_loss"][-1])
        expected += ours_nll - trl_nll
        assert abs(ours_nll - trl_nll) > 1e-3  # the difference is real on these pairs
    assert metrics["loss"] == pytest.approx(expected, rel=RTOL), case
    if case != "orpo":  # the NLL terms' gradients differ by the same definition
        assert metrics["grad_norm"] == pytest.approx(trl_grad, rel=RTOL), case


# Unpaired rows for KTO: both labels, completions of several lengths, six prompts (TRL rotates the completions by
# one within its batch of six: every row's KL completion is another prompt's).
UNPAIRED_ROWS = [
    {"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
    for i, r in enumerate(WORD_ROWS)
]
UNPAIRED_CASES = {
    "kto": ("kto", {}),
    "kto-weighted": ("kto", {"desirable_weight": 1.0, "undesirable_weight": 1.7}),
    "apo_zero_unpaired": ("apo_zero_unpaired", {}),
}


@pytest.mark.parametrize("case", sorted(UNPAIRED_CASES))
def test_unpaired_first_step_matches_trl(models, case):
    """KTO and APO-zero (unpaired) against TRL's KTOTrainer: TRL's tokenization and its KL completions (its
    rotation within the batch) become this project's unpaired rows, whose reference log-probs are scored as the
    reference stage does; the first step's loss and gradient norm agree within RTOL, with z₀ > 0 (not clamped)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from dpo_ray.compute.batching import PairTokens, completion_logps
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import KTO_Z0, StepBatch, TrainSettings, train_step

    name, weights = UNPAIRED_CASES[case]
    # The reference is the policy's peer built with another seed; swapped roles make the batch's mismatched
    # log-ratios positive on average, so z₀ is a number and not its clamp at 0 (asserted below).
    policy_dir, ref_dir = models["reference"], models["policy"]
    args = KTOConfig(
        output_dir=str(models["root"] / f"out-{case}"),
        report_to=[],
        use_cpu=True,
        loss_type=name,
        beta=BETA,
        per_device_train_batch_size=len(UNPAIRED_ROWS),
        max_length=None,
        train_sampling_strategy="sequential",
        **weights,
    )
    trainer = KTOTrainer(
        model=load_causal_lm(str(policy_dir)).to(DTYPE),
        ref_model=load_causal_lm(str(ref_dir)).to(DTYPE),
        args=args,
        train_dataset=Dataset.from_list(UNPAIRED_ROWS),
        processing_class=load_tokenizer(str(policy_dir)),
    )
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    trl_loss.backward()
    trl_grad = _grad_norm(trainer.model)

    rows = list(trainer.train_dataset)
    kl_ids = [r.get("KL_completion_ids") for r in rows]
    if name == "apo_zero_unpaired":  # TRL builds no KL completions for it; any other prompt's completion serves
        kl_ids = [rows[i - 1]["completion_ids"] for i in range(len(rows))]
    pairs = [PairTokens(r["prompt_ids"], r["completion_ids"], k) for r, k in zip(rows, kl_ids, strict=True)]
    assert all(p.rejected_ids != r["completion_ids"] for p, r in zip(pairs, rows, strict=True))
    reference = load_causal_lm(str(ref_dir)).to(DTYPE)
    with torch.no_grad():
        ref = completion_logps(reference, [p.prompt_ids for p in pairs] * 2,
                               [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], 0)  # fmt: skip
    sums = torch.tensor([sum(x) for x in ref], dtype=torch.float64)
    n = len(pairs)
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.bool)
    assert 0 < int(labels.sum()) < n
    policy = load_causal_lm(str(policy_dir)).to(DTYPE)
    settings = TrainSettings(LossSpec(name=name, beta=BETA, **weights), batching="padded", max_grad_norm=None)
    optimizer = make_optimizer(policy, "adamw", 1e-3, 0.0)
    metrics = train_step(
        policy,
        optimizer,
        make_scheduler(optimizer, 0, 1, "constant"),
        StepBatch(pairs, sums[:n], sums[n:], labels=labels),
        settings,
        n,
    ).metrics
    if name == "kto":  # z₀ against float64 forwards of both models on the KL completions, and TRL's against it
        with torch.no_grad():
            policy64, ref64 = (load_causal_lm(str(d)).to(torch.float64) for d in (policy_dir, ref_dir))
            kl = [completion_logps(m, [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs], 0)
                  for m in (policy64, ref64)]  # fmt: skip
        z0 = sum(sum(a) - sum(b) for a, b in zip(*kl, strict=True)) / n
        assert z0 > 0.05, z0  # a real reference point: the comparison sees z₀, not its clamp at 0
        # Bounds: z₀ is a mean of differences of two ~40-nat sums (7 tokens of a 512-token vocabulary). This
        # project's float32 log-probs are ~1e-7 relative (tests/unit/test_logps.py): 2 x 40 x 1e-7 < 1e-5. TRL's
        # fused head is ~1.5e-5 relative (measured: its z₀ 5.9e-4 from float64's, its losses' RTOL above).
        assert metrics[KTO_Z0] == pytest.approx(z0, abs=1e-5)
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(z0, abs=2e-3)
    assert metrics["loss"] == pytest.approx(float(trl_loss), rel=RTOL), case
    assert metrics["grad_norm"] == pytest.approx(trl_grad, rel=RTOL), case
