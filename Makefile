# All set-up lives here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
NODE_DIR := tests/node
STAMP_PY := $(VENV)/.installed
STAMP_SYS := $(VENV)/.system
STAMP_NODE := $(NODE_DIR)/node_modules/.installed

.PHONY: all install system node lint test demo bench clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP_PY): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

# System tools the tests drive for real: network namespaces, nftables/iptables, curl, Node,
# and Debian's headless Chromium (the grpc-web browser tests).
$(STAMP_SYS): Makefile | $(VENV)/bin/python
	@missing=""; \
	for tool in ip:iproute2 nft:nftables iptables:iptables curl:curl node:nodejs npm:npm conntrack:conntrack cc:gcc \
	            chromium-headless-shell:chromium-headless-shell; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
	    { echo "FAILED to install$$missing (needs root and apt)"; exit 1; }; \
	fi
	touch $@

$(STAMP_NODE): $(NODE_DIR)/package.json | $(STAMP_SYS)
	cd $(NODE_DIR) && npm install --no-audit --no-fund --loglevel=error
	test -x $(NODE_DIR)/node_modules/.bin/esbuild || { echo "esbuild did not install"; exit 1; }
	touch $@

install: $(STAMP_PY)
system: $(STAMP_SYS)
node: $(STAMP_NODE)

# Style and types: ruff over the tree, mypy as pyproject.toml says (strict on nat/ and proxy/identity/).
lint: $(STAMP_PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(STAMP_SYS) $(STAMP_NODE)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP_PY)
	$(VENV)/bin/keynode demo

bench: $(STAMP_PY) $(STAMP_SYS) $(STAMP_NODE)
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .hypothesis
