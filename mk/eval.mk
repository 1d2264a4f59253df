# lm-evaluation-harness, for tests/test_serve_lm_eval.py: the tool practitioners use to score models,
# run once against `labkit serve` (its local-completions client) and once with its own Hugging Face
# backend on the same model and task, in its own venv: it pins datasets/evaluate/accelerate versions
# that must not reach the main one. labkit runs it by subprocess; without this venv that test skips.
EVAL_VENV ?= .venv-eval
LM_EVAL_VERSION ?= 0.4.13

$(EVAL_VENV)/.installed: mk/eval.mk
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install -q --upgrade pip
	$(EVAL_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)"
	$(EVAL_VENV)/bin/pip install -q "lm-eval[api,hf]==$(LM_EVAL_VERSION)" "torch==$(TORCH_VERSION)"
	$(EVAL_VENV)/bin/python -c "import lm_eval; print('lm_eval', lm_eval.__version__)"
	touch $@

.PHONY: eval
eval: $(EVAL_VENV)/.installed

TEST_DEPS += $(EVAL_VENV)/.installed
