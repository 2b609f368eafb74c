"""Settings: every KILN_* variable is read in kiln/settings.py, with its default and a clear error."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kiln import settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kiln", "serving", "resources", "assets", "sensors", "platform_defs")


def test_profile_defaults_to_local_and_refuses_an_unknown_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_PROFILE", raising=False)
    assert settings.current_profile() == "local"
    monkeypatch.setenv("KILN_PROFILE", "staging")
    with pytest.raises(ValueError, match="KILN_PROFILE: 'staging' is not one of local, prod"):
        settings.current_profile()


def test_local_paths_live_under_kiln_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("KILN_SOURCE_ROOT", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    paths = settings.local_paths()
    assert paths["state"] == tmp_path / "state" and paths["sources"] == tmp_path / "sources"
    assert paths["dagster_home"] == tmp_path / "dagster"


def test_retries_default_by_profile_and_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_STEP_RETRIES", "")
    monkeypatch.delenv("KILN_STEP_RETRY_DELAY", raising=False)
    assert settings.step_retries("prod") == (3, 2.0) and settings.step_retries("local") == (0, 2.0)
    monkeypatch.setenv("KILN_STEP_RETRIES", "5")
    assert settings.step_retries("local")[0] == 5


def test_a_model_tag_is_required_inside_a_bento(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_MODEL_TAG", raising=False)
    with pytest.raises(RuntimeError, match="KILN_MODEL_TAG is not set"):
        settings.model_tag()


def _environment_reads(path: Path) -> list[str]:
    """``os.environ.get("KILN_…")``, ``os.environ["KILN_…"]`` and ``os.getenv("KILN_…")`` in a file."""
    found = []
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = ast.unparse(node.func)
            if name in ("os.environ.get", "os.getenv", "environ.get") and str(node.args[0].value).startswith("KILN_"):
                found.append(f"{where}:{node.lineno}: {name}({node.args[0].value!r})")
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value) == "os.environ":
            if isinstance(node.slice, ast.Constant) and str(node.slice.value).startswith("KILN_"):
                found.append(f"{where}:{node.lineno}: os.environ[{node.slice.value!r}]")
    return found


def test_kiln_variables_are_read_in_settings_only() -> None:
    reads = [r for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py")) if path != ROOT / "kiln" / "settings.py"
             for r in _environment_reads(path)]
    assert reads == []


def test_the_reader_scan_sees_a_read(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text('import os\nX = os.environ.get("KILN_SOMETHING")\nY = os.environ["KILN_OTHER"]\nos.environ["KILN_Z"] = "1"\n')
    assert _environment_reads(planted) == ["planted.py:2: os.environ.get('KILN_SOMETHING')", "planted.py:3: os.environ['KILN_OTHER']"]
