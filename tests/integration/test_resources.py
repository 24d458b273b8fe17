"""Resource requests the embedded Ray cannot meet are refused at once, naming the setting, instead of waiting
forever (measured before: prepare with num_actors 2 on 2 CPUs sat 20 minutes at a few percent CPU)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, PrepareConfig, ReferenceConfig
from pipeline.stages.prepare import run as prepare
from pipeline.stages.reference import run as reference

pytestmark = pytest.mark.usefixtures("ray_local")  # 2 CPUs, no accelerator


def _pairs(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i} ", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return PrepareConfig(inputs=[str(data)], tokenizer=str(tiny_model_dir), output=str(tmp_path / "pairs"))


def test_a_pool_that_takes_every_cpu_is_refused(tiny_model_dir, tmp_path):
    cfg = _pairs(tiny_model_dir, tmp_path).model_copy(update={"num_actors": 2})
    with pytest.raises(ConfigError, match=r"prepare.num_actors: 2 actor\(s\) x 1 CPU \+ 1 for reading the inputs = 3"):
        prepare(cfg)


def test_an_accelerator_this_ray_lacks_is_refused(tiny_model_dir, tmp_path):
    pairs = _pairs(tiny_model_dir, tmp_path)
    prepare(pairs)  # one actor + reads fit in 2 CPUs
    cfg = ReferenceConfig(
        model=str(tiny_model_dir), pairs=pairs.output, output=str(tmp_path / "scored"), accelerator_type="H100"
    )
    with pytest.raises(ConfigError, match=r"reference.accelerator_type is 'H100' but this Ray has no such accelerator"):
        reference(cfg)
    big = cfg.model_copy(update={"accelerator_type": None, "num_actors": 3})
    with pytest.raises(ConfigError, match=r"reference.num_actors: 3 actor\(s\) x 1 CPU = 3 CPUs, but this Ray has 2"):
        reference(big)
