"""Profiles outside a Dagster run: the CLI must see the prod profile's environment values, not the variables' names."""

from __future__ import annotations

import pytest


def test_initialized_resolves_prod_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.profiles import initialized, resources

    values = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999",
        "KILN_STATE_ROOT": "/srv/kiln/state",
        "KILN_SOURCE_ROOT": "s3://kiln-test/sources",
        "KILN_STORAGE_PREFIX": "s3://kiln-test/storage",  # also where bentos are exported
        "BENTOML_HOME": "/srv/kiln/bentoml",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    raw = resources("prod")
    assert raw["mlflow"].tracking_uri != values["MLFLOW_TRACKING_URI"]  # the bug this guards against: the name, not the value
    ready = initialized(raw, "mlflow", "serving", "storage")
    assert ready["mlflow"].tracking_uri == "http://127.0.0.1:5999"
    assert ready["serving"].state_root == "/srv/kiln/state"
    assert ready["serving"].bentoml_home == "/srv/kiln/bentoml"
    assert ready["storage"].source_root == "s3://kiln-test/sources"
    assert ready["storage"].bento_root == "s3://kiln-test/storage"


def test_initialized_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import DagsterInvalidConfigError

    from platform_defs.profiles import initialized, resources

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(DagsterInvalidConfigError, match="MLFLOW_TRACKING_URI"):
        initialized(resources("prod"), "mlflow")
