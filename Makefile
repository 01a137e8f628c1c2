# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test test-fast lint typecheck test-vllm images docker browser js bench bench-coserve clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

## Serve on 0.0.0.0:8000 with the simulated runtime and Redis at REDIS_URL (or a local one under ./var)
run: $(VENV)/.installed
	@test -f config/auth.keys.json || { cp config/example.keys.json config/auth.keys.json; \
		echo "created config/auth.keys.json from config/example.keys.json"; }
	@scripts/ensure-redis.sh
	$(PY) -m gateway serve

## Install test dependencies, start Docker if needed, build the test images offline, lint, run every test
test: $(VENV)/.installed lint docker images browser js
	$(PY) -m pytest

## The lint gate (configuration in pyproject.toml): ruff on the service, the scripts and the tests, and
## mypy --strict on gateway/. `make test` and `make test-fast` run it first, so CI fails on either.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check gateway scripts tests tests_vllm
	$(VENV)/bin/mypy

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

## The fast tier: lint plus the tests that need neither Docker nor a browser
test-fast: $(VENV)/.installed lint js
	$(PY) -m pytest -m "not docker and not slow" --ignore=tests/test_browser.py -q

docker:
	@scripts/ensure-docker.sh

images: docker
	@scripts/build-test-images.sh

## Debian's Chromium for the dashboard's browser tests (Playwright drives it; it never downloads a browser)
browser:
	@test -x /usr/bin/chromium || { \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

## The real tus-js-client for the upload tests: node and npm from Debian if missing, then the pinned client
## from tests/js/package-lock.json (npm ci: exactly the locked versions)
JS_DIR := tests/js
js: $(JS_DIR)/node_modules/.installed

$(JS_DIR)/node_modules/.installed: $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	cd $(JS_DIR) && npm ci --no-audit --no-fund
	touch $@

## The real-runtime tier: build (once, cached under /var/cache/llm-gateway) a vLLM CPU venv and two tiny
## models, then run tests_vllm/ with the gateway on a real vLLM server (~3 GB of memory, a few minutes)
VLLM_VENV ?= /var/cache/llm-gateway/vllm-venv
test-vllm: $(VENV)/.installed
	@VLLM_VENV=$(VLLM_VENV) scripts/build-vllm-env.sh
	@HF_HUB_DISABLE_PROGRESS_BARS=1 $(VLLM_VENV)/bin/python scripts/make_tiny_models.py
	VLLM_VENV=$(VLLM_VENV) $(PY) -m pytest tests_vllm

bench: $(VENV)/.installed
	$(PY) scripts/bench_realtime.py

## Co-serving: a realtime trace over a saturating batch backlog on the contention simulator (gpu-like
## profile), policy against policy; ARGS=--quick (under 3 minutes), ARGS=--virtual (simulated time)
bench-coserve: $(VENV)/.installed
	$(PY) scripts/bench_coserve.py $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache $(JS_DIR)/node_modules
