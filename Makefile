# Everything installs itself: a virtual environment in .venv, and redis-server when tests need it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench cluster clean install web-build

$(STAMP): pyproject.toml setup.py $(wildcard services/media/fastpath/*.c services/media/fastpath/*.h) $(wildcard proto/braid/rpc/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash scripts/ensure-build-deps.sh
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Run the dev server: one process, in-memory state, API key devkey / secret secret, ws://127.0.0.1:7880
run: $(STAMP)
	$(VENV)/bin/braid-server --dev

## Run the whole test suite
test: $(STAMP)
	bash scripts/ensure-test-deps.sh
	bash scripts/ensure-browser-deps.sh
	bash scripts/ensure-agents-venv.sh
	bash scripts/ensure-node-sdks.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Redis, a router, 2 signal and 3 media nodes in 2 regions on 127.0.0.1
cluster: $(STAMP)
	bash scripts/ensure-test-deps.sh
	$(PY) scripts/cluster.py

## Rebuild the demo meeting page (web/ -> braid/web/meet/, committed); needs Node.js 18+ and npm
web-build:
	bash scripts/build-web.sh

bench: $(STAMP)
	bash scripts/ensure-test-deps.sh
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet 'matplotlib>=3.7'
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.cluster
	$(PY) -m benchmarks.congestion
	$(PY) -m benchmarks.scaling

clean:
	rm -rf $(VENV) build *.egg-info braid/rpc .pytest_cache
