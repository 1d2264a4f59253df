# Two commands: `make lab` opens the course, `make test` proves every notebook still runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The environments (the course venv, then vLLM's, the quantization libraries', lm-eval's, the Debian tools
# and the model conversion) are independent: make builds them side by side. Set-up is mostly downloads and
# unpacking, so this roughly halves it; `make -j1 test` builds one at a time.
MAKEFLAGS += --jobs=4

.PHONY: setup lab test unit lint deadcode notebooks check-notebooks clean

setup: $(STAMP)

# An offline room (mk/wheelhouse.mk): `make lab WHEELHOUSE=DIR`, DIR given on the command line or in the
# environment, makes every pip of the set-up (and the SmolLM2 download) take DIR's wheels alone: no index.
FROM_WHEELHOUSE := $(if $(filter command line environment,$(origin WHEELHOUSE)),\
  PIP_NO_INDEX=1 PIP_FIND_LINKS=$(abspath $(WHEELHOUSE)))

# torch first, pinned: on this course's machines pip takes the CPU build from local disk; on a Linux GPU
# machine the same pin from PyPI is the CUDA build. labkit's own range then installs nothing more.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(FROM_WHEELHOUSE) $(BIN)/pip install -q --upgrade pip
	$(FROM_WHEELHOUSE) $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(FROM_WHEELHOUSE) $(BIN)/pip install -q -e ".[lab,test]"
	@# the int4 x int8 CPU kernel, built now (about 30 s) rather than inside the first int4 notebook;
	@# it builds nothing where the CPU lacks AVX512-VNNI or a compiler, and then int4 runs PyTorch's kernel
	$(BIN)/python -c "from labkit.quant import vnni; print('int4 x int8 kernel (AVX512-VNNI):', vnni.available())"
	@# the compiled decode step's paged attention kernel (about 15 s; labkit/engine/paged_kernel.py)
	$(BIN)/python -c "from labkit.engine import paged_kernel; print('paged decode attention kernel:', paged_kernel.available())"
	@# the linear layers' oneDNN op (about 15 s; labkit/engine/onednn_linear.py)
	$(BIN)/python -c "from labkit.engine import onednn_linear; print('oneDNN linear op:', onednn_linear.available())"
	touch $(STAMP)

# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_ARGS ?=

# The course's JupyterLab defaults (mk/lab-overrides.json: no "get notified about official Jupyter news?"
# pop-up, no news or update requests), where JupyterLab reads default overrides: the venv's
# share/jupyter/lab/settings/overrides.json. A user's own settings still win.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_OVERRIDES): mk/lab-overrides.json $(STAMP)
	mkdir -p $(dir $@)
	cp $< $@

# rooted at the repository (the README, labkit/ and solutions/ are one click away), opening notebook 00
lab: setup $(LAB_OVERRIDES)
	$(BIN)/jupyter lab --notebook-dir=. --LabApp.default_url=/lab/tree/notebooks/00_setup.ipynb \
	  $(ROOT_FLAG) $(LAB_ARGS)

# Extra environments (e.g. vLLM or llm-compressor, which cannot share one venv) are defined in mk/*.mk;
# each appends its stamp target to TEST_DEPS so `make test` builds it before running the suite.
TEST_DEPS :=
-include mk/*.mk

# Two pytest workers: the suite is mostly single-threaded work (one notebook, one server, one engine at a
# time), so a second worker roughly halves it on 2 cores. Each notebook (and each test module) stays on one
# worker, its cells in order (--dist loadscope); tests/conftest.py gives every worker one torch thread.
# `make test PYTEST_WORKERS=0` runs everything in this one process, as before.
PYTEST_WORKERS ?= 2
test: setup $(TEST_DEPS)
	$(BIN)/python -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadscope)

# The quick check while you work: labkit's unit tests, without notebooks, servers, separate venvs or the
# slow tests (markers in pyproject.toml, applied in tests/conftest.py). About a minute or two.
UNIT_MARKERS := not slow and not server and not external and not notebook
unit: setup $(CI_STAMP)
	$(BIN)/python -m pytest tests -q -m "$(UNIT_MARKERS)"

# Lint, format and type checks (tools from the `lint` extra); .ci/run runs this before the tests.
LINT_STAMP := $(VENV)/.lint-tools
LINT_PATHS := labkit tests benchmarks solutions
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[lint]"
	touch $@

lint: $(LINT_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# Candidates for dead code (vulture): a list to read, not a gate. It sees the uses in tests (so a reference
# kept for its tests is not listed), not those in notebooks: grep solutions/ before removing anything.
deadcode: $(LINT_STAMP)
	$(BIN)/vulture labkit benchmarks tests --min-confidence 60 || true

# Instructors: edit solutions/, then regenerate the student copies.
notebooks: setup
	$(BIN)/labkit notebooks

check-notebooks: setup
	$(BIN)/labkit notebooks --check

clean:
	rm -rf $(VENV) results/*.json
