"""Profiles: which resources back the same asset code (``KILN_PROFILE=local`` or ``prod``).

Decided in one place. The local profile needs no configuration: everything lives under
``KILN_HOME`` (default ``./.kiln``). The prod profile takes every endpoint, bucket and URI from
environment variables through ``dg.EnvVar``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from resources.mlflow import MlflowResource
from resources.serving import ServingResource
from resources.storage import JsonIOManagerFactory, KilnStorage, ParquetIOManagerFactory

PROFILES = ("local", "prod")


def current_profile() -> str:
    """``KILN_PROFILE``, default ``local``."""
    profile = os.environ.get("KILN_PROFILE", "local")
    if profile not in PROFILES:
        raise ValueError(f"KILN_PROFILE: '{profile}' is not one of {', '.join(PROFILES)}")
    return profile


def kiln_home() -> Path:
    """Root of all local state: ``KILN_HOME`` or ``.kiln`` in the current folder."""
    return Path(os.environ.get("KILN_HOME") or Path.cwd() / ".kiln").resolve()


def local_paths(home: Path | None = None) -> dict[str, Path]:
    """Every folder and file the local profile uses."""
    home = home or kiln_home()
    return {
        "home": home,
        "dagster_home": Path(os.environ.get("DAGSTER_HOME") or home / "dagster"),
        "sources": Path(os.environ.get("KILN_SOURCE_ROOT") or home / "sources"),
        "storage": home / "storage",
        "state": home / "state",
        "mlflow_db": home / "mlflow.db",
        "mlartifacts": home / "mlartifacts",
        "bentoml": home / "bentoml",
    }


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
