"""What a stage tells the person at the console: one result line per stage (what it did, or that it was
skipped), on stdout. Progress while a stage works goes through the module loggers (`logging`, configured
by the CLI; `--log-level`)."""

from __future__ import annotations

import logging

__all__ = ["result"]

logger = logging.getLogger("pipeline")


def result(line: str) -> None:
    """A stage's result line: printed, and logged at DEBUG for log files."""
    print(line, flush=True)
    logger.debug(line)
