"""dpo_ray.models.engine.shared_engine: one engine per process, returned again for the same spec (seed aside),
refused for another; pipeline.core.engines.engine_key is what the driver matches actors by."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from dpo_ray.models import engine
from dpo_ray.models.engine import EngineSpec, shared_engine
from pipeline.core.engines import engine_key


def test_one_engine_per_process(monkeypatch):
    built: list[EngineSpec] = []
    monkeypatch.setattr(engine, "_held", None)
    monkeypatch.setattr(engine, "make_engine", lambda spec: built.append(spec) or object())
    first = shared_engine(EngineSpec(model="/m", seed=1))
    assert shared_engine(EngineSpec(model="/m", seed=7)) is first  # requests carry their own seeds
    assert len(built) == 1
    with pytest.raises(RuntimeError, match="holds a vLLM engine for .*model='/m'.* cannot also load .*model='/n'"):
        shared_engine(EngineSpec(model="/n"))
    with pytest.raises(RuntimeError, match="cannot also load"):
        shared_engine(EngineSpec(model="/m", max_model_len=64))


def test_engine_key_is_every_engine_setting_but_the_seed():
    """Derived from EngineSpec's fields, so a new engine setting that the key forgets fails here."""
    fields = {f.name: f.default for f in dataclasses.fields(EngineSpec) if f.name != "model"}
    fields.pop("enable_prefix_caching")  # off in every stage (engines.engine_spec)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2, str: lambda v: v + "x"}
    base = engine_key(SimpleNamespace(**fields), "m")
    assert engine_key(SimpleNamespace(**(fields | {"seed": 3})), "m") == base  # requests carry their own seeds
    assert engine_key(SimpleNamespace(**fields), "other") != base
    for name, value in fields.items():
        if name != "seed":
            changed = other[type(value)](value) if value is not None else 7
            assert engine_key(SimpleNamespace(**(fields | {name: changed})), "m") != base, name
