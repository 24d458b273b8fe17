"""The console: progress lines (terminal and not), and capture of third-party output into log files while the
console's own lines still reach the terminal."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from pipeline.core import console
from pipeline.core.console import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_a_terminal_prints_a_line_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = Progress("train", 40, "steps", out, interval_s=30)
    for step in range(1, 41):
        clock[0] += 1.0  # one step a second
        bar.update(step)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # 40 s of work, one line per 30 s
    assert lines[0] == "train: 30/40 steps (75%), 1 steps/s, ETA 10s, 30s elapsed"
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_redraws_one_bar(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    out = _Tty()
    bar = Progress("reference", 4, "units", out, interval_s=30)
    for unit in range(1, 5):
        clock[0] += 20.0  # 20 s a unit: slower than 0.1/s is shown per unit
        bar.update(unit)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn in place
    frames = text.rstrip("\n").split("\r\x1b[2K")[1:]
    assert frames[0] == "reference: [######..................] 1/4 units (25%), 20 s per unit, ETA 1m00s, 20s elapsed"
    assert frames[-1].startswith("reference: [########################] 4/4 units (100%)")
    assert "ETA" not in frames[-1]


def test_progress_without_a_total_counts_and_rates(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = Progress("prepare: tokenized", None, "rows", out, interval_s=1)
    clock[0] = 2.0
    bar.update(500)
    assert out.getvalue() == "prepare: tokenized: 500 rows, 250 rows/s, 2s elapsed\n"


def test_capture_sends_third_party_output_to_the_log_and_console_lines_to_the_terminal(tmp_path):
    """A child process stands in for Ray's forwarded worker output: it inherits fds 1 and 2."""
    script = textwrap.dedent(
        f"""
        import logging, os, subprocess, sys
        from pipeline.core import console
        logging.basicConfig(level="INFO")
        with console.capture({str(tmp_path / "logs")!r}):
            console.log_file("stage-a")
            console.header("stage-a: header")
            print("python print from a library")
            os.write(2, b"C-level stderr\\n")
            subprocess.run([sys.executable, "-c", "print('worker output')"], check=True)
            logging.getLogger("ray").info("ray info")
            logging.getLogger("pipeline.x").warning("our warning")
            console.result("stage-a: result")
            console.log_file("stage-b")
            print("second stage library output")
        print("after capture")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    log_a = (tmp_path / "logs" / "stage-a.log").read_text()
    assert proc.stdout.splitlines() == [
        f"stage-a: header  [log: {tmp_path / 'logs' / 'stage-a.log'}]",
        "stage-a: result",
        "after capture",
    ]
    assert "WARNING pipeline.x: our warning" in proc.stderr  # our warnings still reach the console
    for line in ("python print from a library", "C-level stderr", "worker output", "ray info"):
        assert line in log_a
        assert line not in proc.stdout + proc.stderr
    assert (tmp_path / "logs" / "stage-b.log").read_text() == "second stage library output\n"
