"""Units of work on a pool of Ray actors: the one runner of the reference and generate stages.

A unit is a small dict (which rows, the output shard's name). A handler class, built once per actor with the
stage's resolved config (it loads the vLLM engine), processes one unit, writes the unit's shard itself and
returns a summary. The driver gives each actor one unit at a time, so losing an actor (its node died, its
process was killed) costs only the unit it held: the unit goes back to the queue and runs again, on the
actor Ray restarts (on another node when its node is gone). Units are idempotent (deterministic shard names,
atomic writes), and how many ran again is returned for the stage's manifest.

Within `sharing()` (pipeline.cli.run), actors outlive their stage and a later stage that asks for the same
engine and resources reuses them, engine loaded: one engine start where each stage used to start its own.

Placement is bounded. Before any work, a request that no node type of the cluster's autoscaler offers is
refused, naming the resources and the node types; on a cluster whose node types cannot be found (no
autoscaler), or when nodes do not come, the stage fails once `start_timeout_s` passed with no actor placed.

Tests inject a function that every actor calls before each unit through DPO_RAY_UNIT_HOOK ("module:function[:ARG]",
dpo_ray.hooks), e.g. dpo_ray.testing.faults.hold_first_unit: a test kills the actor's node while a unit is
certainly in flight (tests/cluster), instead of guessing the moment from outside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dpo_ray.errors import UserError
from dpo_ray.hooks import UNIT_HOOK_ENV, named_hook
from pipeline.core import console
from pipeline.core.runtime import embedded

logger = logging.getLogger(__name__)


__all__ = [
    "PlacementError",
    "UnitsResult",
    "acquire",
    "actor_bundle",
    "actor_options",
    "check_feasible",
    "describe",
    "give_back",
    "make_room",
    "node_types",
    "release",
    "run_units",
    "sharing",
]

MAX_ATTEMPTS = 3  # runs of one unit lost to dead actors before the stage gives up


class PlacementError(UserError, RuntimeError):
    """The cluster cannot place what a stage asks for (no node type offers it, or none came in time)."""


@dataclass(frozen=True)
class UnitsResult:
    summaries: list[dict[str, Any]]  # in the order of the units given
    retried: int  # unit runs lost with their actor and run again


class _Worker:
    """The actor of every vLLM pool (reference's and generate's units, evaluate's models). A stage passes its
    handler class and config with each call; the handler is built on first use in this process (so a user
    error raised while building it, e.g. a reward that does not load, reaches the driver as itself) and
    again when a later stage of the same `run` reuses the actor, or after Ray restarted it. Handlers take
    their vLLM engine from dpo_ray.models.engine.shared_engine, so a reused actor keeps its engine."""

    def __init__(self) -> None:
        self._built: tuple[Any, ...] | None = None
        self._handler: Any = None

    def ready(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def _get(self, handler: type, config: dict[str, Any]) -> Any:
        built = (handler.__module__, handler.__qualname__, json.dumps(config, sort_keys=True, default=str))
        if built != self._built:
            self._handler, self._built = None, None
            self._handler = handler(config)
            self._built = built
        return self._handler

    def run(self, handler: type, config: dict[str, Any], unit: dict[str, Any]) -> dict[str, Any]:
        work = self._get(handler, config)
        hook = named_hook(os.environ.get(UNIT_HOOK_ENV))
        if hook is not None:
            hook("unit")
        result: dict[str, Any] = work(unit)
        return result

    def call(self, handler: type, config: dict[str, Any], method: str, *args: Any) -> Any:
        return getattr(self._get(handler, config), method)(*args)


@dataclass
class _Kept:
    key: tuple[Any, ...]
    bundle: dict[str, float]
    actor: Any


_kept: list[_Kept] | None = None  # idle actors kept between the stages of one run; None: not sharing


@contextlib.contextmanager
def sharing() -> Iterator[None]:
    """Within the block, a vLLM pool's actors outlive their stage: a later stage asking for the same engine
    (engines.engine_key) with the same actor options gets them back, engine loaded, instead of starting new
    ones (pipeline.cli.run). Idle kept actors are killed, oldest first, when a stage needs their resources, by
    release(), and when the block ends."""
    global _kept
    _kept = []
    try:
        yield
    finally:
        release()
        _kept = None


def release() -> None:
    """Kill every kept actor (pipeline.cli.run: before train, which needs the whole cluster)."""
    import ray

    while _kept:
        ray.kill(_kept.pop(0).actor)


def make_room(bundle: dict[str, float], count: int) -> None:
    """Kill kept actors, oldest first, until the resources available now plus those freed cover `count`
    more of `bundle` (or none is left: on an autoscaling cluster new nodes may bring the rest)."""
    import ray

    if not _kept or not count:
        return
    need = {k: v * count for k, v in bundle.items()}
    available = dict(ray.available_resources())
    while _kept and not _offers(available, need):
        gone = _kept.pop(0)
        ray.kill(gone.actor)
        for k, v in gone.bundle.items():
            available[k] = available.get(k, 0.0) + v


def actor_options(cfg: Any) -> dict[str, Any]:
    """Ray options of a stage's pool actors (a stage's VllmConfig fields)."""
    return {
        "num_cpus": cfg.num_cpus_per_actor,
        "num_gpus": cfg.num_gpus_per_actor or None,
        "accelerator_type": cfg.accelerator_type,
        "max_restarts": -1,  # bounded per unit by MAX_ATTEMPTS
        "max_task_retries": 0,  # the driver re-queues a lost unit itself, and counts it
    }


def _key(engine: tuple[Any, ...] | None, options: dict[str, Any]) -> tuple[Any, ...]:
    """What a kept actor is matched by: the engine it holds and the Ray options it was started with."""
    return (engine, tuple(sorted(options.items())))


def acquire(engines: Sequence[tuple[Any, ...] | None], options: dict[str, Any], bundle: dict[str, float]) -> list[Any]:
    """One pool actor per entry of `engines` (engines.engine_key of the engine it will hold; None: never
    shared): a kept actor holding that engine where there is one, else a new actor (after making room)."""
    import ray

    got: list[Any] = []
    for engine in engines:
        key = _key(engine, options)
        kept = next((k for k in _kept or [] if engine is not None and k.key == key), None)
        if kept is not None and _kept is not None:
            _kept.remove(kept)
        got.append(None if kept is None else kept.actor)
    make_room(bundle, got.count(None))
    pool: Any = ray.remote(_Worker).options(**options)
    return [pool.remote() if a is None else a for a in got]


def give_back(
    engine: tuple[Any, ...] | None, options: dict[str, Any], bundle: dict[str, float], actors: list[Any], ok: bool
) -> None:
    """Keep a finished stage's actors for later stages while sharing (and the stage succeeded); else kill them."""
    import ray

    for actor in actors:
        if _kept is not None and engine is not None and ok:
            _kept.append(_Kept(_key(engine, options), bundle, actor))
        else:
            ray.kill(actor)


def node_types() -> dict[str, dict[str, float]] | None:
    """The node types the cluster's autoscaler can launch (name → resources), or None when none is found: from
    the configuration autoscaler v2 publishes in the GCS, else from the config file of the v1 autoscaler
    (its monitor process runs on the head node, where a job's driver runs). None on a fixed cluster."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # a Ray without this accessor: try the v1 monitor's file
        config = None
    if config is not None and config.node_group_configs:
        return {g.name: {k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs}
    path = _v1_autoscaling_config(str(ray.get_runtime_context().gcs_address))
    if path is None:
        return None
    import yaml

    with open(path) as f:
        types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    return {name: {k: float(v) for k, v in (spec.get("resources") or {}).items()} for name, spec in types.items()}


def _v1_autoscaling_config(gcs_address: str) -> str | None:
    """`--autoscaling-config` of this node's autoscaler monitor serving `gcs_address` (Linux /proc)."""
    import glob

    port = gcs_address.rsplit(":", 1)[-1]
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in args):
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                found = a.split("=", 1)[1]
                return found if os.path.isfile(found) else None
    return None


def actor_bundle(num_cpus: float, num_gpus: float | None, accelerator_type: str | None) -> dict[str, float]:
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    if accelerator_type:
        bundle[f"accelerator_type:{accelerator_type}"] = 0.001  # how Ray expresses the accelerator constraint
    return bundle


def describe(resources: dict[str, float]) -> str:
    """`CPU: 2, GPU: 1, accelerator_type:H100`: what scheduling asks for (memory and node-id keys left out)."""
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{k}: {v:g}" if not k.startswith("accelerator_type:") else k for k, v in sorted(shown.items()))


def _offers(resources: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in bundle.items())


def _where(types: dict[str, dict[str, float]] | None) -> str:
    import ray

    if types:
        listed = "; ".join(f"{name} ({describe(r)})" for name, r in sorted(types.items()))
        return f"the cluster's node types are: {listed}"
    listed = "; ".join(describe(n["Resources"]) for n in ray.nodes() if n.get("Alive"))
    return f"the cluster reports no autoscaler node types; its nodes offer: {listed}"


def check_feasible(
    setting: str, bundle: dict[str, float], keys: str = "num_cpus_per_actor, num_gpus_per_actor, accelerator_type"
) -> None:
    """On a cluster whose autoscaler publishes its node types: refuse a per-actor (or per-worker) request
    that no node type offers, before any work, naming `setting`, the request and the node types."""
    if embedded():
        return  # pipeline.core.runtime.check_pool_fits applies
    types = node_types()
    if types is not None and not any(_offers(r, bundle) for r in types.values()):
        raise PlacementError(
            f"{setting}: each asks for {{{describe(bundle)}}}, which no node type offers; {_where(types)}. "
            f"Change the stage's resources ({keys}) or add a node type that offers them"
        )


def run_units(
    handler: type,
    units: list[dict[str, Any]],
    config: dict[str, Any],
    cfg: Any,
    errors: tuple[type[BaseException], ...] = (),
    engine: tuple[Any, ...] | None = None,
) -> UnitsResult:
    """Run `units` through `cfg.num_actors` actors of `handler` (see the module docstring). A user error of
    `errors` (or any UserError) raised by the handler is re-raised as itself; other errors fail the stage.
    `engine` (engines.engine_key of the handler's vLLM engine) lets the actors be shared (see sharing)."""
    from pipeline.core.runtime import check_pool_fits

    stage = type(cfg).__name__.removesuffix("Config").lower()
    check_pool_fits(f"{stage}.num_actors", cfg.num_actors, cfg.num_cpus_per_actor, False, cfg.accelerator_type)
    bundle = actor_bundle(cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.accelerator_type)
    check_feasible(f"{stage}'s actors", bundle)
    options = actor_options(cfg)
    actors = acquire([engine] * min(cfg.num_actors, len(units)), options, bundle)
    ok = False
    try:
        with console.progress(stage, len(units), "units") as bar:
            result = _dispatch(
                actors, units, stage, bundle, cfg.start_timeout_s, (UserError, *errors), bar, handler, config
            )
        ok = True
        return result
    finally:
        give_back(engine, options, bundle, actors, ok)


def _dispatch(
    actors: list[Any],
    units: list[dict[str, Any]],
    stage: str,
    bundle: dict[str, float],
    start_timeout_s: float,
    errors: tuple[type[BaseException], ...],
    bar: console.Progress,
    handler: type,
    config: dict[str, Any],
) -> UnitsResult:
    """Hand units to actors one at a time. An actor gets work only once its `ready` probe answered: at the
    start (placement) and after it was lost (Ray restarts it; calls to a restarting actor fail at once)."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError

    from pipeline.core.runtime import unwrap_user_error

    queue = list(range(len(units)))
    attempts = [0] * len(units)
    results: dict[int, dict[str, Any]] = {}
    in_flight: dict[Any, tuple[Any, int]] = {}  # run() ref -> (actor, unit index)
    probes: dict[Any, Any] = {a.ready.remote(): a for a in actors}  # ready() ref -> actor
    started, placed, retried = time.monotonic(), False, 0

    def name(i: int) -> Any:
        return units[i].get("name", i)

    while len(results) < len(units):
        done, _ = ray.wait([*in_flight, *probes], num_returns=1, timeout=1.0)
        if not placed and not done and time.monotonic() - started > start_timeout_s:
            raise PlacementError(
                f"{stage}: no actor asking for {{{describe(bundle)}}} was placed in {start_timeout_s:g} s "
                f"({stage}.start_timeout_s); {_where(node_types())}"
            )
        for ref in done:
            if ref in probes:
                actor = probes.pop(ref)
                try:
                    ray.get(ref)
                except ActorDiedError as e:
                    raise RuntimeError(f"{stage}: an actor of the pool died for good: {e}") from None
                except RayActorError:  # still restarting
                    time.sleep(1.0)
                    probes[actor.ready.remote()] = actor
                    continue
                placed = True
            else:
                actor, i = in_flight.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    bar.update(len(results))
                except RayActorError as e:  # the actor (or its node) was lost: the unit runs again
                    if attempts[i] >= MAX_ATTEMPTS:
                        raise RuntimeError(
                            f"{stage}: unit {name(i)} was lost with its actor {attempts[i]} times; last: {e}"
                        ) from None
                    logger.warning("%s: unit %s lost with its actor; it runs again", stage, name(i))
                    retried += 1
                    queue.insert(0, i)
                    probes[actor.ready.remote()] = actor
                    continue
                except Exception as e:
                    found = unwrap_user_error(e, errors)
                    if found is not None:
                        raise type(found)(str(found)) from None
                    raise
            if queue:
                i = queue.pop(0)
                attempts[i] += 1
                in_flight[actor.run.remote(handler, config, units[i])] = (actor, i)
    return UnitsResult([results[i] for i in range(len(units))], retried)
