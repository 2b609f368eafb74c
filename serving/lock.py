"""The dependency lock, ``requirements.lock``: the exact versions that CI, the code-location image and every bento install.

A bento must compute features with the same polars and LightGBM as training, so its Python packages are pinned to
the lock (:func:`pinned`) instead of being resolved afresh when its image is built.

``make lock`` regenerates the lock: pip resolves pyproject.toml with every extra (``pip install --dry-run --report``)
and ``python -m serving.lock REPORT.json`` writes the result. Standard library only: this runs before anything else
is installed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

LOCK_NAME = "requirements.lock"
# A source checkout (editable install) keeps the lock at the repo root; an installed Kiln (the code-location image)
# ships a copy beside this module as package data.
LOCK_PATHS = (Path(__file__).resolve().parents[1] / LOCK_NAME, Path(__file__).resolve().with_name(LOCK_NAME))
REGENERATE = "make lock"
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


class LockError(ValueError):
    """The lock is missing, unreadable, or lacks a package that is asked for."""


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it: ``PyYAML`` and ``pyyaml``, ``universal_pathlib`` and ``universal-pathlib`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path() -> Path:
    """The lock this Kiln was installed with."""
    for path in LOCK_PATHS:
        if path.is_file():
            return path
    raise LockError(f"no {LOCK_NAME} at {' or '.join(str(p) for p in LOCK_PATHS)}: "
                    f"run `{REGENERATE}` in the Kiln checkout, or install Kiln with the lock copied into serving/ (see Dockerfile)")


def read_lock(path: Path | None = None) -> dict[str, str]:
    """``{canonical name: version}`` from a lock of ``name==version`` lines (comments and blank lines skipped)."""
    path = path or lock_path()
    locked: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise LockError(f"{path}:{number}: expected `name==version`, got {raw.strip()!r}; regenerate it with `{REGENERATE}`")
        locked[canonical(name.strip())] = version.strip()
    return locked


def pinned(requirements: list[str], lock: dict[str, str] | None = None) -> list[str]:
    """Each requirement as ``name[extras]==<locked version>`` (markers kept), in the same order.

    The range a requirement gives is replaced, not checked here: the lock was resolved from pyproject.toml's ranges.
    """
    lock = read_lock() if lock is None else lock
    out = []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if not match:
            raise LockError(f"cannot read the requirement {requirement!r}: expected `name[extras]<range>[; marker]`")
        name, extras, _, marker = match.groups()
        version = lock.get(canonical(name))
        if version is None:
            raise LockError(f"{name!r} (from {requirement!r}) is not in {LOCK_NAME}: declare it in pyproject.toml, "
                            f"then run `{REGENERATE}`")
        out.append(f"{name}{extras or ''}=={version}" + (f" {marker}" if marker else ""))
    return out


def lock_text(report: dict[str, Any]) -> str:
    """The lock file for a ``pip install --dry-run --ignore-installed --report`` of Kiln with its extras.

    Kiln itself is left out, and so are local version labels (``2.13.0+cpu`` is locked as ``2.13.0``): the CPU and
    CUDA builds of torch are the same release, and the label names the index, not the code.
    """
    environment = report.get("environment", {})
    pins = {}
    for item in report.get("install", []):
        metadata = item["metadata"]
        if canonical(metadata["name"]) == "kiln":
            continue
        pins[canonical(metadata["name"])] = metadata["version"].split("+", 1)[0]
    header = [
        "# The exact versions CI, `make install`, the code-location image (Dockerfile) and every bento install.",
        "# Resolved by pip from pyproject.toml with all extras (`.[dev,torch]`) for CPython "
        f"{environment.get('python_full_version', '?')} on {environment.get('sys_platform', '?')} "
        f"{environment.get('platform_machine', '?')}.",
        f"# Do not edit: change pyproject.toml, then regenerate with `{REGENERATE}` (it upgrades every package).",
        "# Install with it as constraints: pip install -c requirements.lock -e \".[dev,torch]\"",
    ]
    return "\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def main(argv: list[str]) -> int:
    """``python -m serving.lock REPORT.json``: print the lock for a pip install report."""
    if len(argv) != 1:
        print("usage: python -m serving.lock REPORT.json  (a `pip install --dry-run --ignore-installed --report` of Kiln)",
              file=sys.stderr)
        return 2
    sys.stdout.write(lock_text(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
