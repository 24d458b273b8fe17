"""Progress of work done inside Ray workers (prepare's tokenize actors, train's rank 0), drawn on the driver's
console: the workers advance a counter actor, a driver thread polls it twice a second into a
console.Progress. Work the driver sees itself (units coming back) uses console.progress directly."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from pipeline.core import console

__all__ = ["Counter", "gather", "remote_progress"]


class Counter:
    """A count workers advance (`add`) or raise (`reach`); the driver reads it (`get`)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def reach(self, n: int) -> None:
        self.n = max(self.n, n)

    def get(self) -> int:
        return self.n


@contextlib.contextmanager
def remote_progress(label: str, total: int | None, unit: str) -> Iterator[Any]:
    """A Counter actor handle for the workers (no resources: it runs anywhere, the head included), shown as
    console progress until the block ends."""
    import ray

    counter: Any = ray.remote(num_cpus=0)(Counter).remote()
    stop = threading.Event()
    with console.progress(label, total, unit) as bar:

        def poll() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(Exception):  # progress is best effort; the stage reports its errors
                    bar.update(ray.get(counter.get.remote(), timeout=5))

        thread = threading.Thread(target=poll, name=f"{label}-progress", daemon=True)
        thread.start()
        try:
            yield counter
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                bar.update(ray.get(counter.get.remote(), timeout=5))
            ray.kill(counter)


def gather(refs: list[Any], label: str, unit: str) -> list[Any]:
    """ray.get of `refs` (results in their order), with console progress as they finish."""
    import ray

    pending = list(refs)
    with console.progress(label, len(refs), unit) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.advance(len(done))
    return list(ray.get(refs))
