"""Profiles: which resources back the same asset code (``KILN_PROFILE=local`` or ``prod``).

Decided in one place. The local profile needs no configuration: everything lives under
``KILN_HOME`` (default ``./.kiln``). The prod profile takes every endpoint, bucket and URI from
environment variables through ``dg.EnvVar``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from kiln.settings import PROFILES, current_profile, kiln_home, local_paths  # noqa: F401  (the profile API)
from resources.mlflow import MlflowResource
from resources.serving import ServingResource
from resources.storage import JsonIOManagerFactory, KilnStorage, ParquetIOManagerFactory


def resources(profile: str | None = None) -> dict[str, Any]:
    """The resource dict of a profile; asset code is the same under both."""
    profile = profile or current_profile()
    if profile == "local":
        paths = local_paths()
        return {
            "parquet_io_manager": ParquetIOManagerFactory(base_path=str(paths["storage"])),
            "json_io_manager": JsonIOManagerFactory(base_path=str(paths["storage"])),
            "storage": KilnStorage(source_root=str(paths["sources"]), state_root=str(paths["state"])),
            "mlflow": MlflowResource(
                tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths['mlflow_db']}",
                artifact_root=paths["mlartifacts"].as_uri(),
            ),
            "serving": ServingResource(state_root=str(paths["state"]), bentoml_home=str(paths["bentoml"])),
        }
    return {
        "parquet_io_manager": ParquetIOManagerFactory(base_path=dg.EnvVar("KILN_STORAGE_PREFIX")),
        "json_io_manager": JsonIOManagerFactory(base_path=dg.EnvVar("KILN_STORAGE_PREFIX")),
        # Bentos are exported next to the asset values (same bucket and credentials) for image builds.
        "storage": KilnStorage(source_root=dg.EnvVar("KILN_SOURCE_ROOT"), state_root=dg.EnvVar("KILN_STATE_ROOT"),
                               bento_root=dg.EnvVar("KILN_STORAGE_PREFIX")),
        "mlflow": MlflowResource(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI")),
        "serving": ServingResource(state_root=dg.EnvVar("KILN_STATE_ROOT"), bentoml_home=dg.EnvVar("BENTOML_HOME")),
    }


def initialized(profile_resources: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """Resources ready for use outside a Dagster run (CLI commands): config processed, so the prod profile's
    ``dg.EnvVar`` fields hold the variables' values, not their names (inside a run Dagster does this itself)."""
    return {name: profile_resources[name].process_config_and_initialize() for name in names}


EXECUTORS = ("k8s", "multiprocess", "in_process")


def executor(profile: str) -> dg.ExecutorDefinition | None:
    """The prod profile runs each step as a Kubernetes Job; the local profile keeps Dagster's default executor.

    ``KILN_EXECUTOR=multiprocess|in_process`` runs the prod profile without a cluster (one VM, CI): each step in its
    own process, or all steps in the run worker.
    """
    import dagster as dg

    from kiln.settings import executor_choice

    choice = executor_choice(profile)
    if choice and choice not in EXECUTORS:
        raise ValueError(f"KILN_EXECUTOR: '{choice}' is not one of {', '.join(EXECUTORS)}")
    if choice == "multiprocess":
        return dg.multiprocess_executor
    if choice == "in_process":
        return dg.in_process_executor
    if choice != "k8s":
        return None
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor
