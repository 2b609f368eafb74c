# The README's two commands: `make demo` (whole lifecycle on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions of every dependency (CI, this venv, the code-location image, bentos); `make lock` regenerates it.
LOCK := requirements.lock
EXTRAS := dev,torch

.PHONY: demo test lint typecheck install ui clean chromium containers lock

# The lock is a constraints file: pip installs exactly its versions of whatever pyproject.toml asks for.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip check
	$(MAKE) chromium
	$(MAKE) containers
	touch $(STAMP)

# Re-resolve pyproject.toml with all extras to the newest versions its ranges allow and rewrite the lock
# (pip's dry-run report, nothing installed); then `make install` brings the venv to it.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report $(VENV)/lock-report.json -e ".[$(EXTRAS)]"
	$(BIN)/python -m serving.lock $(VENV)/lock-report.json > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The browser the UI tests drive (tests/e2e/test_ui_browser.py): Debian's chromium, non-interactive, sudo only when not root.
chromium:
	command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# The serving-image tools (`<p>/image`, KILN_ENDPOINT_TARGET=container, tests/integration/test_serving_image.py): Debian's
# buildah builds, podman + runc run, mmdebstrap makes the base image; installed as chromium is (runc lives in /usr/sbin).
CONTAINER_TOOLS := podman buildah runc mmdebstrap
containers:
	missing=$$(for t in $(CONTAINER_TOOLS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $$t >/dev/null || echo $$t; done); \
	[ -z "$$missing" ] || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CONTAINER_TOOLS); }

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln demo

# Workflows and Dockerfile are linted offline; actionlint runs shellcheck (from the venv) on every `run:` script.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/kiln validate
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/actionlint -no-color .github/workflows/*.yml
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.kiln/dagster} KILN_HOME=$${KILN_HOME:-$(CURDIR)/.kiln} $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1

clean:
	rm -rf .kiln
