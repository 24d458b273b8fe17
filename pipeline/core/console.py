"""What a stage tells the person at the console, and where everything else goes.

A stage prints three kinds of lines: a header (what it reads, what it writes, with what resources), progress
while it works, and one result line. With a terminal, progress is one bar redrawn in place (count, rate,
ETA); without one (a log file, `ray job logs`), a one-line update every `interval_s` seconds.

The CLI (not a stage) turns on capture: for each stage, the process's stdout and stderr file descriptors
point at `<log_dir>/<label>.log`, so Ray's and vLLM's output (worker logs forwarded to the driver, Ray Data's
operator progress, engine logs, C-level prints) lands there, while the console's own lines go to the
terminal through duplicates of the original descriptors. `--verbose` leaves the descriptors alone. Without
capture (a library caller, the tests) everything prints to sys.stdout as usual.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import IO

__all__ = ["Capture", "Progress", "capture", "error", "header", "progress", "result", "write"]

logger = logging.getLogger("pipeline")


def _console_stream(fd: int, current: IO[str]) -> IO[str]:
    """Where console lines go while fd `fd` is captured: a duplicate of that descriptor when `current`
    (sys.stdout or sys.stderr) writes to it; else `current` itself (a caller replaced it, e.g. pytest)."""
    try:
        if current.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    return current


class Capture:
    """The console's own streams while third-party output is captured into log files (see the module doc)."""

    def __init__(self, log_dir: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.log_dir = log_dir
        self._saved = (os.dup(1), os.dup(2))  # what fds 1 and 2 were, restored by close()
        self.out: IO[str] = _console_stream(1, sys.stdout)
        self.err: IO[str] = _console_stream(2, sys.stderr)
        self._owned = [s for s in (self.out, self.err) if s is not sys.stdout and s is not sys.stderr]
        self.path: str | None = None
        self._file: IO[bytes] | None = None

    def switch(self, label: str) -> str:
        """From now on, fds 1 and 2 write to <log_dir>/<label>.log (appended); returns that path."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, f"{label}.log")
        new = open(path, "ab")  # noqa: SIM115 - held open until the next switch or close
        os.dup2(new.fileno(), 1)
        os.dup2(new.fileno(), 2)
        if self._file is not None:
            self._file.close()
        self._file, self.path = new, path
        return path

    def close(self) -> None:
        """Point fds 1 and 2 back at the console."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        for stream in self._owned:
            stream.close()
        if self._file is not None:
            self._file.close()
            self._file = None


_capture: Capture | None = None


@contextlib.contextmanager
def capture(log_dir: str) -> Iterator[Capture]:
    """Capture third-party output into log files under `log_dir` until the block ends (CLI only)."""
    global _capture
    _capture = Capture(log_dir)
    handler = logging.StreamHandler(_capture.err)  # warnings of this project still reach the console
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("pipeline", "dpo_ray"):
        logging.getLogger(name).addHandler(handler)
    try:
        yield _capture
    finally:
        for name in ("pipeline", "dpo_ray"):
            logging.getLogger(name).removeHandler(handler)
        _capture.close()
        _capture = None


def log_file(label: str) -> str | None:
    """Send third-party output to `<log_dir>/<label>.log` when capturing; the path, or None."""
    return _capture.switch(label) if _capture is not None else None


def _out() -> IO[str]:
    return _capture.out if _capture is not None else sys.stdout


def write(line: str) -> None:
    print(line, file=_out(), flush=True)


def header(line: str) -> None:
    """A stage's first line: its inputs, output and resources; names the log file when capturing."""
    where = f"  [log: {_capture.path}]" if _capture is not None and _capture.path else ""
    write(line + where)
    logger.debug(line)


def result(line: str) -> None:
    """A stage's result line: printed, and logged at DEBUG for log files."""
    write(line)
    logger.debug(line)


def error(text: str) -> None:
    print(text, file=_capture.err if _capture is not None else sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of one stage's work in `unit`s (pairs, units, steps). On a terminal: a bar redrawn at most
    every 0.2 s; otherwise a line every `interval_s` seconds. `close()` ends it (the result line follows)."""

    def __init__(self, label: str, total: int | None, unit: str, stream: IO[str], interval_s: float) -> None:
        self.label, self.total, self.unit, self.stream = label, total, unit, stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.tty else interval_s
        self.done = 0
        self.start = self._last = time.monotonic()
        self._drawn = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = f"[{'#' * int(frac * 24)}{'.' * (24 - int(frac * 24))}] " if self.tty else ""
            parts[0] = f"{bar}{parts[0]} ({100 * frac:.0f}%)"
        if rate >= 0.1:
            parts.append(f"{rate:.3g} {self.unit}/s")
        elif self.done:
            parts.append(f"{elapsed / self.done:.3g} s per {self.unit.removesuffix('s')}")
        if self.total and self.done and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts.append(f"{_duration(elapsed)} elapsed")
        return f"{self.label}: " + ", ".join(parts)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval_s or (self.tty and self.total and done >= self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
            self._drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def progress(label: str, total: int | None, unit: str) -> Iterator[Progress]:
    """A Progress on the console (see Progress); `DPO_RAY_PROGRESS_INTERVAL_S` sets the interval without a
    terminal (default 30 s)."""
    bar = Progress(label, total, unit, _out(), float(os.environ.get("DPO_RAY_PROGRESS_INTERVAL_S", "30")))
    try:
        yield bar
    finally:
        bar.close()
