"""The code-location image's contract, checked without a Docker engine: the Dockerfile's own CMD serves
platform_defs.definitions over gRPC and its own HEALTHCHECK command sees it healthy; the build installs the
dependencies (CPU torch) before the code, and the image runs as a non-root user."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.conftest import REPO, free_port

DOCKERFILE = (REPO / "Dockerfile").read_text()
BIN = Path(sys.executable).parent


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def _runtime_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _on(argv: list[str], port: int) -> list[str]:
    """The image's command, bound to 127.0.0.1 and a free port instead of 0.0.0.0:4000."""
    out = [str(port) if a == "4000" else a for a in argv]
    return ["127.0.0.1" if a == "0.0.0.0" else a for a in out]


def test_build_installs_dependencies_before_code_and_runs_non_root() -> None:
    steps = _instructions()
    ops = [(op, args) for op, args in steps]
    copy_pyproject = next(i for i, (op, a) in enumerate(ops) if op == "COPY" and a.startswith("pyproject.toml"))
    install_deps = next(i for i, (op, a) in enumerate(ops) if op == "RUN" and "-r requirements.txt" in a)
    copy_code = next(i for i, (op, a) in enumerate(ops) if op == "COPY" and a.startswith("platform_defs"))
    assert copy_pyproject < install_deps < copy_code  # a code or spec change reuses the dependency layer
    assert "requirements.lock" in ops[copy_pyproject][1].split()  # the dependency layer is keyed by the lock too
    pip_steps = [s.strip() for s in ops[install_deps][1].split("&&") if "pip install" in s]
    torch_step = next(s for s in pip_steps if "-r torch.txt" in s)
    assert '--index-url "${TORCH_INDEX}"' in torch_step and "--no-deps" in torch_step  # torch's deps come locked from PyPI
    assert all("-c requirements.lock" in s for s in pip_steps), pip_steps  # exactly the versions CI tested
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in ops  # CPU torch unless asked otherwise
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE, re.M)
    runtime = _runtime_stage()
    user = [a for op, a in runtime if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    # No compiler or build tool in the runtime stage: it only copies the venv built in the first stage.
    assert not any(op == "RUN" and re.search(r"\b(gcc|g\+\+|build-essential|make)\b", a) for op, a in runtime)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime


def test_build_copies_every_kiln_package_before_installing_the_code() -> None:
    """A package the wheel declares but the build context lacks would fail only at import time in the cluster."""
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    ops = _instructions()
    install_code = next(i for i, (op, a) in enumerate(ops) if op == "RUN" and "pip install --no-deps ." in a)
    copied = {a.split()[0] for op, a in ops[:install_code] if op == "COPY"}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


def test_image_command_serves_the_code_location_and_passes_its_healthcheck(tmp_path: Path) -> None:
    runtime = _runtime_stage()
    cmd = json.loads(next(a for op, a in reversed(runtime) if op == "CMD"))
    health = json.loads(next(a for op, a in runtime if op == "HEALTHCHECK").split(" CMD ", 1)[1])
    assert cmd[:3] == ["dagster", "code-server", "start"] and cmd[-2:] == ["-m", "platform_defs.definitions"]
    env_line = " ".join(a for op, a in runtime if op == "ENV")
    profile = re.search(r"KILN_PROFILE=(\w+)", env_line)
    assert profile is not None and profile.group(1) == "prod"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KILN_PIPELINES_DIR"} | {
        "KILN_PROFILE": profile.group(1), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DAGSTER_HOME": str(tmp_path)}
    log = (tmp_path / "code-server.log").open("w")
    server = subprocess.Popen(_on(cmd, port), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        check = None
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "code-server.log").read_text()
            check = subprocess.run(_on(health, port), env=env, capture_output=True, text=True, timeout=30)
            if check.returncode == 0:
                break
            time.sleep(1)
        assert check is not None and check.returncode == 0, (tmp_path / "code-server.log").read_text()
        assert "gRPC connection successful" in check.stdout + check.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
    # With the server gone the same probe fails: it is a real check, not a constant.
    gone = subprocess.run(_on(health, port), env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0
