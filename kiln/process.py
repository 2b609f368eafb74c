"""Whether a process is alive: one answer for every part of Kiln that starts, watches or stops servers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PROC = Path("/proc")


def pid_alive(pid: int | None) -> bool:
    """True when a process with this pid exists and is not a zombie (exited, waiting for its parent to reap it).

    A process of another user counts as alive (it exists; it is just not ours to signal). ``None`` and pids below 1
    are never alive: ``os.kill(0, ...)`` and negative pids would address process groups, not a process.
    """
    if pid is None or pid < 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _state(pid) not in ("Z", "X", None)


def _state(pid: int) -> str | None:
    """The process state letter (``R``, ``S``, ``Z``...), ``None`` when the process is gone, ``""`` when unknown."""
    if PROC.joinpath("self").exists():  # Linux: /proc/<pid>/stat, "pid (comm) state ..."; comm may hold spaces and ')'
        try:
            return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return None
        except (OSError, IndexError):
            return ""
    try:  # no procfs (macOS, BSD): ask ps, which prints nothing for a pid that is gone
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()[:1] or None
