"""The local `ray job submit` recipe of docs/howto/cluster.md, run as written in a shell whose PATH lacks the
venv (as a new user's would): the recipe's own lines must make `dpo-ray` reachable from the job and the token
accepted.

Two paths are swapped: the demo model's tokenizer (`make demo` is not run here) for the session's tiny model,
and the run directory for a temporary one. The recipe ends with `ray stop`, which stops every Ray started on
this machine by this user: this module runs in `make test-cluster` before any module that starts one and
keeps it (the name sorts before test_jobs.py), and refuses to run beside an embedded Ray of this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HH_SAMPLE

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def recipe() -> str:
    text = (ROOT / "docs" / "howto" / "cluster.md").read_text()
    found = re.search(r"<!-- local-job-recipe -->\n```bash\n(.*?)```", text, re.S)
    assert found, "docs/howto/cluster.md has no local-job-recipe block"
    return found.group(1)


@pytest.mark.cluster
@pytest.mark.skipif(not HH_SAMPLE.exists(), reason="the shared HH sample is not here")
def test_the_cluster_howto_local_job_recipe_as_written(tiny_model_dir, tmp_path):
    import ray

    assert not ray.is_initialized(), "the recipe's `ray stop` would stop this process's Ray"
    script = recipe()
    assert "$PWD/runs/demo/assets/model" in script and "$PWD/runs/job" in script
    script = script.replace("$PWD/runs/demo/assets/model", str(tiny_model_dir))
    script = script.replace("$PWD/runs/job", str(tmp_path / "job"))
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != VENV_BIN.resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))} | {"PATH": path}
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-4000:]
    assert re.search(r"prepare: 1500 rows in -> \d+ pairs", out), out[-4000:]
    manifest = json.loads((tmp_path / "job" / "pairs" / "manifest.json").read_text())
    assert manifest["kind"] == "pairs" and manifest["stats"]["rows_in"] == 1500
