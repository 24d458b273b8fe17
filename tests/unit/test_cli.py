"""The CLI's help and `config` command: generated from the config models, so they list exactly what is
accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import STAGES, main
from pipeline.config import PipelineConfig, model_of

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "configs" / "demo.yaml"


def _all_keys(model, prefix):
    for name, field in model.model_fields.items():
        sub = model_of(field.annotation)
        if sub is not None:
            yield from _all_keys(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


@pytest.mark.parametrize("stage", [s for s, (_, section) in STAGES.items() if section])
def test_stage_help_lists_every_key_of_its_section(stage, capsys):
    assert main([stage, "--help"]) == 0
    out = capsys.readouterr().out
    section = STAGES[stage][1]
    model = model_of(PipelineConfig.model_fields[section].annotation)
    keys = list(_all_keys(model, f"{section}."))
    assert keys and all(f"  {k}  (" in out for k in keys), [k for k in keys if f"  {k}  (" not in out]


def test_help_lines_carry_type_default_and_description(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  train.loss.beta  (float; default 0.1)  β: strength of the KL constraint." in out
    assert '  train.loss.name  (str | list[str]; default "sigmoid")  Loss variant' in out
    assert "  train.model  (str; required)" in out
    assert "  train.lora.r  (int; default 16)  Adapter rank." in out
    assert main(["run", "-h"]) == 0
    assert "  rounds  (int; default 1)" in capsys.readouterr().out


def test_config_prints_the_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--config", str(DEMO), "train.loss.beta=0.2", "run_dir=somewhere"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    run_dir = str(tmp_path / "somewhere")
    assert cfg["run_dir"] == run_dir  # resolved against the working directory
    assert cfg["train"]["loss"]["beta"] == 0.2 and cfg["train"]["optim"]["lr"] == 1e-3  # override, then the file
    assert cfg["train"]["scored"] == f"{run_dir}/scored" and cfg["train"]["export"] == f"{run_dir}/export"
    assert cfg["train"]["optim"]["max_grad_norm"] == 1.0 and cfg["reference"]["start_timeout_s"] == 900  # defaults
    assert cfg["train"]["workers"]["accelerator_type"] is None
    # what it prints loads back to the same config
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["config", "--config", str(tmp_path / "resolved.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == cfg


def test_config_errors_and_no_stage(capsys):
    assert main(["config", "--config", str(DEMO), "train.loss.bta=0.2"]) == 2
    assert "did you mean 'train.loss.beta'" in capsys.readouterr().err
    assert main([]) == 2
    assert "usage: dpo-ray" in capsys.readouterr().out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_init_writes_a_config_that_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    dialogs = [
        {"chosen": f"\n\nHuman: hi {i}\n\nAssistant: good answer", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: bad"}
        for i in range(5)
    ]
    data = _jsonl(tmp_path / "hh.jsonl", dialogs)
    args = ["init", "--model", str(tiny_model_dir), "--data", str(data)]
    assert main(args) == 0
    assert "5/5 sampled records map to pairs" in capsys.readouterr().out
    cfg = load_config(tmp_path / "dpo.yaml")
    assert cfg.prepare is not None and cfg.prepare.format == "implicit"
    assert cfg.prepare.inputs == [str(data)] and cfg.reference is not None and cfg.train is not None
    assert cfg.train.model == str(tiny_model_dir) and cfg.run_dir == str(tmp_path / "runs" / "dpo")
    assert main(args) == 2 and "dpo.yaml exists" in capsys.readouterr().err  # never overwritten


def test_init_names_a_wrong_column_and_the_columns_found(tiny_model_dir, tmp_path, capsys):
    rows = [{"question": f"q{i}", "good": "yes indeed", "bad": "no"} for i in range(4)]
    data = _jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "qa.yaml"
    base = ["init", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "none of the first 4 records maps to a pair" in err and "chosen='chosen'" in err
    assert "the records' columns are ['bad', 'good', 'question']" in err and not out.exists()
    assert main([*base, "--prompt-column", "question", "--chosen-column", "good", "--rejected-column", "bad"]) == 0
    text = out.read_text()
    assert "format: explicit" in text and 'columns: {prompt: "question", chosen: "good", rejected: "bad"}' in text


def test_init_refuses_a_model_whose_tokenizer_does_not_load(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    code = main(["init", "--model", str(tmp_path / "missing"), "--data", str(data), "--output", str(tmp_path / "x")])
    assert code == 2 and "the tokenizer does not load" in capsys.readouterr().err
