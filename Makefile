# Entry points for a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_OUT := gesco/v1/gesco_pb2.py

.PHONY: install proto test

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
