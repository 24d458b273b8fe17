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
    fields.pop("step_tokens_cap")  # derived from the model, which the key holds (engines.step_budget)
    other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2, str: lambda v: v + "x"}
    base = engine_key(SimpleNamespace(**fields), "m")
    assert engine_key(SimpleNamespace(**(fields | {"seed": 3})), "m") == base  # requests carry their own seeds
    assert engine_key(SimpleNamespace(**fields), "other") != base
    for name, value in fields.items():
        if name != "seed":
            changed = other[type(value)](value) if value is not None else 7
            assert engine_key(SimpleNamespace(**(fields | {name: changed})), "m") != base, name


def test_an_unset_step_budget_bounds_the_prompt_log_probs_of_a_step(tmp_path, monkeypatch):
    """engine_spec: with max_num_batched_tokens unset, the engine gets a cap whose [tokens x vocab] prompt
    log-probs (8 bytes an entry) stay within PROMPT_LOGPROB_BYTES. make_engine's step budget (step_tokens): on a
    GPU vLLM's default lowered to the cap, never raised, a configured one kept; on CPU (chunked prefill off) at
    least max_model_len, and a configured one below it refused. vLLM's defaults are pinned here (4096 as on
    CPU, 16384 as on an H100), so the test holds on either host."""
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    from dpo_ray.models.engine import lowered_step_budget, step_tokens
    from pipeline.core.engines import PROMPT_LOGPROB_BYTES, engine_spec, step_budget

    assert step_budget(128_256) == 4096 and 4096 * 128_256 * 8 <= PROMPT_LOGPROB_BYTES
    assert step_budget(152_064) == 3328 and step_budget(262_144) == 2048 and step_budget(10**9) == 2048
    assert step_budget(32_000) == 16_640 and step_budget(512) > 10**6

    def defaults(tokens: int):
        return classmethod(lambda cls, world_size: ({UsageContext.LLM_CLASS: tokens * world_size}, {}))

    monkeypatch.setattr(EngineArgs, "get_batch_defaults", defaults(16_384))  # an H100's
    assert lowered_step_budget(4096, 1) == 4096 and lowered_step_budget(16_640, 1) is None  # lowered, never raised
    assert step_tokens(EngineSpec("m", max_model_len=32_800, step_tokens_cap=4096), True) == 4096
    assert step_tokens(EngineSpec("m", max_model_len=32_800, step_tokens_cap=20_000), True) is None
    assert step_tokens(EngineSpec("m", max_model_len=32_800), True) is None
    assert step_tokens(EngineSpec("m", max_num_batched_tokens=1024, max_model_len=32_800), True) == 1024
    monkeypatch.setattr(EngineArgs, "get_batch_defaults", defaults(4096))  # CPU's
    assert step_tokens(EngineSpec("m", max_model_len=128, step_tokens_cap=2048), False) == 2048  # cap < default
    assert step_tokens(EngineSpec("m", max_model_len=128, step_tokens_cap=50_000), False) == 4096
    assert step_tokens(EngineSpec("m", max_model_len=32_800, step_tokens_cap=2048), False) == 32_800  # whole prompts
    assert step_tokens(EngineSpec("m", max_num_batched_tokens=40_000, max_model_len=32_800), False) == 40_000
    with pytest.raises(ValueError, match="max_num_batched_tokens 1024 < max_model_len 32800: on CPU"):
        step_tokens(EngineSpec("m", max_num_batched_tokens=1024, max_model_len=32_800), False)
    skip = ("model", "enable_prefix_caching", "step_tokens_cap")
    fields = {f.name: f.default for f in dataclasses.fields(EngineSpec) if f.name not in skip}
    for vocab, config, budget, cap in (
        (128_256, {}, None, 4096),
        (512, {}, None, step_budget(512)),
        (128_256, {}, 16384, None),  # configured: kept as is
        (262_144, {"text_config": {"vocab_size": 262_144}}, None, 2048),  # a multimodal config's text model
        (0, None, None, None),  # no config.json: vLLM's default
    ):
        model = tmp_path / f"m{vocab}-{budget}-{bool(config)}"
        model.mkdir()
        if config is not None:
            (model / "config.json").write_text(json.dumps(config or {"vocab_size": vocab}))
        spec = engine_spec(SimpleNamespace(**(fields | {"max_num_batched_tokens": budget})), str(model))
        assert (spec.max_num_batched_tokens, spec.step_tokens_cap) == (budget, cap), (vocab, budget)
