"""The state store: files under ``KILN_STATE_ROOT`` that cross a process (names in :mod:`kiln.paths`).

A local folder today; writes replace whole files so a reader never sees half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def state_path(state_root: str, relative: str) -> Path:
    """A file of the state store (a local folder here; see kiln/paths.py for the names)."""
    return Path(state_root) / relative


def write_atomic(path: Any, data: str | bytes) -> None:
    """Write a whole file so that readers never see half of it: a sibling renamed over it locally, one PUT on S3."""
    payload = data.encode() if isinstance(data, str) else data
    if getattr(path, "protocol", "") in ("s3", "s3a"):  # an object store has no rename; a single PUT is atomic
        path.write_bytes(payload)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.rename(path)
