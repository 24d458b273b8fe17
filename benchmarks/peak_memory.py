"""A process's resident memory and its peak since a reset (Linux /proc), for the memory benchmarks."""

from __future__ import annotations

import os


def rss_mib() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Set this process's peak resident memory (VmHWM) to its current one (clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM) since it started or reset_peak, MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
