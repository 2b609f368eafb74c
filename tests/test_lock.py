"""requirements.lock: every declared dependency is locked at a version its range allows, CI, the venv and the
code-location image install with it, and bentos pin the versions training ran with."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from serving.lock import LOCK_NAME, LockError, canonical, lock_text, pinned, read_lock
from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = read_lock(REPO / LOCK_NAME)


def _declared() -> dict[str, list[Requirement]]:
    """pyproject's requirements by group: ``dependencies`` and each extra."""
    project = PYPROJECT["project"]
    groups = {"dependencies": project["dependencies"]} | project["optional-dependencies"]
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def _public(version: str) -> str:
    return Version(version).public


def test_every_declared_dependency_is_locked_at_a_version_its_range_allows() -> None:
    assert {"dependencies", "dev", "torch"} <= _declared().keys()
    for group, requirements in _declared().items():
        for req in requirements:
            if req.marker is not None and not req.marker.evaluate({"extra": group}):
                continue
            name = canonical(req.name)
            assert name in LOCK, f"{req} ({group}) is not in {LOCK_NAME}: run `make lock`"
            assert req.specifier.contains(LOCK[name], prereleases=True), \
                f"{LOCK_NAME} has {name}=={LOCK[name]}, outside {req} ({group}): run `make lock`"


def test_torch_is_an_exact_extra_not_a_core_dependency() -> None:
    declared = _declared()
    assert not any(canonical(r.name) == "torch" for r in declared["dependencies"] + declared["dev"])
    assert [str(r) for r in declared["torch"]] == ["torch==2.13.0"]  # exact: a looser pin pulls the CUDA wheels
    assert LOCK["torch"] == "2.13.0"  # the lock names the release, not the CPU/CUDA build (+cpu)


def test_this_venv_has_the_locked_versions() -> None:
    """The venv tests run in was installed from the lock (`make install`), so what passes here is what the lock pins."""
    for name in ("polars", "lightgbm", "numpy", "pyarrow", "pydantic", "mlflow", "bentoml", "dagster", "torch"):
        assert _public(importlib.metadata.version(name)) == LOCK[name], f"{name}: venv differs from {LOCK_NAME}; run `make install`"


def test_pinned_pins_to_the_installed_versions_keeping_extras_markers_and_order() -> None:
    requirements = ["polars>=1", "lightgbm>=4,<5", "PyYAML>=6", "psycopg[binary]>=3.1,<4", "numpy>=1.26; python_version >= '3.11'"]
    assert pinned(requirements) == [
        f"polars=={importlib.metadata.version('polars')}",
        f"lightgbm=={importlib.metadata.version('lightgbm')}",
        f"PyYAML=={importlib.metadata.version('pyyaml')}",
        f"psycopg[binary]=={importlib.metadata.version('psycopg')}",
        f"numpy=={importlib.metadata.version('numpy')} ; python_version >= '3.11'",
    ]


def test_pinned_names_a_package_missing_from_the_lock() -> None:
    with pytest.raises(LockError, match=r"'surely-not-a-kiln-dependency'.*pyproject\.toml.*make lock"):
        pinned(["polars>=1", "surely-not-a-kiln-dependency>=1"])


def test_bentos_pin_every_package_to_the_lock() -> None:
    """The endpoint's image installs exactly what training ran with (CPU LightGBM bento and torch bento alike)."""
    from kiln.spec import load_specs
    from serving.images import build_options

    specs = {spec.trainer.kind: spec for spec in load_specs()}
    assert {"lightgbm", "torch"} <= specs.keys()
    for kind, spec in specs.items():
        packages = build_options(spec)["python"]["packages"]
        assert isinstance(packages, list)
        for requirement in packages:
            req = Requirement(requirement)
            assert str(req.specifier) == f"=={LOCK[canonical(req.name)]}", f"{kind} bento: {requirement} is not pinned to {LOCK_NAME}"
        names = {canonical(Requirement(r).name) for r in packages}
        assert {"polars", "pyarrow", "numpy"} <= names  # the feature code's libraries, whatever the model
        assert kind.replace("sklearn", "scikit-learn") in names  # and the model's own library


def test_serving_ranges_allow_the_locked_versions() -> None:
    """The ranges the serving runtime and each trainer ask for hold the locked version (pinned() replaces them by it)."""
    from kiln.spec import load_specs
    from kiln.trainers import trainer_class
    from serving.images import RUNTIME_PACKAGES, TORCH_REQUIREMENT

    requirements = [*RUNTIME_PACKAGES, TORCH_REQUIREMENT]
    for spec in load_specs():
        requirements += trainer_class(spec.trainer.kind).serving_packages(spec)
    for requirement in requirements:
        req = Requirement(requirement)
        assert req.specifier.contains(LOCK[canonical(req.name)]), f"{requirement} excludes the locked {LOCK[canonical(req.name)]}"


def test_lock_text_from_a_pip_report() -> None:
    report = {
        "environment": {"python_full_version": "3.11.7", "sys_platform": "linux", "platform_machine": "x86_64"},
        "install": [{"metadata": {"name": n, "version": v}} for n, v in
                    [("torch", "2.13.0+cpu"), ("PyYAML", "6.0.2"), ("kiln", "0.1.0"), ("Universal_Pathlib", "0.3.1")]],
    }
    text = lock_text(report)
    assert [line for line in text.splitlines() if not line.startswith("#")] == \
        ["pyyaml==6.0.2", "torch==2.13.0", "universal-pathlib==0.3.1"]
    assert "make lock" in text and "3.11.7 on linux x86_64" in text


def test_the_committed_lock_is_well_formed(tmp_path: Path) -> None:
    lines = [line for line in (REPO / LOCK_NAME).read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(LOCK) > 100  # one line per package, none twice
    names = [line.split("==")[0] for line in lines]
    assert names == sorted(names)
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9-]*==[0-9][0-9A-Za-z.!]*", line) for line in lines), "names canonical, no +local labels"
    assert "kiln" not in LOCK
    bad = tmp_path / LOCK_NAME
    bad.write_text("# a hand-written line\npolars>=1\n")
    with pytest.raises(LockError, match=r"requirements\.lock:2: expected `name==version`.*make lock"):
        read_lock(bad)


def _recipe(makefile: str, target: str) -> str:
    match = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert match, f"no {target} rule in the Makefile"
    return match.group(1) + "\n" + match.group(2)


def test_makefile_and_ci_install_with_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK := requirements\.lock$", makefile, re.M)
    extras = re.search(r"^EXTRAS := (.*)$", makefile, re.M)
    assert extras and set(extras.group(1).split(",")) == {"dev", "torch"}  # make demo / make test have torch
    stamp = _recipe(makefile, "$(STAMP)")
    prerequisites = stamp.splitlines()[0].split()
    assert "pyproject.toml" in prerequisites and "$(LOCK)" in prerequisites  # a new lock reinstalls
    assert re.search(r'pip install -q -c \$\(LOCK\) -e "\.\[\$\(EXTRAS\)\]"', stamp)
    assert "pip check" in stamp
    for target in ("demo", "lint", "typecheck"):
        assert "$(STAMP)" in _recipe(makefile, target).splitlines()[0]
    assert "serving.lock" in _recipe(makefile, "lock") and "--dry-run --ignore-installed --report" in _recipe(makefile, "lock")
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and "pip install" not in ci  # CI installs through the Makefile's lock
    assert re.search(r"^test: .*lint", makefile, re.M)


def test_dockerfile_installs_with_the_lock_and_ships_it() -> None:
    dockerfile = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    steps = [s.strip() for line in installs for s in line.split("&&") if "pip install" in s]
    dependency_installs = [s for s in steps if "--no-deps ." not in s]
    assert len(dependency_installs) >= 2 and all("-c requirements.lock" in s for s in dependency_installs), steps
    assert "COPY pyproject.toml requirements.lock ./" in dockerfile
    assert "cp requirements.lock serving/" in dockerfile
    assert "requirements.lock" in PYPROJECT["tool"]["setuptools"]["package-data"]["serving"]


def test_an_installed_kiln_pins_from_the_lock_it_ships(tmp_path: Path) -> None:
    """As the image does: copy the lock into serving/, build and unpack the wheel, read the lock from there alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", LOCK_NAME):
        shutil.copy2(REPO / name, src / name)
    for package in ("kiln", "platform_defs", "assets", "resources", "sensors", "serving"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(src / LOCK_NAME, src / "serving" / LOCK_NAME)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
                   cwd=src, check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("kiln-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "serving" / LOCK_NAME).is_file()
    # -I -S: no site-packages, so no editable Kiln; serving.lock needs only the standard library.
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); from serving.lock import lock_path, pinned; "
            "print(lock_path()); print(*pinned(['polars>=1']))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60)
    where, pins = out.stdout.splitlines()
    assert Path(where) == site / "serving" / LOCK_NAME
    assert pins == f"polars=={LOCK['polars']}"
