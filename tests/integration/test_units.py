"""The unit runner (pipeline/core/units.py) on the session's local Ray, with handlers that need no engine: results
in unit order, a unit lost with its actor runs again and is counted, user errors surface as themselves,
a unit that keeps killing its actor stops the stage, placement is bounded and refused when infeasible."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dpo_ray.errors import UserError
from pipeline.core import console, units
from pipeline.core.units import PlacementError, run_units

pytestmark = pytest.mark.usefixtures("ray_local")


class BadReward(UserError, ValueError):
    pass


class Square:
    """Squares a unit's number; dies (its whole process) the first time it meets `die_on`, or every time."""

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("fail_init"):
            raise BadReward("the reward does not load")
        self.config = config

    def __call__(self, unit: dict[str, Any]) -> dict[str, Any]:
        marker = Path(self.config["dir"]) / f"died-{unit['x']}"
        if unit["x"] == self.config.get("die_on") and (self.config.get("always") or not marker.exists()):
            marker.touch()
            os._exit(1)
        return {"x": unit["x"], "y": unit["x"] ** 2, "pid": os.getpid()}


def _cfg(**kw: Any) -> Any:
    return SimpleNamespace(
        **{"num_actors": 1, "num_cpus_per_actor": 1, "num_gpus_per_actor": 0, "accelerator_type": None}
        | {"start_timeout_s": 60}
        | kw  # fmt: skip
    )


def test_results_in_unit_order_and_a_lost_unit_runs_again(tmp_path):
    todo = [{"x": x} for x in range(7)]
    done = run_units(Square, todo, {"dir": str(tmp_path), "die_on": 3}, _cfg())
    assert [r["y"] for r in done.summaries] == [x * x for x in range(7)]
    assert done.retried == 1 and (tmp_path / "died-3").exists()
    # the restarted actor (a new process) ran the lost unit and the ones after it
    assert done.summaries[3]["pid"] != done.summaries[0]["pid"]


def test_a_unit_that_keeps_killing_its_actor_stops_the_stage(tmp_path):
    with pytest.raises(RuntimeError, match=r"unit 2 was lost with its actor 3 times"):
        run_units(
            Square, [{"x": x, "name": x} for x in range(4)], {"dir": str(tmp_path), "die_on": 2, "always": 1}, _cfg()
        )


def test_a_user_error_in_the_handler_surfaces_as_itself(tmp_path):
    with pytest.raises(BadReward, match="the reward does not load"):
        run_units(Square, [{"x": 1}], {"dir": str(tmp_path), "fail_init": True}, _cfg())


def test_placement_is_bounded(tmp_path):
    import ray

    pool: Any = ray.remote(units._Worker).options(num_cpus=1, resources={"no-such-resource": 1})
    actors = [pool.remote()]
    try:
        with pytest.raises(PlacementError, match=r"test: no actor asking for \{CPU: 1\} was placed in 2 s"):
            with console.progress("test", 1, "units") as bar:
                units._dispatch(actors, [{"x": 1}], "test", {"CPU": 1.0}, 2.0, (), bar, Square, {})
    finally:
        ray.kill(actors[0])


def test_a_request_no_node_type_offers_is_refused_up_front(monkeypatch):
    types = {"cpu": {"CPU": 8.0}, "gpu": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 1.0}}
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster: the embedded-Ray checks do not apply
    monkeypatch.setattr(units, "node_types", lambda: types)
    units.check_feasible("reference's actors", units.actor_bundle(1, 1, "H100"))  # offered by "gpu"
    with pytest.raises(PlacementError) as e:
        units.check_feasible("reference's actors", units.actor_bundle(1, 1, "A100"))
    assert "reference's actors: each asks for {CPU: 1, GPU: 1, accelerator_type:A100}" in str(e.value)
    assert "cpu (CPU: 8); gpu (CPU: 8, GPU: 1, accelerator_type:H100)" in str(e.value)
    with pytest.raises(PlacementError, match=r"asks for \{CPU: 16\}"):
        units.check_feasible("train's workers", units.actor_bundle(16, 0, None))


def _live_workers() -> int:
    import ray

    table = ray._private.state.state.actor_table(None)  # the GCS's (the local Ray has no dashboard)
    return sum(1 for a in table.values() if a["State"] == "ALIVE" and a["ActorClassName"] == "_Worker")


def _wait_workers(count: int) -> None:
    import time

    deadline = time.monotonic() + 180  # an actor's start or end under load can take a while: wait for the event
    while _live_workers() != count:
        assert time.monotonic() < deadline, f"{_live_workers()} pool actors alive, expected {count}"
        time.sleep(0.2)


def test_sharing_reuses_actors_of_the_same_engine_and_makes_room_for_others(tmp_path):
    """Within sharing(): the same engine key gets the same actor (same process) with the new stage's handler
    config; another key gets a new actor, the kept one killed when the cluster (2 CPUs) has no room; outside
    sharing, and when the block ends, no actor is left."""
    two = _cfg(num_cpus_per_actor=2)  # the whole local cluster: a new actor needs the kept one gone
    pid = lambda result: {r["pid"] for r in result.summaries}  # noqa: E731
    first = run_units(Square, [{"x": 1}], {"dir": str(tmp_path)}, two, engine=("model-a",))
    second = run_units(Square, [{"x": 2}], {"dir": str(tmp_path)}, two, engine=("model-a",))
    assert pid(first) != pid(second)  # not sharing: each stage starts (and kills) its own
    _wait_workers(0)
    with units.sharing():
        a1 = run_units(Square, [{"x": 1}], {"dir": str(tmp_path)}, two, engine=("model-a",))
        a2 = run_units(Square, [{"x": 2}], {"dir": str(tmp_path), "stage": 2}, two, engine=("model-a",))
        assert pid(a1) == pid(a2) and [r["y"] for r in a2.summaries] == [4]
        _wait_workers(1)
        b = run_units(Square, [{"x": 3}], {"dir": str(tmp_path)}, two, engine=("model-b",))  # no room: a's killed
        assert pid(b) != pid(a1)
        none = run_units(Square, [{"x": 4}], {"dir": str(tmp_path)}, two, engine=None)  # never shared
        assert pid(none) != pid(b)
        _wait_workers(0)  # b's was killed to make room, none's not kept
        again = run_units(Square, [{"x": 5}], {"dir": str(tmp_path)}, _cfg(), engine=("model-a",))
        assert pid(again) != pid(a1)  # a was killed; one CPU each now
        _wait_workers(1)  # kept until the block ends
    _wait_workers(0)


def test_a_failed_stage_does_not_keep_its_actors(tmp_path):
    with units.sharing():
        with pytest.raises(BadReward):
            run_units(Square, [{"x": 1}], {"dir": str(tmp_path), "fail_init": True}, _cfg(), engine=("model-a",))
        ok = run_units(Square, [{"x": 1}], {"dir": str(tmp_path)}, _cfg(), engine=("model-a",))
        assert ok.summaries[0]["y"] == 1
        _wait_workers(1)
