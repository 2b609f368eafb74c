"""The state store: files under ``KILN_STATE_ROOT`` that cross a process (names in :mod:`kiln.paths`).

A local folder today; writes replace whole files so a reader never sees half of one.
"""

from __future__ import annotations

from pathlib import Path


def state_path(state_root: str, relative: str) -> Path:
    """A file of the state store (a local folder here; see kiln/paths.py for the names)."""
    return Path(state_root) / relative


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file so that readers never see half of it (write a sibling, then rename over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)
