"""The console as a person sees it: `dpo-ray prepare` on the HH sample under a pseudo-terminal prints a
header, progress and the result in a few lines; Ray's output goes to <run_dir>/logs/prepare.log; errors
still reach the console."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import HH_SAMPLE

CLI = [sys.executable, "-m", "pipeline"]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, tokenizer: Path, inputs: list[str]) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "prepare": {
            "inputs": inputs,
            "tokenizer": str(tokenizer),
            "format": "implicit",
            "max_length": 256,
            "max_prompt_length": 192,
            "batch_size": 256,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _under_a_terminal(args: list[str], timeout: float) -> tuple[int, str]:
    """Run `args` with stdout and stderr on a pseudo-terminal; (exit status, everything it printed)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=child, stderr=child, cwd=ROOT, close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child side closed (process exited)
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason="the shared HH sample is not here")
def test_prepare_on_a_terminal_prints_header_progress_and_result_in_a_few_lines(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, [str(HH_SAMPLE)])
    status, text = _under_a_terminal([*CLI, "prepare", "--config", str(cfg)], timeout=600)
    assert status == 0, text
    lines = text.replace("\r\n", "\n").split("\n")  # a bar redrawn with \r stays one line
    assert len(lines) < 40, text
    log = tmp_path / "run" / "logs" / "prepare.log"
    assert lines[0].startswith("prepare: 1 input file(s), implicit format -> ")
    assert lines[0].endswith(f"[log: {log}]")
    assert re.search(r"prepare: tokenized: \d+ rows, [\d.]+ rows/s", text)  # a progress frame
    assert re.search(r"prepare: 1500 rows in -> \d+ pairs \(train \d+, eval \d+\), \d+ rejected", text)
    assert "INFO" not in text and "Ray" not in text  # Ray's own lines are in the log, not on the console
    logged = log.read_text()
    assert "Starting execution of Dataset" in logged  # Ray Data's operator lines


def test_a_user_error_reaches_the_console_while_output_is_captured(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, [str(tmp_path / "missing.jsonl")])
    proc = subprocess.run(
        [*CLI, "prepare", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "missing.jsonl" in proc.stderr
