"""Local endpoints: a router on the public port (serving/router.py) in front of `bentoml serve` backends,
rolled without downtime, with canary/shadow challengers; started, health-checked, replaced and stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg

from kiln import paths, settings
from kiln.process import pid_alive

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LOCAL_FLUSH_SECONDS = "2"  # the local profile's prediction-log flush interval (prod: the setting's default)


class EndpointError(RuntimeError):
    """An endpoint could not be started or reached; the message says which and why."""


class ServingResource(dg.ConfigurableResource):
    """Runs endpoints as local `bentoml serve` processes (local profile) and keeps their state on disk."""

    host: str = "127.0.0.1"
    state_root: str
    bentoml_home: str
    # Where the local processes' bookkeeping lives (endpoint record, router config, server logs, pids): always a local
    # folder, as the processes it names run on this machine. Empty: the state root when it is a folder, else
    # ``<KILN_HOME>/serving`` (an ``s3://`` state root holds the shared state, never pids or sockets).
    local_root: str = ""

    def bentoml(self) -> Any:
        """Import bentoml bound to this profile's store.

        BentoML reads ``BENTOML_HOME`` once per process, when it first opens its store; so once bentoml is imported,
        ``BENTOML_HOME`` must already name this store, else models and bentos would silently go to another one."""
        current = os.environ.get("BENTOML_HOME")
        if "bentoml" in sys.modules and (current is None or Path(current).resolve() != Path(self.bentoml_home).resolve()):
            raise EndpointError(
                f"bentoml was already imported with BENTOML_HOME={current or '~/bentoml (unset)'}, not {self.bentoml_home}: "
                "set BENTOML_HOME before anything imports bentoml, or use one BentoML store per process"
            )
        os.environ["BENTOML_HOME"] = self.bentoml_home
        import bentoml

        return bentoml

    def bookkeeping_root(self) -> Path:
        """The local folder above ``endpoints/<p>`` (see ``local_root``)."""
        if self.local_root:
            return Path(self.local_root)
        if "://" in self.state_root:
            return settings.kiln_home() / "serving"
        return Path(self.state_root)

    def folder(self, pipeline: str) -> Path:
        """The local bookkeeping folder of a pipeline's endpoint processes (created on first use)."""
        path = self.bookkeeping_root() / paths.ENDPOINTS / pipeline
        path.mkdir(parents=True, exist_ok=True)
        return path

    def prediction_log_env(self, pipeline: str) -> dict[str, str]:
        """What a backend needs to ship its prediction log (:mod:`serving.predlog`) to ``<state_root>/predictions/<p>/``:
        the state root, a spill folder per pipeline on local disk (each worker takes its own folder in it) and, for the
        local profile, a short flush interval so new rows reach `<p>_prediction_log` within seconds (the environment's
        ``KILN_PREDICTION_LOG_FLUSH_SECONDS`` / ``KILN_PREDICTION_LOG_SPILL_DIR`` win)."""
        if "://" in self.state_root:
            spill = Path(tempfile.gettempdir()) / "kiln-predlog" / pipeline
        else:
            spill = self.folder(pipeline) / "predlog-spill"
        return {
            "KILN_PREDICTION_LOG_ROOT": self.state_root,
            "KILN_PREDICTION_LOG_SPILL_DIR": settings.env("KILN_PREDICTION_LOG_SPILL_DIR", str(spill)),
            "KILN_PREDICTION_LOG_FLUSH_SECONDS": settings.env("KILN_PREDICTION_LOG_FLUSH_SECONDS", LOCAL_FLUSH_SECONDS),
        }

    def state(self, pipeline: str) -> dict[str, Any] | None:
        """The last recorded endpoint of a pipeline, or None."""
        path = self.folder(pipeline) / "endpoint.json"
        return json.loads(path.read_text()) if path.exists() else None

    def deploy(self, pipeline: str, bento_tag: str, model_tag: str, model_version: str, port: int) -> dict[str, Any]:
        """Roll the pipeline's endpoint to a bento without downtime; returns the endpoint record.

        The router (:mod:`serving.router`) owns the public port for good. A new `bentoml serve` starts on a free
        internal port; once its ``/readyz`` answers, the router switches to it, waits for the old backend's
        in-flight requests to drain, and only then is the old backend stopped.
        """
        previous = self.state(pipeline)
        url = f"http://{self.host}:{port}"
        config = self.router_config(pipeline)
        champion = config.get("champion") or {}
        router_up = bool(previous and pid_alive(previous.get("router_pid")) and previous.get("url") == url)
        if (router_up and previous and previous.get("bento") == bento_tag and pid_alive(champion.get("pid"))
                and champion.get("bento") == bento_tag and healthy(url)):
            return previous | {"reused": True}
        if previous and not previous.get("router_pid"):
            stop(previous.get("pid"))  # an endpoint recorded before the router existed: a bare `bentoml serve`
        if not router_up:
            if previous:
                stop(previous.get("router_pid"))
            if port_in_use(self.host, port):
                raise EndpointError(
                    f"{pipeline}: port {port} is already served by a process Kiln did not start; free it or change serving.port"
                )
        backend = self.start_backend(pipeline, bento_tag, model_tag, model_version)
        old = [u for u in (config.get("champion"), config.get("challenger")) if u]
        config.update(champion=backend, challenger=None, mode="none")
        try:
            if router_up:
                self.apply_router_config(pipeline, config)
                router_pid = previous["router_pid"] if previous else None
            else:
                self.write_router_config(pipeline, config)
                router_pid = self.start_router(pipeline, port)
        except BaseException:
            stop_backend(backend)
            raise
        for upstream in old:
            if upstream.get("pid") != backend["pid"]:
                self.drain(pipeline, upstream["url"])
                stop_backend(upstream)
        record = {
            "pipeline": pipeline,
            "url": url,
            "pid": router_pid,
            "router_pid": router_pid,
            "backend_pid": backend["pid"],
            "backend_url": backend["url"],
            "backend_lane_url": backend.get("lane_url"),
            "bento": bento_tag,
            "model_tag": model_tag,
            "model_version": model_version,
            "started_at": time.time(),
            "log": backend["log"],
            "router_log": str(self.folder(pipeline) / "router.log"),
            "reused": False,
        }
        self._write_record(pipeline, record)
        return record

    # --- backends and the router ---------------------------------------------------------------------------
    def served_spec(self, model_tag: str) -> Any:
        """The pipeline spec stored with a bento model (what the server will validate and serve with)."""
        from kiln.spec import PipelineSpec

        return PipelineSpec.from_json(self.bentoml().models.get(model_tag).info.metadata["kiln_spec"])

    def start_backend(self, pipeline: str, bento_tag: str, model_tag: str, model_version: str) -> dict[str, Any]:
        """Start `bentoml serve` for a bento on a free internal port and wait until it is ready."""
        spec = self.served_spec(model_tag)
        workers = spec.serving.workers or os.cpu_count() or 1
        port = free_port(self.host)
        lane_port = free_port(self.host)
        url = f"http://{self.host}:{port}"
        log_path = self.folder(pipeline) / f"server-{port}.log"
        # Where the workers take client connections from the router (serving.handoff): a short path (AF_UNIX limit).
        handoff_base = "/tmp" if len(tempfile.gettempdir()) > 60 else tempfile.gettempdir()
        sweep_handoff_dirs(handoff_base)
        handoff_dir = tempfile.mkdtemp(prefix=HANDOFF_PREFIX, dir=handoff_base)
        env = os.environ | {
            "KILN_LANE_PORT": str(lane_port),  # the router's /predict lane into the workers (serving.service)
            "KILN_HANDOFF_DIR": handoff_dir,
            "KILN_LANE_HOST": self.host,
            "BENTOML_HOME": self.bentoml_home,
            "KILN_MODEL_TAG": model_tag,
            **self.prediction_log_env(pipeline),
            "KILN_WORKERS": str(workers),
            "KILN_ACCESS_LOG": "1" if spec.serving.access_log else "0",
            "BENTOML_DO_NOT_TRACK": "True",
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", self.host, "--port", str(port)]
        try:
            with log_path.open("ab") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready(pipeline, proc, url, log_path)
        except BaseException:
            remove_handoff_dir(handoff_dir)
            raise
        # workers and max_batch_rows size the router's coalescing of /predict requests (serving.router.Coalescer)
        return {"url": url, "lane_url": f"http://{self.host}:{lane_port}", "pid": proc.pid, "port": port, "version": model_version,
                "bento": bento_tag, "model_tag": model_tag, "log": str(log_path), "workers": workers,
                "max_batch_rows": spec.serving.max_batch_rows, "handoff_dir": handoff_dir}

    def _wait_ready(self, pipeline: str, proc: subprocess.Popen[bytes], url: str, log_path: Path, path: str = "/readyz") -> None:
        what = "the router" if "serving.router" in proc.args else "bentoml serve"  # type: ignore[operator]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EndpointError(f"{pipeline}: {what} exited with {proc.returncode}:\n{tail(log_path)}")
            if healthy(url, path=path):
                return
            time.sleep(0.3)
        stop(proc.pid)
        raise EndpointError(f"{pipeline}: {url}{path} not ready after {READY_TIMEOUT_S:.0f}s:\n{tail(log_path)}")

    def start_router(self, pipeline: str, port: int) -> int:
        """Start the pipeline's router on the public port (its config must be written) and wait until it serves."""
        log_path = self.folder(pipeline) / "router.log"
        cmd = [sys.executable, "-m", "serving.router", "--config", str(self.router_config_path(pipeline)),
               "--host", self.host, "--port", str(port)]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(pipeline, proc, f"http://{self.host}:{port}", log_path)
        return proc.pid

    def router_config_path(self, pipeline: str) -> Path:
        return self.folder(pipeline) / "router.json"

    def router_config(self, pipeline: str) -> dict[str, Any]:
        """The router's upstreams and release settings (a fresh one with a new admin token if none exists)."""
        import secrets

        path = self.router_config_path(pipeline)
        if path.exists():
            return json.loads(path.read_text())
        return {"pipeline": pipeline, "admin_token": secrets.token_hex(16), "champion": None, "challenger": None, "mode": "none",
                "share": 0.0, "key_column": None, "arm_log": str(self.folder(pipeline) / "arms.jsonl")}

    def write_router_config(self, pipeline: str, config: dict[str, Any]) -> None:
        path = self.router_config_path(pipeline)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    def router_call(self, pipeline: str, path: str, method: str = "GET") -> dict[str, Any]:
        """Call the router's loopback admin API (``/_kiln/state``, ``/_kiln/reload``, ``/_kiln/flush``)."""
        import httpx

        record = self.state(pipeline)
        if not record or not record.get("router_pid"):
            raise EndpointError(f"{pipeline}: no router is running; deploy the endpoint first")
        token = self.router_config(pipeline)["admin_token"]
        response = httpx.request(method, f"{record['url']}{path}", headers={"X-Kiln-Admin": token}, timeout=30)
        if response.status_code != 200:
            raise EndpointError(f"{pipeline}: router {path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def apply_router_config(self, pipeline: str, config: dict[str, Any]) -> dict[str, Any]:
        """Write the config and make the running router switch to it (answers once it has)."""
        self.write_router_config(pipeline, config)
        return self.router_call(pipeline, "/_kiln/reload", "POST")

    def drain(self, pipeline: str, upstream_url: str, timeout: float = 30.0) -> None:
        """Wait until the router has no request in flight to an upstream it no longer routes to."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.router_call(pipeline, "/_kiln/state").get("in_flight", {}).get(upstream_url):
                return
            time.sleep(0.05)

    def _write_record(self, pipeline: str, record: dict[str, Any]) -> None:
        (self.folder(pipeline) / "endpoint.json").write_text(json.dumps(record, indent=2))

    # --- canary and shadow releases --------------------------------------------------------------------------
    def deploy_challenger(self, pipeline: str, bento_tag: str, model_tag: str, model_version: str,
                          mode: str | None = None, share: float | None = None) -> dict[str, Any]:
        """Serve a challenger next to the champion: ``canary`` (a stable share of traffic) or ``shadow`` (mirrored, never
        served). Mode and share default to the spec's ``serving.release``."""
        record = self.state(pipeline)
        if not record or not record.get("router_pid") or not pid_alive(record["router_pid"]):
            raise EndpointError(f"{pipeline}: deploy a champion before a challenger")
        release = self.served_spec(model_tag).serving.release
        mode = mode or release.mode
        if mode not in ("canary", "shadow"):
            raise EndpointError(f"{pipeline}: release mode must be canary or shadow, not {mode!r} (set serving.release.mode)")
        share = release.challenger_share if share is None else share
        if not 0 <= share <= 1:
            raise EndpointError(f"{pipeline}: challenger_share must be within [0, 1], not {share}")
        config = self.router_config(pipeline)
        old = config.get("challenger")
        backend = self.start_backend(pipeline, bento_tag, model_tag, model_version)
        key_column = next((n for n, c in self.served_spec(model_tag).schema_.items() if c.key), None)
        config.update(challenger=backend, mode=mode, share=share, key_column=key_column)
        self.apply_router_config(pipeline, config)
        if old:
            self.drain(pipeline, old["url"])
            stop_backend(old)
        record = record | {"challenger": {"model_version": model_version, "bento": bento_tag, "pid": backend["pid"],
                                          "url": backend["url"], "mode": mode, "share": share}}
        self._write_record(pipeline, record)
        return record

    def challenger_report(self, pipeline: str) -> dict[str, Any]:
        """Live per-arm numbers from the router: requests, server errors, error rate, p50/p99 ms, mean score."""
        self.router_call(pipeline, "/_kiln/flush")
        return self.router_call(pipeline, "/_kiln/state")

    def promote_challenger(self, pipeline: str) -> dict[str, Any]:
        """The challenger becomes the served champion (zero downtime); the old champion is drained and stopped."""
        config = self.router_config(pipeline)
        challenger = config.get("challenger")
        if not challenger:
            raise EndpointError(f"{pipeline}: no challenger to promote")
        old = config.get("champion")
        config.update(champion=challenger, challenger=None, mode="none")
        self.apply_router_config(pipeline, config)
        if old:
            self.drain(pipeline, old["url"])
            stop_backend(old)
        record = dict(self.state(pipeline) or {})
        record.pop("challenger", None)
        record.update(backend_pid=challenger["pid"], backend_url=challenger["url"], backend_lane_url=challenger.get("lane_url"),
                      bento=challenger["bento"],
                      model_tag=challenger["model_tag"], model_version=challenger["version"], log=challenger["log"],
                      started_at=time.time(), reused=False)
        self._write_record(pipeline, record)
        return record

    def abort_challenger(self, pipeline: str) -> dict[str, Any]:
        """Take the challenger out of traffic and stop it; the champion keeps serving."""
        config = self.router_config(pipeline)
        challenger = config.get("challenger")
        config.update(challenger=None, mode="none")
        self.apply_router_config(pipeline, config)
        if challenger:
            self.drain(pipeline, challenger["url"])
            stop_backend(challenger)
        record = dict(self.state(pipeline) or {})
        record.pop("challenger", None)
        self._write_record(pipeline, record)
        return record

    def judge_challenger(self, pipeline: str, min_requests: int = 200, max_error_rate: float = 0.01,
                         max_p99_ratio: float = 2.0) -> dict[str, Any]:
        """Promote or abort the challenger from live metrics, or wait for enough traffic.

        Aborts when its server-error rate exceeds ``max_error_rate`` or its p99 latency exceeds ``max_p99_ratio`` times the
        champion's; promotes when neither holds after ``min_requests``. (Model quality is the champion gate's job.)
        """
        state = self.challenger_report(pipeline)
        champion, challenger = state.get("champion"), state.get("challenger")
        if not challenger:
            return {"action": "none", "reason": "no challenger"}
        arms = state["arms"]
        ours = arms.get(f"challenger:{challenger['version']}", {})
        theirs = arms.get(f"champion:{champion['version']}", {}) if champion else {}
        decision: dict[str, Any] = {"challenger": ours, "champion": theirs}
        if ours.get("requests", 0) < min_requests:
            return decision | {"action": "wait", "reason": f"{ours.get('requests', 0)} of {min_requests} requests seen"}
        if ours["error_rate"] > max_error_rate:
            self.abort_challenger(pipeline)
            return decision | {"action": "abort", "reason": f"error rate {ours['error_rate']:.3f} > {max_error_rate}"}
        if theirs.get("p99_ms") and ours.get("p99_ms") and ours["p99_ms"] > max_p99_ratio * theirs["p99_ms"]:
            self.abort_challenger(pipeline)
            return decision | {"action": "abort", "reason": f"p99 {ours['p99_ms']:.1f} ms > {max_p99_ratio}x champion's"}
        self.promote_challenger(pipeline)
        return decision | {"action": "promote", "reason": "error rate and latency within bounds"}

    def shutdown(self, pipeline: str) -> bool:
        """Stop a pipeline's endpoint; True if one was running."""
        record = self.state(pipeline)
        if not record:
            return False
        was_alive = pid_alive(record.get("pid"))
        config = self.router_config(pipeline)
        stop(record.get("pid"))  # the router stops the backends it fronts
        stop(record.get("backend_pid"))
        for upstream in (config.get("champion"), config.get("challenger")):
            stop_backend(upstream)
        (self.folder(pipeline) / "endpoint.json").unlink(missing_ok=True)
        return was_alive


def healthy(url: str, timeout: float = 2.0, path: str = "/readyz") -> bool:
    """True when the endpoint answers 200 on /readyz."""
    import httpx

    try:
        return httpx.get(f"{url}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a backend behind the router)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def stop(pid: int | None) -> None:
    """Stop a server's whole process group (bentoml serve forks workers), politely first."""
    if not pid or pid < 1:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):  # no such group, or not ours to stop
        _reap(pid)
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
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
    """Collect the exit status of a server this process started (within ``wait_s``), so it does not linger as a zombie."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() >= deadline:
                return
        except ChildProcessError:  # not our child (its own parent reaps it) or already collected
            return
        time.sleep(0.05)


HANDOFF_PREFIX = "kiln-h-"


def stop_backend(upstream: dict[str, Any] | None) -> None:
    """Stop a backend started by :meth:`ServingResource.start_backend` and remove its handoff folder."""
    if upstream:
        stop(upstream.get("pid"))
        remove_handoff_dir(upstream.get("handoff_dir"))


def remove_handoff_dir(folder: str | None) -> None:
    """Remove a backend's handoff folder (only one Kiln made: named ``kiln-h-*``); the sockets in it die with the backend."""
    import shutil

    if folder and os.path.basename(folder).startswith(HANDOFF_PREFIX) and not os.path.islink(folder):
        shutil.rmtree(folder, ignore_errors=True)


def sweep_handoff_dirs(base: str, min_age_s: float = 600.0) -> list[str]:
    """Remove the handoff folders of backends that are gone: every ``<pid>.sock`` in them names a dead process
    (a stopped or killed ``bentoml serve`` leaves its folder behind). Folders younger than ``min_age_s`` are kept
    (their workers may not have started yet), and so is anything that is not ours to remove."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(base) if n.startswith(HANDOFF_PREFIX)]
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(base, name)
        try:
            if not os.path.isdir(folder) or os.path.islink(folder) or os.stat(folder).st_uid != os.getuid():
                continue
            if time.time() - os.stat(folder).st_mtime < min_age_s:
                continue
            pids = [n.removesuffix(".sock") for n in os.listdir(folder)]
        except OSError:
            continue
        if not all(p.isdigit() for p in pids) or any(pid_alive(int(p)) for p in pids):
            continue
        remove_handoff_dir(folder)
        removed.append(folder)
    return removed


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
