from __future__ import annotations

import re
from typing import Any

import pydantic
import pytest

from pipeline.config import ConfigError, PipelineConfig, load_config, model_of


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_overrides_and_defaults(tmp_path):
    p = _write(tmp_path, "run_dir: /r\nprepare:\n  inputs: [a.jsonl]\n  tokenizer: tok\n")
    cfg = load_config(p, ["prepare.max_length=2048", "prepare.columns.prompt=question", "prepare.dedup=false"])
    assert cfg.prepare.max_length == 2048 and cfg.prepare.dedup is False
    assert cfg.prepare.columns.prompt == "question" and cfg.prepare.columns.chosen == "chosen"
    assert cfg.prepare.output == "/r/pairs"
    with pytest.raises(pydantic.ValidationError):
        cfg.prepare.max_length = 3  # frozen


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prepare.max_lenght=5", "unknown config key 'prepare.max_lenght'; did you mean 'prepare.max_length'?"),
        (
            "prepare.columns.promt=q",
            "unknown config key 'prepare.columns.promt'; did you mean 'prepare.columns.prompt'?",
        ),
        ("prepar.inputs=[x]", "did you mean 'prepare'?"),
        ("prepare.max_prompt_length=2000", "max_prompt_length (2000) must be < max_length (1024)"),
        ("prepare.truncation=middle", "prepare.truncation"),
        ("prepare.eval_fraction=1.5", "prepare.eval_fraction"),
        ("novalue", "expected key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, override, message):
    p = _write(tmp_path, "prepare:\n  inputs: [a.jsonl]\n  tokenizer: tok\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert message in str(e.value)


def test_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="prepare.tokenizer"):
        load_config(_write(tmp_path, "prepare:\n  inputs: [a]\n"))


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    from pipeline.cli.main import main

    p = _write(tmp_path, "prepare:\n  inputs: [a.jsonl]\n  tokenizer: tok\n")
    assert main(["prepare", "--config", str(p), "prepare.max_lenght=3"]) == 2
    assert "did you mean 'prepare.max_length'" in capsys.readouterr().err
    assert main(["prepare", "--config", str(_write(tmp_path, "run_dir: x\n"))]) == 2
    assert "no 'prepare:' section" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.loss.name=exo_pair"], "loss exo_pair needs loss.label_smoothing > 0"),
        (["train.loss.name=nca_pair", "train.loss.label_smoothing=0.1"], "label_smoothing applies to sigmoid, robust"),
        (["train.loss.discopop_tau=0.1"], "discopop_tau is a parameter of loss 'discopop', but loss.name is 'sigmoid'"),
        (["train.loss.name=apo_zero", "train.loss.dpop_lambda=5"], "dpop_lambda is a parameter of loss 'dpop'"),
        (["train.loss.name=dpop", "train.loss.dpop_lambda=-1"], "train.loss.dpop_lambda"),
        (["train.loss.name=orpo", "train.loss.simpo_gamma=1"], "simpo_gamma is a parameter of loss 'simpo', but loss"),
        (["train.loss.name=simpo", "train.loss.orpo_lambda=1"], "orpo_lambda is a parameter of loss 'orpo'"),
        (
            ["train.loss.name=orpo", "train.loss.label_smoothing=0.1"],
            "label_smoothing applies to sigmoid, robust, exo_pair, simpo, aot, aot_unpaired, aot_pair; not to 'orpo'",
        ),
        (["train.loss.name=simpo", "train.loss.simpo_gamma=-1"], "train.loss.simpo_gamma"),
        (["train.loss.beta=.inf"], "train.loss.beta"),  # accepted by gt=0 alone; trained into NaN
        (["train.loss.sft_weight=.nan"], "train.loss.sft_weight"),
    ],
)
def test_loss_parameters_are_checked_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.model=m", *overrides])


def test_every_loss_loads_with_its_parameters():
    from dpo_ray.objective.losses import LOSSES

    for name in LOSSES:
        extra = {"exo_pair": ["label_smoothing=0.001"], "discopop": ["discopop_tau=0.1"], "dpop": ["dpop_lambda=5"],
                 "simpo": ["simpo_gamma=1.0", "label_smoothing=0.1"],
                 "orpo": ["orpo_lambda=0.2"]}.get(name, [])  # fmt: skip
        cfg = load_config(None, ["train.model=m", f"train.loss.name={name}", *[f"train.loss.{e}" for e in extra]])
        assert cfg.train is not None and cfg.train.loss.name == name


def test_flat_train_keys_are_refused_with_their_new_key():
    """The train config is nested; an old flat key is refused naming its new place, never read as an alias."""
    from pipeline.config import MOVED_KEYS

    cases = {
        "train.lr=1e-3": "'train.lr' is now 'train.optim.lr'",
        "train.beta=0.5": "'train.beta' is now 'train.loss.beta'",
        "train.num_workers=2": "'train.num_workers' is now 'train.workers.count'",
        "train.checkpoint_every=5": "'train.checkpoint_every' is now 'train.checkpoint.every'",
        "train.tracking_dir=t": "'train.tracking_dir' is now 'train.tracking.dir'",
        "evaluate.report_to=[tensorboard]": "'evaluate.report_to' is now 'evaluate.tracking.report_to'",
        "train.loss=ipo": "'train.loss' is a section: its value 'ipo' is now 'train.loss.name'",
        "train.batching=padded": "'train.batching' is a section: its value 'padded' is now 'train.batching.mode'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, ["train.model=m", "evaluate.reference=m", override])
    for new in MOVED_KEYS.values():  # every new key exists (a typo in the table would point nowhere)
        model: Any = PipelineConfig
        for part in new.split("."):
            model = model_of(model)
            assert model is not None and part in model.model_fields, new
            model = model.model_fields[part].annotation


def test_f_divergence_keys_are_checked():
    cfg = load_config(None, ["train.model=m", "train.loss.f_divergence=alpha_divergence", "train.loss.f_alpha=0.3"])
    assert cfg.train is not None and cfg.train.loss.f_alpha == 0.3
    with pytest.raises(ConfigError, match="f_divergence js_divergence applies to the sigmoid loss alone"):
        load_config(None, ["train.model=m", "train.loss.name=ipo", "train.loss.f_divergence=js_divergence"])
    with pytest.raises(ConfigError, match="f_alpha is a parameter of f_divergence alpha_divergence"):
        load_config(None, ["train.model=m", "train.loss.f_alpha=0.3"])


def test_a_list_of_losses_with_weights():
    cfg = load_config(
        None, ["train.model=m", "train.loss.name=[sigmoid, nca_pair, sft]", "train.loss.weights=[0.8, 0.2, 1]"]
    )
    assert cfg.train is not None and cfg.train.loss.names == ("sigmoid", "nca_pair", "sft")
    assert not cfg.train.reference_free
    free = load_config(None, ["train.model=m", "train.loss.name=[simpo, sft]", "train.loss.simpo_gamma=1"])
    assert free.train is not None and free.train.reference_free and free.train.scored.endswith("/pairs")
    bad = [
        (["train.loss.name=[sigmoid, sft]", "train.loss.weights=[1]"], "1 weights for 2 losses"),
        (["train.loss.name=[sigmoid, sigmoid]"], "names each loss once"),
        (["train.loss.name=sigmoid", "train.loss.weights=[1]"], "loss.weights weighs a list of losses"),
        (["train.loss.name=[sigmoid, sft]", "train.loss.weights=[1, -1]"], "finite numbers >= 0"),
        (["train.loss.name=[sigmoid, xpo]"], "unknown loss 'xpo'"),
        (["train.loss.name=[sigmoid, kto]"], "an unpaired loss .* is trained alone"),
        (
            ["train.loss.name=sigmoid", "train.loss.desirable_weight=2"],
            "parameter of loss 'kto' and 'apo_zero_unpaired'",
        ),
        (["train.loss.name=kto", "train.loss.average_logps=true"], "summed log-probs"),
        (["train.loss.name=[ipo, sft]", "train.loss.dpop_lambda=3"], "dpop_lambda is a parameter of loss 'dpop'"),
        (["train.loss.name=[sigmoid, sft]", "train.loss.f_divergence=js_divergence"], "the sigmoid loss alone"),
        (["train.loss.name=[aot, aot_pair]"], "each sort the batch; combine at most one"),
    ]
    # BCO's δ averages bco_pair's own rewards (LossOutput.shift_rewards), whichever member comes first: a
    # reference-free first member (whose rewards the metrics show) is fine. Refused before, when δ was fed from
    # the metrics (the first member's rewards).
    for names in ("[sigmoid, bco_pair, sft]", "[bco_pair, simpo]", "[simpo, bco_pair]", "[sft, orpo, bco_pair]"):
        ok = load_config(None, ["train.model=m", f"train.loss.name={names}"])
        assert ok.train is not None and "bco_pair" in ok.train.loss.names and ok.train.loss.shifted
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["train.model=m", *overrides])


def test_attention_kernel_and_compile_keys():
    gpu = "train.workers.use_gpu=true"
    cfg = load_config(None, ["train.model=m", "train.batching.attention=flex", gpu, "train.batching.compile=true"])
    assert cfg.train.batching.attention == "flex" and cfg.train.batching.compile is True
    assert load_config(None, ["train.model=m"]).train.batching.attention == "auto"
    with pytest.raises(ConfigError, match="attention: flex needs workers.use_gpu: true"):
        load_config(None, ["train.model=m", "train.batching.attention=flex"])
    with pytest.raises(ConfigError, match="attention: flex works with mode packed, prefix_shared or auto"):
        load_config(None, ["train.model=m", "train.batching.attention=flex", gpu, "train.batching.mode=padded"])
    with pytest.raises(ConfigError, match="train.batching.attention"):
        load_config(None, ["train.model=m", "train.batching.attention=triton"])


def test_evaluate_samples_the_policy_unmodified_for_its_kl_estimate():
    """The mean log-ratio of the policy's samples is KL(π‖πref) only for samples of π itself.

    Failed before: temperature 0.7 / top_p 0.9 were accepted and the number was still reported as KL."""
    for key, value in (("temperature", 0.7), ("top_p", 0.9)):
        with pytest.raises(ConfigError, match=f"evaluate.{key} {value}: the KL.*unbiased only for samples"):
            load_config(None, ["evaluate.reference=m", f"evaluate.{key}={value}"])
    cfg = load_config(None, ["evaluate.reference=m", "evaluate.temperature=1.0"])
    assert cfg.evaluate is not None and cfg.evaluate.temperature == 1.0


def test_keys_another_backend_or_strategy_would_read_are_refused():
    """Accepted and ignored before: vLLM engine keys with reference.backend hf, margin / max_pairs_per_prompt with a
    pairing strategy that does not read them."""
    with pytest.raises(ConfigError, match="backend hf runs a transformers forward: gpu_memory_utilization, seed"):
        load_config(None, ["reference.model=m", "reference.backend=hf", "reference.gpu_memory_utilization=0.1",
                           "reference.seed=3"])  # fmt: skip
    ok = load_config(None, ["reference.model=m", "reference.backend=hf", "reference.max_model_len=128"])
    assert ok.reference is not None and ok.reference.max_model_len == 128  # hf rejects longer pairs by it too
    # The stage's handlers validate the dumped config again (every key set, at its default): still accepted.
    from pipeline.config import GenerateConfig, ReferenceConfig

    assert ReferenceConfig.model_validate(ok.reference.model_dump()).backend == "hf"
    assert GenerateConfig.model_validate(GenerateConfig(policy="p").model_dump()).strategy == "best_vs_worst"
    with pytest.raises(ConfigError, match="strategy best_vs_worst does not read margin, max_pairs_per_prompt"):
        load_config(None, ["generate.policy=p", "generate.margin=0.5", "generate.max_pairs_per_prompt=3"])
    with pytest.raises(ConfigError, match="strategy all_pairs does not read margin"):
        load_config(None, ["generate.policy=p", "generate.strategy=all_pairs", "generate.margin=0.5"])
    cfg = load_config(None, ["generate.policy=p", "generate.strategy=margin", "generate.margin=0.5"])
    assert cfg.generate is not None and cfg.generate.margin == 0.5
