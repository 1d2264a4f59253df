# llama.cpp as the CPU peer of the roofline benchmark (issue 12): llama-cpp-python built from its source
# distribution (PyPI ships no Linux wheel) in a venv of its own. Not part of `make test` (it compiles
# llama.cpp: minutes on 2 cores); benchmarks/roofline.py uses it when present.
#     make llama        # then: .venv/bin/python benchmarks/roofline.py
LLAMA_VENV ?= .venv-llama
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36

$(LLAMA_VENV)/.installed: mk/llama.mk
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/pip install -q --no-binary llama-cpp-python \
	  "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)"
	$(LLAMA_VENV)/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
	touch $@

.PHONY: llama
llama: $(LLAMA_VENV)/.installed
