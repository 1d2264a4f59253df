# llama.cpp as the CPU peer of the roofline benchmark (issue 12): llama-cpp-python built from its source
# distribution (PyPI ships no Linux wheel) in a venv of its own. Not part of `make test` (it compiles
# llama.cpp: minutes on 2 cores); benchmarks/roofline.py uses it when present.
#     make llama        # then: .venv/bin/python benchmarks/roofline.py
LLAMA_VENV ?= .venv-llama
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
# Built for this CPU (llama.cpp's default, -march=native) except Intel AMX: on a Xeon with AMX-INT8 the AMX
# path of 0.3.36 (it repacks Q4_1 weights for AMX) crashed with a segmentation fault on every multi-token
# prompt. -mno-amx-int8 compiles that path out; AVX-512 and VNNI stay. Override with LLAMA_CMAKE_ARGS=.
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8

$(LLAMA_VENV)/.installed: mk/llama.mk
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(LLAMA_VENV)/bin/pip install -q --no-cache-dir --force-reinstall --no-binary llama-cpp-python \
	  "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)"
	$(LLAMA_VENV)/bin/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
	touch $@

.PHONY: llama
llama: $(LLAMA_VENV)/.installed
