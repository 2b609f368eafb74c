"""Test session set-up: every test run gets its own KILN_HOME, set before bentoml or mlflow is imported."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="kiln-test-"))
os.environ["KILN_HOME"] = str(SESSION_HOME)
os.environ["BENTOML_HOME"] = str(SESSION_HOME / "bentoml")
os.environ["DAGSTER_HOME"] = str(SESSION_HOME / "dagster")
os.environ.pop("KILN_PIPELINES_DIR", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
# Endpoints started by tests flush their prediction log often; tests that POST then observe still wait for the rows to be
# listed (tests/results.py: wait_for_logged_rows), never for a fixed time.
os.environ["KILN_PREDICTION_LOG_FLUSH_SECONDS"] = "0.5"
(SESSION_HOME / "dagster").mkdir(parents=True, exist_ok=True)

REPO = Path(__file__).resolve().parent.parent
FRAUD_SPEC = REPO / "platform_defs" / "pipelines" / "fraud" / "defs.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def kiln_home() -> Path:
    return SESSION_HOME
