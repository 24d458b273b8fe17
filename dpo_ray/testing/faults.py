"""Fault injection for the tests, through the hooks of dpo_ray.hooks: a step hook that kills a worker or its node,
and a unit hook that holds the first unit in flight.

The train stage passes DPO_RAY_STEP_HOOK from the driver's environment to its workers, e.g.
`DPO_RAY_STEP_HOOK=dpo_ray.testing.faults:fail:3:1` (rank 1's process exits at step 3) or
`...:fail:4:0:node` (rank 0 kills its node's raylet at step 4, as when a machine is lost). Once per run: a
marker file under the train stage's output records that the fault happened, so the restarted run goes on.

`DPO_RAY_UNIT_HOOK=dpo_ray.testing.faults:hold_first_unit:DIR` (in every actor's environment, e.g. a job's
runtime_env) holds the first pool-actor unit of the run, so that a test can kill that node while the unit is in
flight; `...:hold_unit:KIND:N:DIR` holds the N-th unit of work of a kind (a unit, or a shard prepare writes).
"""

from __future__ import annotations

import logging
import os
import time

__all__ = ["fail", "hold_first_unit", "hold_unit"]

logger = logging.getLogger(__name__)


def fail(spec: str, step: int, rank: int, output: str) -> None:
    """'STEP:RANK' makes RANK's process exit abruptly when it reaches STEP; 'STEP:RANK:node' kills RANK's node
    instead (its raylet, the worker's parent: the node's other processes go with it). The marker is written to
    `output` (any fsspec URI) first."""
    fail_step, fail_rank, *mode = spec.split(":")
    if step != int(fail_step) or rank != int(fail_rank):
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    marker = f"{root.rstrip('/')}/.fault-injected-{fail_step}-{fail_rank}"
    fs.invalidate_cache()
    if fs.exists(marker):
        return
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(marker, b"")
    logger.warning("fault injection: rank %d %s at step %d", rank, "kills its node" if mode else "exits", step)
    # Ray Train registers reported checkpoints when it polls the workers (every 2 s); a crash this
    # soon after a report would also lose it in real life, so the simulated crash comes a little later.
    time.sleep(5)
    if mode == ["node"]:
        import signal

        parent = os.getppid()
        with open(f"/proc/{parent}/comm") as f:
            name = f.read().strip()
        if "raylet" not in name:
            raise RuntimeError(f"fault injection: the worker's parent is {name!r}, not a raylet")
        os.kill(parent, signal.SIGKILL)
        time.sleep(60)  # this process goes with its node
    os._exit(1)


def hold_first_unit(directory: str, kind: str) -> None:
    """Of a run's pool-actor units (kind "unit"; prepare's shards are not held), the first caller writes
    <directory>/held (its node id; atomically, so exactly one caller does) and
    then holds its unit for at most DPO_RAY_TEST_HOLD_S seconds (default 300) before going on; every later unit
    runs at once. `directory` must be one every node can reach."""
    import ray

    if kind != "unit":
        return

    tmp = os.path.join(directory, f".held-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(ray.get_runtime_context().get_node_id()))
    try:
        os.link(tmp, os.path.join(directory, "held"))  # fails when another unit was held first
    except FileExistsError:
        return
    finally:
        os.remove(tmp)
    deadline = time.monotonic() + float(os.environ.get("DPO_RAY_TEST_HOLD_S", "300"))
    while time.monotonic() < deadline:
        time.sleep(0.5)


def hold_unit(spec: str, kind: str) -> None:
    """'KIND:N:DIR': the units of work of that kind ("unit": a pool actor's; "shard": a shard prepare writes) are
    numbered in the order they start (0, 1, ...; each caller claims the lowest free number in DIR atomically);
    the one numbered N writes DIR/held and is held there for at most DPO_RAY_TEST_HOLD_S seconds (default 300),
    so a test can kill the run while exactly N are done (with one worker: 0 .. N-1, before N starts)."""
    wanted, n, directory = spec.split(":", 2)
    if kind != wanted:
        return
    number = 0
    while True:
        try:
            fd = os.open(os.path.join(directory, f"unit-{number}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            number += 1
            continue
        os.close(fd)
        break
    if number != int(n):
        return
    with open(os.path.join(directory, ".held"), "w") as f:
        f.write(str(number))
    os.replace(os.path.join(directory, ".held"), os.path.join(directory, "held"))
    deadline = time.monotonic() + float(os.environ.get("DPO_RAY_TEST_HOLD_S", "300"))
    while time.monotonic() < deadline:
        time.sleep(0.5)
