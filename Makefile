# The README's two commands: `make demo` (whole lifecycle on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/kiln validate

test: lint
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.kiln/dagster} KILN_HOME=$${KILN_HOME:-$(CURDIR)/.kiln} $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1

clean:
	rm -rf .kiln
