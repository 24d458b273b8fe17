"""What an evaluation reports: its statistics with standard errors, the files and plots it writes, its console
line and its tracker run. Pure numbers in, files out; the sampling is pipeline.stages.evaluate's."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from dpo_ray.data import artifacts
from dpo_ray.objective.health import ALARM
from pipeline.config import EvaluateConfig
from pipeline.core import stage

__all__ = ["plots", "result_line", "statistics", "track", "tracked_numbers", "write_files"]


def statistics(
    cfg: EvaluateConfig,
    n_prompts: int,
    flat: list[dict[str, Any]],
    ref_logps: list[float],
    pol_rewards: list[float],
    ref_rewards: list[float],
) -> dict[str, Any]:
    """Rewards of both models, the KL estimate, the win rate and the reward gain of the policy over the reference
    (see pipeline.stages.evaluate's module docstring), each with its
    standard error over prompts: a prompt's n samples are not independent, so each prompt's mean is one
    observation (n_prompts of them)."""
    n = cfg.n
    kl_terms = np.array([s["logp"] for s in flat]) - np.array(ref_logps)
    wins = np.sign(np.array(pol_rewards) - np.array(ref_rewards))

    def per_prompt(values: Any) -> Any:
        return np.asarray(values, dtype=np.float64).reshape(n_prompts, n).mean(axis=1)

    def stderr(values: Any) -> float | None:
        means = per_prompt(values)
        return float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None

    def rewards(values: list[float]) -> dict[str, Any]:
        return {
            "reward_mean": float(np.mean(values)),
            "reward_stderr": stderr(values),
            "reward_std": float(np.std(values)),
            "positive_fraction": float(np.mean(np.array(values) > 0)),
        }

    win = (wins > 0) + 0.5 * (wins == 0)
    gain = np.asarray(pol_rewards, dtype=np.float64) - np.asarray(ref_rewards, dtype=np.float64)
    return {
        "prompts": n_prompts,
        "samples_per_prompt": n,
        "policy": rewards(pol_rewards),
        "reference": rewards(ref_rewards),
        "kl": float(kl_terms.mean()),
        "kl_stderr": stderr(kl_terms),
        "win_rate": float(win.mean()),
        "win_rate_stderr": stderr(win),
        # paired by prompt (both models sample the same prompts): the reward gain and its standard error
        "reward_gain": float(gain.mean()),
        "reward_gain_stderr": stderr(gain),
        "reward": cfg.reward,
    }


def _pm(value: float, stderr: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr is not None else "")


def result_line(result: dict[str, Any]) -> str:
    """evaluate's one line: each number with its standard error and the count it comes from."""
    pol, ref, pref = result["policy"], result["reference"], result["preference"]
    acc = pref.get("accuracy")
    accuracy = (
        "n/a" if acc is None else f"{_pm(acc, (acc * (1 - acc) / pref['pairs']) ** 0.5, 2)} ({pref['pairs']} pairs)"
    )
    return (
        f"evaluate: {result['prompts']} prompts x {result['samples_per_prompt']}: reward policy "
        f"{_pm(pol['reward_mean'], pol.get('reward_stderr'), 3)} vs reference "
        f"{_pm(ref['reward_mean'], ref.get('reward_stderr'), 3)}, KL {_pm(result['kl'], result['kl_stderr'], 2)}, "
        f"win rate {_pm(result['win_rate'], result.get('win_rate_stderr'), 2)}, preference accuracy"
        + {"mean_logp": " (mean log-prob)", "label_sign": " (log-ratio sign vs label)"}.get(
            pref.get("implicit_reward", ""), ""
        )
        + f" {accuracy}"
    )


def write_files(
    cfg: EvaluateConfig,
    result: dict[str, Any],
    ids: list[list[int]],
    texts: list[str],
    flat: list[dict[str, Any]],
    ref_samples: list[list[dict[str, Any]]],
    ref_logps: list[float],
    pol_rewards: list[float],
    ref_rewards: list[float],
) -> list[str]:
    """policy_samples.jsonl, reference_samples.jsonl (the reference's own samples of the same prompts), the
    plots and eval.json (for people; the manifest, written last, is the record); returns the plots' names."""
    repeat = [i for i in range(len(ids)) for _ in range(cfg.n)]
    samples = [
        {"prompt": texts[i], "prompt_ids": ids[i], "completion_ids": s["ids"], "completion": s["text"]}
        | {"policy_logp": s["logp"], "ref_logp": r, "reward": w}
        for i, s, r, w in zip(repeat, flat, ref_logps, pol_rewards, strict=True)
    ]
    ref_flat = [s for group in ref_samples for s in group]
    references = [
        {"prompt": texts[i], "completion": s["text"], "reward": w}
        for i, s, w in zip(repeat, ref_flat, ref_rewards, strict=True)
    ]
    fs, out = artifacts.artifact_fs(cfg.output)
    fs.makedirs(out, exist_ok=True)
    for name, rows in (("policy_samples.jsonl", samples), ("reference_samples.jsonl", references)):
        with fs.open(f"{out}/{name}", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in rows)
    names = plots(cfg, pol_rewards, ref_rewards)
    with fs.open(f"{out}/eval.json", "w") as f:
        json.dump({**result, "plots": names}, f, indent=2)
    return names


def plots(cfg: EvaluateConfig, policy_rewards: list[float], ref_rewards: list[float]) -> list[str]:
    import fsspec
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fs, out = fsspec.core.url_to_fs(cfg.output)
    metrics_path = artifacts.join(cfg.train_metrics, "metrics.jsonl")
    mfs, mpath = fsspec.core.url_to_fs(metrics_path)
    history: list[dict[str, Any]] = []
    if mfs.exists(mpath):
        with mfs.open(mpath, "r") as f:
            history = [json.loads(line) for line in f if line.strip()]
    if history:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        # Unpaired rows (kto) have no accuracy: their middle panel is KTO's reference point z₀.
        middle = "rewards/accuracies" if "rewards/accuracies" in history[0] else "kto/z0"
        for ax, key in zip(axes, ("loss", middle, "rewards/margins"), strict=True):
            ax.plot([h["step"] for h in history], [h.get(key, float("nan")) for h in history], label="train")
            ev = [h for h in history if f"eval/{key}" in h]
            if ev:
                ax.plot([h["step"] for h in ev], [h[f"eval/{key}"] for h in ev], "o-", label="eval")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        with fs.open(f"{out}/training_curves.png", "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        written.append("training_curves.png")
        if any("health/chosen_logp_shift" in h for h in history):
            _health_plot(plt, history, _shift_limit(cfg.policy), fs, f"{out}/training_health.png")
            written.append("training_health.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(policy_rewards + ref_rewards), max(policy_rewards + ref_rewards) + 1e-9, 25).tolist()
    ax.hist(ref_rewards, bins=bins, alpha=0.6, label="reference")
    ax.hist(policy_rewards, bins=bins, alpha=0.6, label="policy")
    ax.set_xlabel(f"reward ({cfg.reward})")
    ax.legend()
    fig.tight_layout()
    with fs.open(f"{out}/rewards.png", "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return [*written, "rewards.png"]


def _shift_limit(policy: str) -> float | None:
    """The displacement guard's limit the policy was trained under (its export's manifest), if any."""
    manifest = artifacts.read_manifest(policy)
    guard = ((manifest.config if manifest is not None else {}).get("health") or {}).get("chosen_logp_shift") or {}
    limit = guard.get("limit")
    return float(limit) if limit is not None else None


def _health_plot(plt: Any, history: list[dict[str, Any]], limit: float | None, fs: Any, path: str) -> None:
    """The displacement signals: per-token log π − log πref of the chosen and the rejected completions by step,
    0 (the reference) and the guard's limit drawn in, and the steps where a guard fired marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history if "health/chosen_logp_shift" in h]
    for key, label in (("chosen", "chosen"), ("rejected", "rejected")):
        ax.plot(steps, [h[f"health/{key}_logp_shift"] for h in history if f"health/{key}_logp_shift" in h], label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    if limit is not None:
        ax.axhline(limit, color="red", linestyle="--", label=f"guard {limit:g}")
    fired = [h["step"] for h in history if any(k.startswith(ALARM) for k in h)]
    for step in fired:
        ax.axvline(step, color="red", alpha=0.2)
    ax.set_title("log π − log πref per token (health)")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def tracked_numbers(result: dict[str, Any]) -> dict[str, float]:
    """The evaluation's numbers under their tracker names (evaluate/...)."""
    pref = result.get("preference") or {}
    values = {
        "evaluate/reward_policy": result["policy"]["reward_mean"],
        "evaluate/reward_reference": result["reference"]["reward_mean"],
        "evaluate/kl": result["kl"],
        "evaluate/win_rate": result["win_rate"],
        "evaluate/preference_accuracy": pref.get("accuracy"),
        "evaluate/prompts": result["prompts"],
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def track(cfg: EvaluateConfig, settings: Any, result: dict[str, Any]) -> None:
    """Log the evaluation to the tracker run of its policy (the train stage's), at the train's last step."""
    if settings is None:
        return
    import fsspec

    from dpo_ray.train.tracking import Tracker

    step = 0
    fs, path = fsspec.core.url_to_fs(artifacts.join(cfg.train_metrics, "metrics.jsonl"))
    if fs.exists(path):
        with fs.open(path, "r") as f:
            steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
        step = int(max(steps, default=0))
    tracker = Tracker(settings)
    try:
        tracker.params({"evaluate": stage.identity(cfg)})
        tracker.summary(tracked_numbers(result), step)
        ofs, out = artifacts.artifact_fs(cfg.output)
        with tempfile.TemporaryDirectory() as tmp:
            for name in result["plots"]:
                local = os.path.join(tmp, name)
                ofs.get(f"{out}/{name}", local)
                tracker.image(f"evaluate/{name.removesuffix('.png')}", local, step)
    finally:
        tracker.close()
