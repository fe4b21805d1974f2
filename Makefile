# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel of torch; GPU users install their own build first and keep it (pyproject says torch>=2.4).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-floors install protos clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/engram demo

test: $(STAMP)
	$(PY) -m pytest -q

# The generator of the committed protos/*_pb2*.py, in a venv of its own so the dev venv keeps the protobuf pip
# resolves. Its code needs grpcio>=1.71.0 and protobuf>=5.29.0: hence the floors in pyproject.toml and .ci/floors.txt.
GRPC_TOOLS_PIN ?= grpcio-tools==1.71.0
PROTOS_VENV    := .venv-protos

protos:
	test -d $(PROTOS_VENV) || $(PYTHON) -m venv $(PROTOS_VENV)
	$(PROTOS_VENV)/bin/python -m pip install -q "$(GRPC_TOOLS_PIN)"
	$(PROTOS_VENV)/bin/python -m protos.generate

# The memory-service tests under the oldest grpcio/protobuf pyproject.toml allows (pinned by .ci/floors.txt).
FLOORS_VENV  := .venv-floors
FLOORS_PY    := $(FLOORS_VENV)/bin/python
FLOORS_STAMP := $(FLOORS_VENV)/.installed
FLOOR_TESTS  ?= tests/protos tests/memory_service tests/integration/test_memory_*.py

$(FLOORS_STAMP): pyproject.toml .ci/floors.txt
	test -d $(FLOORS_VENV) || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_PY) -m pip install -q --upgrade pip
	$(FLOORS_PY) -m pip install -q "$(TORCH_PIN)"
	$(FLOORS_PY) -m pip install -q -c .ci/floors.txt -e ".[dev]"
	touch $(FLOORS_STAMP)

test-floors: $(FLOORS_STAMP)
	$(FLOORS_PY) -m pip freeze | grep -Ei '^(grpcio|protobuf)'
	$(FLOORS_PY) -m pytest -q $(FLOOR_TESTS)

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(PROTOS_VENV) build *.egg-info
