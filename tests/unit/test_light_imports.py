"""The pure-math modules must import without Ray, vLLM or transformers (they run on GPU boxes without them)."""

from __future__ import annotations

import subprocess
import sys


def test_math_modules_import_only_torch():
    code = (
        "import sys; import dpo_ray.objective.losses, dpo_ray.compute.logps, dpo_ray.objective.metrics; "
        "import dpo_ray.compute.batching; "
        "heavy = [m for m in ('ray', 'vllm', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_engine_is_the_only_vllm_module():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    importers = sorted(
        str(p.relative_to(root))
        for folder in ("dpo_ray", "pipeline")
        for p in (root / folder).rglob("*.py")
        if any(line.strip().startswith(("import vllm", "from vllm")) for line in p.read_text().splitlines())
    )
    assert importers == ["dpo_ray/models/engine.py"]
