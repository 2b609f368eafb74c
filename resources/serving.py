"""Local endpoints: `bentoml serve` processes for bentos, started, health-checked, replaced and stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


class EndpointError(RuntimeError):
    """An endpoint could not be started or reached; the message says which and why."""


class ServingResource(dg.ConfigurableResource):
    """Runs endpoints as local `bentoml serve` processes (local profile) and keeps their state on disk."""

    host: str = "127.0.0.1"
    state_root: str
    bentoml_home: str

    def bentoml(self) -> Any:
        """Import bentoml bound to this profile's store (``BENTOML_HOME`` must be set before the first import)."""
        os.environ["BENTOML_HOME"] = self.bentoml_home
        import bentoml
        from bentoml._internal.configuration.containers import BentoMLContainer

        home = str(BentoMLContainer.bentoml_home.get())
        if Path(home).resolve() != Path(self.bentoml_home).resolve():
            raise EndpointError(f"bentoml was already imported with BENTOML_HOME={home}, not {self.bentoml_home}")
        return bentoml

    def folder(self, pipeline: str) -> Path:
        path = Path(self.state_root) / "endpoints" / pipeline
        path.mkdir(parents=True, exist_ok=True)
        return path

    def prediction_log_dir(self, pipeline: str) -> Path:
        path = Path(self.state_root) / "predictions" / pipeline
        path.mkdir(parents=True, exist_ok=True)
        return path

    def state(self, pipeline: str) -> dict[str, Any] | None:
        """The last recorded endpoint of a pipeline, or None."""
        path = self.folder(pipeline) / "endpoint.json"
        return json.loads(path.read_text()) if path.exists() else None

    def deploy(self, pipeline: str, bento_tag: str, model_tag: str, model_version: str, port: int) -> dict[str, Any]:
        """Serve a bento on the port, replacing the pipeline's previous server; returns the endpoint record."""
        previous = self.state(pipeline)
        url = f"http://{self.host}:{port}"
        if previous and previous.get("bento") == bento_tag and pid_alive(previous.get("pid")) and healthy(url):
            return previous | {"reused": True}
        if previous:
            stop(previous.get("pid"))
        if healthy(url):
            raise EndpointError(
                f"{pipeline}: port {port} is already served by a process Kiln did not start; free it or change serving.port"
            )
        log_path = self.folder(pipeline) / "server.log"
        env = os.environ | {
            "BENTOML_HOME": self.bentoml_home,
            "KILN_MODEL_TAG": model_tag,
            "KILN_PREDICTION_LOG": str(self.prediction_log_dir(pipeline)),
            "BENTOML_DO_NOT_TRACK": "True",
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", self.host, "--port", str(port)]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EndpointError(f"{pipeline}: bentoml serve exited with {proc.returncode}:\n{tail(log_path)}")
            if healthy(url):
                break
            time.sleep(0.5)
        else:
            stop(proc.pid)
            raise EndpointError(f"{pipeline}: {url}/readyz not ready after {READY_TIMEOUT_S:.0f}s:\n{tail(log_path)}")
        record = {
            "pipeline": pipeline,
            "url": url,
            "pid": proc.pid,
            "bento": bento_tag,
            "model_tag": model_tag,
            "model_version": model_version,
            "started_at": time.time(),
            "log": str(log_path),
            "reused": False,
        }
        (self.folder(pipeline) / "endpoint.json").write_text(json.dumps(record, indent=2))
        return record

    def shutdown(self, pipeline: str) -> bool:
        """Stop a pipeline's endpoint; True if one was running."""
        record = self.state(pipeline)
        if not record:
            return False
        was_alive = pid_alive(record.get("pid"))
        stop(record.get("pid"))
        (self.folder(pipeline) / "endpoint.json").unlink(missing_ok=True)
        return was_alive


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when the endpoint answers 200 on /readyz."""
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop(pid: int | None) -> None:
    """Stop a server's whole process group (bentoml serve forks workers), politely first."""
    if not pid_alive(pid):
        return
    assert pid is not None
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
