# nbgrader, to grade the exercises (labkit/grading.py; docs/workshop.md, "Grading with nbgrader"), in a venv of
# its own: nbgrader's pins match the course's Jupyter today, but it also brings Jupyter server and JupyterLab
# extensions (formgrader, assignment lists) that would appear in every student's `make lab`. nbgrader runs
# the notebooks in the course's venv, through the kernel spec registered here (labkit.grading.KERNEL_NAME).
# tests/test_grading.py runs the whole path with it; without this venv that test skips and says so.
GRADING_VENV ?= .venv-grading
NBGRADER_VERSION ?= 0.9.6
GRADING_KERNEL := labkit-course

# order-only on the course venv: the kernel spec names its python, which a reinstall keeps. ipykernel warns
# that the spec is outside the course venv's Jupyter paths: it is meant for nbgrader's, where it is.
$(GRADING_VENV)/.installed: mk/grading.mk | $(STAMP)
	test -x $(GRADING_VENV)/bin/python || $(PYTHON) -m venv $(GRADING_VENV)
	$(GRADING_VENV)/bin/pip install -q --upgrade pip
	$(GRADING_VENV)/bin/pip install -q "nbgrader==$(NBGRADER_VERSION)"
	$(BIN)/python -m ipykernel install --prefix $(GRADING_VENV) --name $(GRADING_KERNEL) \
	  --display-name "labkit course ($(VENV))"
	$(GRADING_VENV)/bin/nbgrader --version
	touch $@

.PHONY: grading
grading: $(GRADING_VENV)/.installed

TEST_DEPS += $(GRADING_VENV)/.installed
