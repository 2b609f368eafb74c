"""Definitions: the asset-key contract, lazy imports, and Dagster's own validation of the code location."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg

from tests.conftest import REPO

HEAVY = ["torch", "lightgbm", "mlflow", "bentoml", "great_expectations", "polars", "pandas", "numpy", "dagster_aws", "dagster_k8s"]
STAGES = ["raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "KILN_PIPELINES_DIR"}


def test_loading_definitions_imports_no_heavy_library() -> None:
    code = "import sys, json, platform_defs.definitions; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))"
    out = subprocess.run([sys.executable, "-c", code % (HEAVY,)], cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_fraud_follows_the_asset_key_contract() -> None:
    from platform_defs.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {f"fraud/{s}" for s in STAGES} <= keys
    for stage in STAGES:
        assert graph.get(dg.AssetKey(["fraud", stage])).group_name == "fraud"
    upstream = {s: {p.path[-1] for p in graph.get(dg.AssetKey(["fraud", s])).parent_keys} for s in STAGES}
    assert upstream["validated"] == {"raw"}
    assert upstream["features"] == {"validated"}
    assert upstream["model"] == {"features"}
    assert upstream["champion"] == {"model", "features"}
    assert upstream["bento"] == {"champion"}
    assert upstream["image"] == {"bento"}
    assert upstream["endpoint"] == {"bento", "image"}
    assert upstream["predictions"] == {"endpoint"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert {("fraud/raw", "schema_contract"), ("fraud/validated", "quality_contract"),
            ("fraud/champion", "champion_gate"), ("fraud/endpoint", "live_smoke_test")} <= checks
    assert defs.resolve_job_def("fraud_retrain") is not None
    assert {s.name for s in defs.sensors} >= {"fraud_new_data", "fraud_drift"}


def test_blocking_checks_are_blocking() -> None:
    from platform_defs.definitions import defs

    graph = defs.resolve_asset_graph()
    blocking = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys if graph.get_check_spec(k).blocking}
    assert ("fraud/raw", "schema_contract") in blocking and ("fraud/validated", "quality_contract") in blocking


def test_dagster_definitions_validate() -> None:
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    out = subprocess.run([dagster, "definitions", "validate", "-w", "workspace.yaml"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_invalid_spec_fails_definitions_validate(tmp_path) -> None:
    bad = (REPO / "platform_defs/pipelines/fraud/defs.yaml").read_text().replace("dtype: float, min: 0", "dtype: flaot, min: 0")
    (tmp_path / "fraud").mkdir()
    (tmp_path / "fraud" / "defs.yaml").write_text(bad)
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    out = subprocess.run([dagster, "definitions", "validate", "-w", "workspace.yaml"], cwd=REPO,
                         env=_env() | {"KILN_PIPELINES_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"{tmp_path / 'fraud' / 'defs.yaml'}: schema.amount.dtype: 'flaot' is not one of" in out.stdout + out.stderr
