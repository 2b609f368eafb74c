"""The prod code location's `fraud_retrain` job as a reconstructable target, for runs whose steps live in their own
processes (multiprocess executor): each step process rebuilds the job here from the environment.

With ``KILN_TEST_KILL_MARKER`` set, the model step writes its pid to that file at the last act of registration (before
the version's checksum tag) and waits there to be killed; the SIGKILL fault test uses it to kill the step at the moment
that would leave a half-registered version.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import dagster as dg

from resources.mlflow import CHECKSUM_TAG, MlflowResource

KILL_MARKER_ENV = "KILN_TEST_KILL_MARKER"
PIPELINE_ENV = "KILN_TEST_PIPELINE"  # the pipeline of `pipeline_retrain` (its spec in KILN_PIPELINES_DIR)
PAUSE_S = 180.0  # bounded: a step nobody kills fails after this


class _PausingClient:
    """An MlflowClient that stops before recording a checksum: marker written, then a bounded wait to be killed."""

    def __init__(self, client: Any, marker: Path) -> None:
        self._client, self._marker = client, marker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def set_model_version_tag(self, name: str, version: str, key: str, value: Any) -> None:
        if key == CHECKSUM_TAG:
            tmp = self._marker.with_name(self._marker.name + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "model": name, "version": str(version)}))
            tmp.rename(self._marker)  # the test reads a whole marker or none
            deadline = time.monotonic() + PAUSE_S
            while time.monotonic() < deadline:
                time.sleep(0.1)
            raise RuntimeError(f"{self._marker}: waited {PAUSE_S:.0f}s at the checksum of {name} v{version}; nobody killed this step")
        self._client.set_model_version_tag(name, version, key, value)


class PausingMlflowResource(MlflowResource):
    """The prod MLflow resource whose clients pause at the checksum tag (see module docstring)."""

    marker: str

    def client(self) -> Any:
        return _PausingClient(super().client(), Path(self.marker))


def fraud_retrain() -> dg.JobDefinition:
    """`fraud_retrain` of the prod Definitions (executor from ``KILN_EXECUTOR``), pausing for the kill when asked."""
    return _retrain("fraud")


def pipeline_retrain() -> dg.JobDefinition:
    """`<p>_retrain` of the prod Definitions for the pipeline named by ``KILN_TEST_PIPELINE``."""
    return _retrain(os.environ[PIPELINE_ENV])


def _retrain(pipeline: str) -> dg.JobDefinition:
    from kiln.spec import load_specs
    from platform_defs.component import pipeline_definitions
    from platform_defs.profiles import executor, resources

    specs = [s for s in load_specs() if s.name == pipeline]
    prod = resources("prod")
    marker = os.environ.get(KILL_MARKER_ENV)
    if marker:
        prod["mlflow"] = PausingMlflowResource(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"), marker=marker)
    merged = dg.Definitions.merge(*[pipeline_definitions(s) for s in specs])
    defs = dg.Definitions.merge(merged, dg.Definitions(resources=prod, executor=executor("prod")))
    return defs.resolve_job_def(f"{pipeline}_retrain")
