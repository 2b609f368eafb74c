"""Pipelines as Dagster Components: `dg list defs`, `dg check yaml` and `dg scaffold defs` work on Kiln's pipelines.

Each `dg` command runs as a user runs it, in a subprocess from a project root, with a throwaway DAGSTER_HOME and
KILN_HOME. `dg check yaml` and `dg scaffold defs` run in a copy of the project (pyproject.toml and the pipelines
folder, the same .venv) so the repository's own folder is never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from kiln.spec import PIPELINE_COMPONENT_TYPE, load_spec, load_specs
from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
DG = VENV_BIN / "dg"
PIPELINES = ("breast_cancer", "fraud")
STAGES = ["raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions"]


@pytest.fixture()
def dg_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `dg` run: the project's venv active, fresh homes, no telemetry, the packaged specs."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if k != "KILN_PIPELINES_DIR"}
    return env | {"DAGSTER_HOME": str(home), "KILN_HOME": str(tmp_path / "kiln"), "VIRTUAL_ENV": str(VENV_BIN.parent),
                  "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of the dg project: pyproject.toml, the shipped pipelines, and the repository's .venv."""
    root = tmp_path / "project"
    (root / "platform_defs").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "platform_defs" / "pipelines", root / "platform_defs" / "pipelines",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".venv").symlink_to(VENV_BIN.parent)
    return root


def _dg(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DG), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _graph_of(defs: dg.Definitions) -> dict[str, set[str]]:
    graph = defs.resolve_asset_graph()
    return {
        "assets": {k.to_user_string() for k in graph.get_all_asset_keys()},
        "checks": {f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys},
        "sensors": {s.name for s in defs.sensors or []},
        "jobs": {j.name for j in defs.jobs or []},  # type: ignore[union-attr]
    }


def test_dg_list_defs_lists_every_pipeline(dg_env: dict[str, str]) -> None:
    from platform_defs.definitions import defs

    out = _dg(["list", "defs", "--json"], REPO, dg_env)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    found = {
        "assets": {a["asset_key"] for a in listed["assets"]},
        "checks": {c["key"] for c in listed["asset_checks"]},
        "sensors": {s["name"] for s in listed["sensors"]},
        "jobs": {j["name"] for j in listed["jobs"]},
    }
    assert found == _graph_of(defs)  # everything the code location defines, nothing else
    for p in PIPELINES:
        assert {f"{p}/{s}" for s in STAGES} <= found["assets"]
        assert {f"{p}/raw:schema_contract", f"{p}/validated:quality_contract", f"{p}/champion:champion_gate",
                f"{p}/endpoint:live_smoke_test"} <= found["checks"]
        assert {f"{p}_new_data", f"{p}_drift"} <= found["sensors"]
        assert {f"{p}_retrain", f"{p}_ingest"} <= found["jobs"]
        assert {a["group_name"] for a in listed["assets"] if a["asset_key"].startswith(f"{p}/")} == {p}
    assert {"storage", "mlflow", "serving"} <= {r["name"] for r in listed["resources"]}


def test_dg_list_components_shows_the_pipeline_component(dg_env: dict[str, str]) -> None:
    out = _dg(["list", "components", "--json"], REPO, dg_env)
    assert out.returncode == 0, out.stderr
    [entry] = [c for c in json.loads(out.stdout)["items"] if c["key"] == PIPELINE_COMPONENT_TYPE]
    assert entry["summary"].startswith("One Kiln ML pipeline")


def test_dagster_component_loader_agrees_with_the_code_location() -> None:
    """Dagster's own loader of the defs folder builds the same objects as `platform_defs.definitions:defs`."""
    from platform_defs.definitions import defs

    tree = dg.load_from_defs_folder(path_within_project=REPO)
    with_resources = dg.Definitions.merge(tree, dg.Definitions(resources=defs.resources))
    assert _graph_of(with_resources) == _graph_of(defs)


def _bad_payments(project: Path) -> tuple[Path, int]:
    """`payments/defs.yaml`: the fraud spec renamed, with a dtype typo; returns the file and the typo's line."""
    folder = project / "platform_defs" / "pipelines" / "payments"
    folder.mkdir()
    text = (folder.parent / "fraud" / "defs.yaml").read_text().replace("name: fraud", "name: payments")
    text = text.replace("dtype: float, min: 0, max: 50000", "dtype: flaot, min: 0, max: 50000")
    (folder / "defs.yaml").write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "dtype: flaot" in row)
    return folder / "defs.yaml", line


def test_dg_check_yaml_names_file_line_and_field(project: Path, dg_env: dict[str, str]) -> None:
    path, line = _bad_payments(project)
    bad = _dg(["check", "yaml", "platform_defs/pipelines/payments"], project, dg_env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(re.escape(f"{path}:{line}") + r" - .*attributes\.schema\.amount\.dtype 'flaot' is not one of", bad.stdout), bad.stdout

    good = _dg(["check", "yaml", "platform_defs/pipelines/fraud"], project, dg_env)
    assert good.returncode == 0, good.stdout + good.stderr
    # Kiln's loader (kiln validate, the code location) names the same file, field and line.
    with pytest.raises(ValueError, match=re.escape(f"{path}: schema.amount.dtype: 'flaot' is not one of") + r".*" + f"line {line}"):
        load_spec(path)


def test_dg_scaffold_defs_writes_a_pipeline_that_loads(project: Path, dg_env: dict[str, str]) -> None:
    from platform_defs.definitions import build_definitions

    pipelines = project / "platform_defs" / "pipelines"
    out = _dg(["scaffold", "defs", PIPELINE_COMPONENT_TYPE, "churn"], project, dg_env)
    assert out.returncode == 0, out.stdout + out.stderr
    written = pipelines / "churn" / "defs.yaml"
    assert yaml.safe_load(written.read_text())["type"] == PIPELINE_COMPONENT_TYPE
    assert _dg(["check", "yaml", "platform_defs/pipelines/churn"], project, dg_env).returncode == 0

    specs = {s.name: s for s in load_specs(pipelines)}
    assert set(specs) == {*PIPELINES, "churn"}
    assets = {k.to_user_string() for k in build_definitions([specs["churn"]]).resolve_asset_graph().get_all_asset_keys()}
    assert {f"churn/{s}" for s in STAGES} <= assets

    bad = _dg(["scaffold", "defs", PIPELINE_COMPONENT_TYPE, "Churn-2"], project, dg_env)
    assert bad.returncode != 0 and "must match" in bad.stdout + bad.stderr
    assert not (pipelines / "Churn-2").exists()  # nothing half-made is left for the loaders to trip on


def test_dg_scaffold_defs_infers_from_a_sample(project: Path, dg_env: dict[str, str], tmp_path: Path) -> None:
    sample = tmp_path / "loans.csv"
    rows = ["loan_id,amount,grade,defaulted"] + [f"L{i},{100 + i},{'abc'[i % 3]},{int(i % 7 == 0)}" for i in range(60)]
    sample.write_text("\n".join(rows) + "\n")
    out = _dg(["scaffold", "defs", PIPELINE_COMPONENT_TYPE, "loans", "--sample", str(sample), "--target", "defaulted"], project, dg_env)
    assert out.returncode == 0, out.stdout + out.stderr
    spec = load_spec(project / "platform_defs" / "pipelines" / "loans" / "defs.yaml")
    assert spec.target == "defaulted" and spec.task == "classification" and spec.key_columns == ["loan_id"]
    assert spec.schema_["grade"].allowed == ["a", "b", "c"]
