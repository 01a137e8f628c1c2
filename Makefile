# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test test-fast images docker bench clean

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

## Install test dependencies, start Docker if needed, build the test images offline, run every test
test: $(VENV)/.installed docker images
	$(PY) -m pytest

docker:
	@scripts/ensure-docker.sh

images: docker
	@scripts/build-test-images.sh

bench: $(VENV)/.installed
	$(PY) scripts/bench_realtime.py

clean:
	rm -rf $(VENV) var .pytest_cache
