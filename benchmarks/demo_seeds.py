"""The demo's table as a spread over seeds: `make demo`'s config run once per seed, each in its own run
directory, then every statistic of every row as mean ± standard error over the seeds (with the count), and
which orderings held in every seed.

A seed changes everything random in the demo: the review prefixes and the tiny model's initialisation and SFT
(`demo.seed`), the sampling of generate and evaluate, and the training order (`*.seed`).

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2] [--root runs/demo-seeds] [--set KEY=VALUE ...]

--set adds `run` overrides to every seed's run, e.g. the KTO demo (README): `--set train.loss.name=kto
generate.unpaired=pairs`.

Writes <root>/seeds.md (the table printed at the end) and <root>/seeds.json. A seed whose run directory is
complete is not rerun (`run` skips complete stages), so the command can be resumed. A seed whose run stops at
a failed gate (exit status 4) counts: its verdicts are the point. Also counted per round: in how many seeds the
gate passed, and in how many a training-health guard fired (docs/explanation/health.md).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATS = [
    ("reward_mean", "reward", "+.3f"),
    ("kl", "KL(π‖πref)", ".2f"),
    ("win_rate", "win rate", ".2f"),
    ("pref_accuracy", "eval pref. accuracy", ".2f"),
]


def overrides(run_dir: Path, seed: int) -> list[str]:
    assets = run_dir / "assets"
    model = str(assets / "model")
    return [
        f"run_dir={run_dir}",
        f"demo.assets={assets}",
        f"demo.seed={seed}",
        f"prepare.inputs=[{assets / 'pairs.jsonl'}]",
        f"prepare.tokenizer={model}",
        f"generate.policy={model}",
        f"generate.seed={seed}",
        f"reference.model={model}",
        f"train.model={model}",
        f"train.seed={seed}",
        f"evaluate.reference={model}",
        f"evaluate.seed={seed}",
    ]


def run_seed(root: Path, seed: int, extra: list[str]) -> tuple[list[dict], float]:
    run_dir = root / f"seed-{seed}"
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(ROOT / "pipeline/configs/demo.yaml")]
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, *overrides(run_dir, seed), *extra], cwd=ROOT)
    if done.returncode not in (0, 4):  # 4: a round failed the gate (the summary is written first)
        raise SystemExit(f"seed {seed}: `run` exited with status {done.returncode}")
    seconds = time.perf_counter() - t0
    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    for r in rows:
        r["alarms"] = _alarms(run_dir, r["label"])
    return rows, seconds


def _alarms(run_dir: Path, label: str) -> list[str]:
    """The training-health guards that fired in the training of a round's or β's policy."""
    sub = {"round 0": "", "round 1": "round-1/"}.get(label, f"beta-{label.removeprefix('β=')}/")
    path = run_dir / sub / "train" / "metrics.jsonl" if sub else run_dir / "train" / "metrics.jsonl"
    if label == "πref" or not path.exists():
        return []
    from dpo_ray.objective.health import fired_steps

    return sorted(fired_steps(json.loads(line) for line in path.read_text().splitlines()))


def mean_se(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def spread(per_seed: dict[int, list[dict]]) -> tuple[str, dict]:
    labels = list(dict.fromkeys(r["label"] for rows in per_seed.values() for r in rows))  # a gated round may be absent
    n = len(per_seed)
    head = (
        "| policy | "
        + " | ".join(f"{name} (mean ± se over {n} seeds)" for _, name, _ in STATS)
        + " | per seed: reward / KL |"
    )
    lines = [head, "|" + "---|" * (len(STATS) + 2)]
    record: dict = {}
    for label in labels:
        rows = [r for s in sorted(per_seed) for r in per_seed[s] if r["label"] == label]
        cells = []
        record[label] = {}
        for key, _, fmt in STATS:
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                cells.append("")
                continue
            m, se = mean_se(values)
            record[label][key] = {"mean": m, "stderr": se, "n": len(values), "values": values}
            cells.append(format(m, fmt) + ("" if se is None else f" ± {format(se, fmt.lstrip('+'))}"))
        each = ", ".join(
            f"{r['reward_mean']:+.2f} / {r['kl']:.1f}" if r.get("kl") is not None else f"{r['reward_mean']:+.2f}"
            for r in rows
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {each} |")
    return "\n".join(lines) + "\n", record


def orderings(per_seed: dict[int, list[dict]]) -> list[str]:
    """Comparisons between rows, with the number of seeds in which each held."""
    checks = [
        ("reward: round 0 > πref", "round 0", "πref", "reward_mean"),
        ("reward: round 1 > round 0", "round 1", "round 0", "reward_mean"),
        ("KL: round 1 > round 0", "round 1", "round 0", "kl"),
        ("reward: β=0.05 > round 0 (β 0.1)", "β=0.05", "round 0", "reward_mean"),
        ("reward: round 0 (β 0.1) > β=0.5", "round 0", "β=0.5", "reward_mean"),
        ("KL: β=0.05 > round 0 (β 0.1)", "β=0.05", "round 0", "kl"),
        ("KL: round 0 (β 0.1) > β=0.5", "round 0", "β=0.5", "kl"),
    ]
    out = []
    for text, a, b, key in checks:
        held = 0
        for rows in per_seed.values():
            by = {r["label"]: r for r in rows}
            if a in by and b in by and (by[a].get(key) or 0) > (by[b].get(key) or 0):
                held += 1
        out.append(f"- {text}: held in {held} of {len(per_seed)} seeds")
    return out


def verdicts(per_seed: dict[int, list[dict]]) -> list[str]:
    """Per policy: in how many seeds the evaluation gate passed (a round not built counts as not passed) and in
    how many a health guard fired in its training, with the KL range over the seeds."""
    labels = dict.fromkeys(r["label"] for rows in per_seed.values() for r in rows if r["label"] != "πref")
    out = []
    for label in labels:
        rows = [next((r for r in per_seed[s] if r["label"] == label), None) for s in sorted(per_seed)]
        present = [r for r in rows if r is not None]
        passed = sum(1 for r in present if r.get("gate", "passed") == "passed")
        fired = sum(1 for r in present if r.get("alarms"))
        kls = [r["kl"] for r in present if r.get("kl") is not None]
        kl = f"KL {min(kls):.1f} to {max(kls):.1f}" if kls else "no KL"
        gate = f"gate passed in {passed} of {len(rows)} seeds" if label.startswith("round") else "no gate"
        out.append(f"- {label}: {gate}; a health guard fired in {fired} of {len(present)}; {kl}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=str(ROOT / "runs" / "demo-seeds"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every seed's run")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        per_seed[seed], seconds[seed] = run_seed(root, seed, args.set)
    md, record = spread(per_seed)
    checks = orderings(per_seed) + verdicts(per_seed)
    text = (
        md
        + "\n"
        + "\n".join(checks)
        + "\n\nwall seconds per seed: "
        + ", ".join(f"{s}: {t:.0f}" for s, t in seconds.items())
    )
    (root / "seeds.md").write_text(text + "\n")
    (root / "seeds.json").write_text(json.dumps({"rows": record, "orderings": checks, "seconds": seconds}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
