"""kiln.process.pid_alive: the one answer to "is this process alive" (router, serving resource, handoff sweep, SLOs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from kiln.process import pid_alive


def _wait_until_zombie(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            break
        time.sleep(0.02)
    raise AssertionError(f"child {pid} did not become a zombie within {timeout} s")


def test_this_process_is_alive() -> None:
    assert pid_alive(os.getpid())


def test_running_child_is_alive_and_dead_after_wait() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


def test_zombie_child_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        _wait_until_zombie(child.pid)  # exited, not yet reaped: the pid still answers os.kill(pid, 0)
        os.kill(child.pid, 0)
        assert not pid_alive(child.pid)
    finally:
        child.wait()


def test_nonexistent_and_invalid_pids_are_not_alive() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    assert not pid_alive(pid_max + 1)  # above the kernel's limit: no process can have it
    assert not pid_alive(None)
    assert not pid_alive(0)  # os.kill(0, 0) would signal our own process group and succeed
    assert not pid_alive(-1)
