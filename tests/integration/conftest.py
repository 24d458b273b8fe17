"""Integration fixtures: one local Ray for the whole session (started once, ~5 s)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # "local": a new embedded Ray even if another cluster (e.g. test_jobs' head) runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
