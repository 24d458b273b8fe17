"""The run's report (one self-contained HTML page) and the statistics it and the summary table show."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from pipeline.cli.report import SAMPLED_PROMPTS, write_report
from pipeline.cli.summary import _row, table
from pipeline.config import EvaluateConfig
from pipeline.stages.evaluation import result_line, statistics


def _png(path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.plot([0, 1])
    plt.savefig(path)
    plt.close()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("link", "script") or (tag == "a" and "href" in a):
            self.links.append(tag)
        if tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def _evaluation_of(prompts: list[str], rewards: list[float], ref_rewards: list[float]) -> dict:
    return {
        "prompts": len(prompts),
        "samples_per_prompt": 1,
        "policy": {"reward_mean": float(np.mean(rewards)), "reward_stderr": 0.1, "reward_std": 0.3},
        "reference": {"reward_mean": float(np.mean(ref_rewards)), "reward_stderr": 0.1, "reward_std": 0.3},
    }


def test_report_is_one_self_contained_page_with_the_table_plots_and_samples_side_by_side(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _png(run_dir / "reward_vs_kl.png")
    prompts = [f"prompt <{i}> & more" for i in range(SAMPLED_PROMPTS + 3)]
    evals = []
    for label in ("round 0", "β=0.5"):
        d = tmp_path / label.replace(" ", "-")
        d.mkdir()
        _png(d / "rewards.png")
        with (d / "policy_samples.jsonl").open("w") as f:
            for p in prompts:
                for k in range(2):
                    f.write(
                        json.dumps({"prompt": p, "completion": f"{label} says {k} about {p}", "reward": 0.5}) + "\n"
                    )
        with (d / "reference_samples.jsonl").open("w") as f:
            f.writelines(
                json.dumps({"prompt": p, "completion": f"ref on {p}", "reward": -0.25}) + "\n" for p in prompts
            )
        evals.append((label, str(d)))
    rows = [{"label": "πref", "reward_mean": 0.1, "reward_stderr": 0.02, "prompts": 9, "samples": 2}]
    rows.append(rows[0] | {"label": "round 0", "beta": 0.1, "round": 0, "kl": 2.5, "kl_stderr": 0.2})
    uri = write_report(str(run_dir), rows, "| md |", evals)
    assert uri == f"{run_dir}/report.html"
    page = _Page()
    page.feed((run_dir / "report.html").read_text())
    assert page.links == []  # nothing fetched from elsewhere
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    # The samples table: for each of the first SAMPLED_PROMPTS prompts, the reference's and each policy's first
    # sample of that same prompt, in one row (text escaped, shown as written).
    for p in prompts[:SAMPLED_PROMPTS]:
        i = page.cells.index(p)
        assert page.cells[i + 1] == f"ref on {p}reward -0.250"
        assert page.cells[i + 2] == f"round 0 says 0 about {p}reward +0.500"
        assert page.cells[i + 3] == f"β=0.5 says 0 about {p}reward +0.500"
    assert prompts[SAMPLED_PROMPTS] not in page.cells
    assert "2.50" in page.cells and "0.20" in page.cells  # KL and its standard error in the summary table


def test_standard_errors_are_over_prompts():
    """n samples of a prompt are one observation: the stderr is that of the per-prompt means (independent
    computation here), not of all samples."""
    rng = np.random.default_rng(0)
    n_prompts, n = 7, 3
    cfg = EvaluateConfig(reference="r", policy="p", n=n)
    # Rounded to tenths: ties (a tie counts half) and zeros (not positive) occur, as with real rewards.
    pol = np.round(rng.normal(0.2, 0.4, n_prompts * n), 1).tolist()
    ref = np.round(rng.normal(0.0, 0.4, n_prompts * n), 1).tolist()
    assert any(a == b for a, b in zip(pol, ref, strict=True)) and 0.0 in pol + ref
    logp, ref_logp = rng.normal(-20, 2, n_prompts * n), rng.normal(-22, 2, n_prompts * n)
    flat = [{"logp": float(x)} for x in logp]
    out = statistics(cfg, n_prompts, flat, ref_logp.tolist(), pol, ref)

    def se(values):
        means = [float(np.mean(values[i * n : (i + 1) * n])) for i in range(n_prompts)]
        return float(np.std(means, ddof=1) / np.sqrt(n_prompts))

    assert out["policy"]["reward_stderr"] == pytest.approx(se(pol), rel=1e-12)
    assert out["kl_stderr"] == pytest.approx(se(logp - ref_logp), rel=1e-12)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(pol, ref, strict=True)]
    assert out["win_rate"] == pytest.approx(np.mean(wins)) and out["win_rate_stderr"] == pytest.approx(se(wins))
    for side, values in (("policy", pol), ("reference", ref)):
        assert out[side]["positive_fraction"] == pytest.approx(np.mean(np.array(values) > 0), abs=1e-12)
        assert out[side]["reward_mean"] == pytest.approx(np.mean(values), rel=1e-12)
    out["preference"] = {"pairs": 40, "accuracy": 0.75}
    line = result_line(out)
    assert f"KL {out['kl']:.2f} ± {out['kl_stderr']:.2f}" in line
    assert "preference accuracy 0.75 ± 0.07 (40 pairs)" in line  # sqrt(.75 * .25 / 40) = 0.068
    row = _row("round 0", 0.1, 0, out, "policy")
    md = table([_row("πref", None, None, out, "reference"), row])
    assert re.search(r"\| round 0 \| 0.1 \| 0 \| \+0\.\d{3} ± 0\.\d{3} \|", md)
    assert "| 7 x 3 | 0.75 ± 0.07 (40) |  |" in md  # no gate column value without a gate
    # The reward gain is paired per prompt: the mean of policy − reference and the stderr of its prompt means.
    gain = np.array(pol) - np.array(ref)
    assert out["reward_gain"] == pytest.approx(gain.mean(), rel=1e-12)
    assert out["reward_gain_stderr"] == pytest.approx(se(gain.tolist()), rel=1e-12)


def _evaluation(gain: float, se: float, kl: float) -> dict:
    return {
        "reward_gain": gain,
        "reward_gain_stderr": se,
        "kl": kl,
        "policy": {"reward_mean": gain},
        "reference": {"reward_mean": 0.0},
    }


def test_the_gate_judges_the_reward_gain_in_standard_errors_and_the_kl_budget():
    from pipeline.config import GateConfig
    from pipeline.core.gate import judge

    gate = GateConfig(reward_se=2.0, max_kl=20.0)
    assert judge(_evaluation(0.5, 0.1, 10.0), gate).passed
    low = judge(_evaluation(0.15, 0.1, 10.0), gate)  # 1.5 standard errors
    assert not low.passed and "reward gain over the reference +0.150 ± 0.100 is not above 2 standard errors" in (
        low.line()
    )
    assert not judge(_evaluation(-0.3, 0.1, 10.0), gate).passed  # the collapse: worse than the reference
    far = judge(_evaluation(0.5, 0.1, 74.2), gate)
    assert not far.passed and "KL(π‖πref) 74.20 is above the budget gate.max_kl 20" in far.line()
    assert judge(_evaluation(0.5, 0.1, 74.2), GateConfig(max_kl=None)).passed  # no budget: reward only
    assert not judge(_evaluation(0.0, 0.0, 0.0), gate).passed  # no gain at all does not pass


def test_a_failed_gate_opens_the_summary_and_the_report():
    from pipeline.cli.report import _banner
    from pipeline.cli.summary import banner

    rows = [{"label": "round 0", "gate": "passed"}, {"label": "round 1", "gate": "FAILED: KL too high"}]
    assert banner(rows) == "**GATE FAILED** round 1: FAILED: KL too high\n\n"
    assert "GATE FAILED</b> round 1" in _banner(rows) and banner(rows[:1]) == "" and _banner(rows[:1]) == ""


def test_the_guards_that_fired_in_training_open_the_report(tmp_path):
    """An evaluated policy whose training fired a guard (health/alarm/... in its metrics.jsonl) gets a HEALTH
    banner naming the signal and the steps; a quiet one gets none."""
    import json

    from dpo_ray.data import artifacts
    from pipeline.cli.report import _banner

    evals = []
    for label, alarm_steps in (("round 0", [3, 4]), ("round 1", [])):
        train, ev = tmp_path / label / "train", tmp_path / label / "eval"
        train.mkdir(parents=True)
        rows = [
            {"step": s} | ({"health/alarm/chosen_logp_shift": 1.0} if s in alarm_steps else {}) for s in (1, 2, 3, 4)
        ]
        (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        artifacts.write_manifest(str(ev), "eval", {}, {}, {}, {"config": {"train_metrics": str(train)}})
        evals.append((label, str(ev)))
    page = _banner([], evals)
    assert page.count("HEALTH") == 1 and "round 0: health/chosen_logp_shift fired at steps 3, 4" in page
