"""Self-service onboarding: a new pipeline is one component file, `<name>/defs.yaml`, in the pipelines folder.

The code location is loaded fresh in subprocesses (as `dagster dev`, the code server and CI load it), with
``KILN_PIPELINES_DIR`` pointing at a copy of the folder plus a new `payments` spec; a broken new file fails
`kiln validate` and `dagster definitions validate` with a message naming the file and the field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, free_port

STAGES = ["raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions"]
BIN = Path(sys.executable).parent

# Prints what the UI would show for the code location: asset keys with group and parents, checks, sensors, jobs.
INSPECT = """
import json
from platform_defs.definitions import defs
graph = defs.resolve_asset_graph()
print(json.dumps({
    "assets": {k.to_user_string(): {"group": graph.get(k).group_name,
                                    "parents": sorted(p.to_user_string() for p in graph.get(k).parent_keys)}
               for k in graph.get_all_asset_keys()},
    "checks": sorted([c.asset_key.to_user_string(), c.name, graph.get_check_spec(c).blocking] for c in graph.asset_check_keys),
    "sensors": sorted(s.name for s in defs.sensors),
    "jobs": sorted(j.name for j in defs.resolve_all_job_defs()),
}))
"""


def _folder_with_payments(tmp_path: Path, edit: Any = None) -> Path:
    """A copy of the shipped pipelines folder plus `payments/defs.yaml` (the fraud example under a new name)."""
    from kiln.spec import PIPELINE_COMPONENT_TYPE, spec_data

    folder = tmp_path / "pipelines"
    shutil.copytree(REPO / "platform_defs" / "pipelines", folder)
    data = spec_data(folder / "fraud" / "defs.yaml")
    data |= {"name": "payments", "description": "Payments risk, onboarded by adding this file.", "owner": "payments@example.com"}
    data["source"]["path"] = "payments"
    data["serving"]["port"] = free_port()
    if edit is not None:
        edit(data)
    (folder / "payments").mkdir()
    (folder / "payments" / "defs.yaml").write_text(yaml.safe_dump({"type": PIPELINE_COMPONENT_TYPE, "attributes": data}, sort_keys=False))
    return folder


def _run(args: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"KILN_PIPELINES_DIR": str(folder)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_new_spec_file_adds_a_whole_pipeline(tmp_path: Path) -> None:
    folder = _folder_with_payments(tmp_path)
    out = _run([sys.executable, "-c", INSPECT], folder)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])

    for pipeline in ("fraud", "payments"):  # the new pipeline arrives, the existing one stays
        for stage in STAGES:
            asset = found["assets"].get(f"{pipeline}/{stage}")
            assert asset is not None, f"{pipeline}/{stage} missing from {sorted(found['assets'])}"
            assert asset["group"] == pipeline
    parents = {s: found["assets"][f"payments/{s}"]["parents"] for s in STAGES}
    assert parents["validated"] == ["payments/raw"]
    assert parents["features"] == ["payments/validated"]
    assert parents["model"] == ["payments/features"]
    assert parents["champion"] == ["payments/features", "payments/model"]
    assert parents["bento"] == ["payments/champion"]
    assert parents["image"] == ["payments/bento"]
    assert sorted(parents["endpoint"]) == ["payments/bento", "payments/image"]
    assert parents["predictions"] == ["payments/endpoint"]
    assert not [k for k, a in found["assets"].items() if k.startswith("payments/") and any(p.startswith("fraud/") for p in a["parents"])]

    checks = {(asset, name): blocking for asset, name, blocking in found["checks"]}
    assert checks[("payments/raw", "schema_contract")] is True
    assert checks[("payments/validated", "quality_contract")] is True
    assert checks[("payments/champion", "champion_gate")] is True
    assert ("payments/endpoint", "live_smoke_test") in checks
    assert {"payments_new_data", "payments_drift"} <= set(found["sensors"])
    assert {"payments_retrain", "fraud_retrain"} <= set(found["jobs"])


def test_new_spec_passes_kiln_validate_and_dagster_validate(tmp_path: Path) -> None:
    folder = _folder_with_payments(tmp_path)
    kiln = _run([str(BIN / "kiln"), "validate"], folder)
    assert kiln.returncode == 0, kiln.stderr
    assert "ok  payments  (classification, lightgbm, 11 columns)" in kiln.stdout
    assert f"3 pipeline spec(s) valid in {folder}" in kiln.stdout  # breast_cancer, fraud, payments
    dagster = _run([str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"], folder)
    assert dagster.returncode == 0, dagster.stdout + dagster.stderr
    assert "Validation successful" in dagster.stdout + dagster.stderr


def _typo_dtype(data: dict[str, Any]) -> None:
    data["schema"]["amount"]["dtype"] = "flaot"


def _unknown_trainer_field(data: dict[str, Any]) -> None:
    data["trainer"]["parms"] = data["trainer"].pop("params")


def _target_not_in_schema(data: dict[str, Any]) -> None:
    data["target"] = "is_chargeback"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_typo_dtype, "schema.amount.dtype: 'flaot' is not one of float, int, str, bool, datetime"),
        (_unknown_trainer_field, "trainer.parms: unknown field"),
        (_target_not_in_schema, "target: 'is_chargeback' is not a schema column"),
    ],
)
def test_invalid_new_spec_fails_validation_naming_file_and_field(tmp_path: Path, edit: Any, message: str) -> None:
    folder = _folder_with_payments(tmp_path, edit)
    path = str(folder / "payments" / "defs.yaml")

    def named(output: str) -> bool:
        """The file, the field, the reason, then the line."""
        return re.search(re.escape(f"{path}: {message}") + r" \(line \d+\)", output) is not None

    kiln = _run([str(BIN / "kiln"), "validate"], folder)
    assert kiln.returncode == 1
    assert named(kiln.stderr), kiln.stderr
    assert "fraud/defs.yaml" not in kiln.stderr  # only the broken file is blamed

    dagster = _run([str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"], folder)
    assert dagster.returncode != 0
    assert named(dagster.stdout + dagster.stderr), dagster.stdout + dagster.stderr
    assert "Validation successful" not in dagster.stdout + dagster.stderr
