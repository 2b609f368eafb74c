"""Whether a process is alive, which processes serve an endpoint, and stopping a server's process group: one answer for
every part of Kiln (and its tests and benchmarks) that starts, watches, measures or stops servers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def recorded_processes(records: Iterable[Any], port: int | None = None) -> list[Any]:
    """The processes of an endpoint (``psutil.Process`` objects): every pid in its records (any ``pid``/``*_pid`` key,
    nested ones included: an endpoint record, a router config), every process listening on ``port``, and all their
    descendants (BentoML's arbiter and workers). Gone processes are left out."""
    import psutil

    pids: set[int] = set()

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if (key == "pid" or str(key).endswith("_pid")) and isinstance(item, int) and item > 0:
                    pids.add(item)
                else:
                    collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for record in records:
        collect(record)
    if port is not None:
        for proc in psutil.process_iter():
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in proc.net_connections("tcp")):
                    pids.add(proc.pid)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
    found: dict[int, Any] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def rss_bytes(processes: Iterable[Any]) -> int:
    """The summed resident memory of ``psutil.Process`` objects (a process gone meanwhile counts 0)."""
    import psutil

    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def stop_group(pid: int | None, timeout_s: float = 30.0) -> None:
    """Stop a server's whole process group (started with ``start_new_session``; `bentoml serve` forks workers): SIGTERM,
    up to ``timeout_s`` to exit, then SIGKILL; a child of this process is reaped, so it does not linger as a zombie."""
    stop_groups([pid], timeout_s)


def stop_groups(pids: Iterable[int | None], timeout_s: float = 30.0) -> None:
    """:func:`stop_group` for several servers at once: all are signalled first, then share one ``timeout_s``."""
    signalled = []
    for pid in pids:
        if not pid or pid < 1:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):  # no such group, or not ours to stop
            _reap(pid)
            continue
        signalled.append(pid)
    deadline = time.monotonic() + timeout_s
    for pid in signalled:
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.2)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _reap(pid, wait_s=5.0)
        else:
            _reap(pid)


def _reap(pid: int, wait_s: float = 0.0) -> None:
    """Collect the exit status of a server this process started (within ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() >= deadline:
                return
        except ChildProcessError:  # not our child (its own parent reaps it) or already collected
            return
        time.sleep(0.05)
