"""What the health guards and the gate say on a collapsing demo, and which remedy from the loss menu prevents it.

For each seed: the demo's round 0 (`make demo`'s config with `rounds=1`, no β sweep) trained at a learning rate
high enough to collapse (`--lr`, default 3e-3), then the same round-0 pairs and reference log-probs trained again
with one remedy each (lower lr, higher β, an NLL term `[sigmoid, sft]`, DPOP) and evaluated against πref on the
same held-out prompts. Per setting and seed: the reward gain over πref (paired, ± its standard error), the
KL(π‖πref), the gate's verdict (`gate.reward_se` 2 and the `--max-kl` budget), the lowest chosen log-prob shift
(nats per token) and the first step at which each health guard fired (the demo's default limits, action warn).

    .venv/bin/python benchmarks/demo_remedies.py [--seeds 0 1 2] [--lr 3e-3] [--max-kl 25] [--root runs/demo-remedies]

Writes <root>/remedies.md and <root>/remedies.json. A setting whose outputs are complete is not trained again
(the stages skip complete work), so the command can be resumed. Run it alone: it starts local Ray clusters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_seeds import overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipeline" / "configs" / "demo.yaml"


def remedies(lr: float) -> dict[str, list[str]]:
    """Each setting's train overrides on top of the collapsing one (β 0.1 at `lr`)."""
    return {
        f"lr {lr:g} (collapsing)": [],
        f"lower lr ({lr / 10:g})": [f"train.optim.lr={lr / 10}"],
        "higher β (0.5)": ["train.loss.beta=0.5"],
        "NLL term [sigmoid, sft]": ["train.loss.name=[sigmoid,sft]"],
        "dpop (λ 50)": ["train.loss.name=dpop"],
    }


def _pipeline(*args: str, log: Path) -> int:
    cmd = [sys.executable, "-m", "pipeline", *args]
    with log.open("a") as out:
        return subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode


def run_seed(root: Path, seed: int, lr: float) -> dict[str, dict]:
    """Round 0 at the collapsing lr (the first setting), then each remedy trained on its pairs and evaluated."""
    run_dir = root / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "remedies.log"
    # The collapsing setting is plain DPO at β 0.1, whatever the demo's own loss.
    base = [*overrides(run_dir, seed), f"train.optim.lr={lr}", "train.loss.name=sigmoid", "train.loss.beta=0.1"]
    status = _pipeline("run", "--config", str(CONFIG), *base, "rounds=1", "beta_sweep=[]", log=log)
    if status not in (0, 4):  # 4: the round failed the gate, which is one of the outcomes measured here
        raise SystemExit(f"seed {seed}: `run` exited with status {status} (see {log})")
    out: dict[str, dict] = {}
    for i, (name, extra) in enumerate(remedies(lr).items()):
        if i == 0:
            out[name] = measure(run_dir / "train", run_dir / "eval")
            continue
        d = run_dir / f"remedy-{i}"
        train = [
            f"train.output={d / 'train'}",
            f"train.export={d / 'export'}",
            f"train.checkpoint.storage_path={d / 'checkpoints'}",
            *extra,
        ]
        evaluate = [
            f"evaluate.policy={d / 'export'}",
            f"evaluate.train_metrics={d / 'train'}",
            f"evaluate.output={d / 'eval'}",
        ]
        t0 = time.perf_counter()
        for stage, keys in (("train", train), ("evaluate", evaluate)):
            status = _pipeline(stage, "--config", str(CONFIG), *base, *keys, log=log)
            if status != 0:
                raise SystemExit(f"seed {seed}, {name}: `{stage}` exited with status {status} (see {log})")
        out[name] = measure(d / "train", d / "eval")
        out[name]["seconds"] = time.perf_counter() - t0
    return out


def measure(train_dir: Path, eval_dir: Path) -> dict:
    """The outcome of one training: reward gain, KL, the lowest chosen shift and the guards' first firings."""
    from dpo_ray.objective.health import fired_steps

    ev = json.loads((eval_dir / "eval.json").read_text())
    steps = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "loss" in s]  # training steps (eval lines carry eval/ keys only)
    fired = {signal: at[0] for signal, at in fired_steps(steps).items()}
    shifts = [s["health/chosen_logp_shift"] for s in steps if "health/chosen_logp_shift" in s]
    return {
        "reward": ev["policy"]["reward_mean"],
        "reference_reward": ev["reference"]["reward_mean"],
        "gain": ev["reward_gain"],
        "gain_se": ev["reward_gain_stderr"],
        "kl": ev["kl"],
        "min_chosen_shift": min(shifts) if shifts else None,
        "fired": fired,
        "steps": len(steps),
    }


def table(per_seed: dict[int, dict[str, dict]], reward_se: float, max_kl: float | None) -> str:
    names = list(next(iter(per_seed.values())))
    n = len(per_seed)
    lines = [
        f"| setting | gate passed (gain > {reward_se:g} se"
        + (f", KL ≤ {max_kl:g}" if max_kl is not None else "")
        + ") | reward (πref) | KL(π‖πref) | lowest chosen shift (nats/token) | guards fired (seeds: first step) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rows = [per_seed[s][name] for s in sorted(per_seed)]
        passed = sum(1 for r in rows if passes(r, reward_se, max_kl))
        reward = _range([r["reward"] for r in rows], "+.2f")
        ref = _range([r["reference_reward"] for r in rows], "+.2f")
        kl = _range([r["kl"] for r in rows], ".1f")
        shift = _range([r["min_chosen_shift"] for r in rows if r["min_chosen_shift"] is not None], ".2f")
        fired: dict[str, list[int]] = {}
        for r in rows:
            for signal, step in r["fired"].items():
                fired.setdefault(signal, []).append(step)
        guards = "; ".join(f"{sig} in {len(st)} of {n} (step {_range(st, 'd')})" for sig, st in fired.items())
        lines.append(f"| {name} | {passed} of {n} | {reward} ({ref}) | {kl} | {shift} | {guards or 'none'} |")
    return "\n".join(lines) + "\n"


def passes(r: dict, reward_se: float, max_kl: float | None) -> bool:
    return r["gain"] > reward_se * r["gain_se"] and (max_kl is None or r["kl"] <= max_kl)


def _range(values: list, fmt: str) -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)} to {format(hi, fmt)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--reward-se", type=float, default=2.0)
    parser.add_argument("--max-kl", type=float, default=None)
    parser.add_argument("--root", default=str(ROOT / "runs" / "demo-remedies"))
    args = parser.parse_args()
    root = Path(args.root).resolve()
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        per_seed[seed] = run_seed(root, seed, args.lr)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        (root / "remedies.json").write_text(json.dumps(per_seed, indent=2))
    text = table(per_seed, args.reward_se, args.max_kl)
    (root / "remedies.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
