"""Local endpoints: a router on the public port (serving/router.py) in front of `bentoml serve` backends,
rolled without downtime, with canary/shadow challengers routed by :func:`kiln.release.route_table` (the table the
Kubernetes HTTPRoute is rendered from); started, health-checked, replaced, judged from the backends' own ``/metrics``
and stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg

from kiln import paths, settings
from kiln.process import pid_alive, stop_group

READY_TIMEOUT_S = 180.0
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
        from kiln.state import state_path

        local = state_path(self.state_root, "")  # a folder root: the state store's local form is a plain Path
        assert isinstance(local, Path), local
        return local

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
            stop_group(previous.get("pid"))  # an endpoint recorded before the router existed: a bare `bentoml serve`
        if not router_up:
            if previous:
                stop_group(previous.get("router_pid"))
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
        """Start `bentoml serve` for a bento on a free internal port and wait until it is ready; with
        ``KILN_ENDPOINT_TARGET=container``, run the bento's image (built by `<p>/image`) with podman instead."""
        spec = self.served_spec(model_tag)
        workers = spec.serving.workers or os.cpu_count() or 1
        port = free_port(self.host)
        url = f"http://{self.host}:{port}"
        if settings.endpoint_target() == "container":
            from resources import containers

            try:
                started = containers.serve_bento(pipeline, bento_tag, port, self.host, settings.api_key(),
                                                 self.prediction_log_env(pipeline), READY_TIMEOUT_S)
            except containers.ContainerError as exc:
                raise EndpointError(str(exc)) from exc
            return {"url": started["url"], "pid": None, "container": started["container"], "image": started["image"],
                    "port": port, "version": model_version, "bento": bento_tag, "model_tag": model_tag,
                    "log": f"podman logs {started['container']}", "workers": workers}
        log_path = self.folder(pipeline) / f"server-{port}.log"
        home = self.backend_home(pipeline, port)
        env = os.environ | {
            "BENTOML_HOME": str(home),
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
            remove_backend_home(str(home))
            raise
        return {"url": url, "pid": proc.pid, "port": port, "version": model_version, "bento": bento_tag, "model_tag": model_tag,
                "log": str(log_path), "workers": workers, "bentoml_home": str(home)}

    def backend_home(self, pipeline: str, port: int) -> Path:
        """A ``BENTOML_HOME`` of the backend's own, ``<folder>/backends/bentoml-<port>``, with the store's ``models`` and
        ``bentos`` linked in. BentoML keeps a server's Prometheus files under its home and empties that folder when a
        server starts: with one home per backend, each backend's ``/metrics`` holds its own numbers, and a challenger
        starting next to the champion does not wipe the champion's."""
        home = self.folder(pipeline) / BACKEND_HOMES / f"{BACKEND_HOME_PREFIX}{port}"
        remove_backend_home(str(home))  # a leftover of a backend that had this port before
        home.mkdir(parents=True)
        for sub in ("models", "bentos"):
            shared = Path(self.bentoml_home) / sub
            shared.mkdir(parents=True, exist_ok=True)
            (home / sub).symlink_to(shared.resolve(), target_is_directory=True)
        return home

    def _wait_ready(self, pipeline: str, proc: subprocess.Popen[bytes], url: str, log_path: Path, path: str = "/readyz") -> None:
        what = "the router" if "serving.router" in proc.args else "bentoml serve"  # type: ignore[operator]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EndpointError(f"{pipeline}: {what} exited with {proc.returncode}:\n{tail(log_path)}")
            if healthy(url, path=path):
                return
            time.sleep(0.3)
        stop_group(proc.pid)
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

    def routes(self, config: dict[str, Any]) -> dict[str, Any]:
        """The route table (:func:`kiln.release.route_table`) of a router config's champion, challenger, mode and share,
        as the router reads it: served backends by role with weights of 100, and the mirror (shadow) target."""
        from kiln.release import ReleaseError, route_table

        champion, challenger = config.get("champion"), config.get("challenger")
        if not champion:
            return {"mode": "none", "backends": [], "mirror": None}
        spec = self.served_spec(champion["model_tag"])
        release = spec.serving.release.model_copy(update={"mode": config.get("mode") or "none",
                                                          "challenger_share": float(config.get("share") or 0.0)})
        spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"release": release})})
        try:
            table = route_table(spec, str(champion["version"]), str(challenger["version"]) if challenger else None)
        except ReleaseError as exc:
            raise EndpointError(str(exc)) from None
        from serving.router import routes_config

        return routes_config(table)

    def write_router_config(self, pipeline: str, config: dict[str, Any]) -> None:
        """Write the router's config with its route table (atomically, readable by this user only)."""
        config["routes"] = self.routes(config)
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
        """The router's state (routes, live per-arm counts) and ``versions``: each served version's numbers from its
        backend's own ``/metrics`` (:func:`backend_numbers`: requests, server errors, error rate, p50/p99 ms, mean score)."""
        self.router_call(pipeline, "/_kiln/flush")
        state = self.router_call(pipeline, "/_kiln/state")
        state["versions"] = {str(u["version"]): backend_numbers(u["url"], str(u["version"]))
                             for u in (state.get("champion"), state.get("challenger")) if u}
        return state

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
        record.update(backend_pid=challenger["pid"], backend_url=challenger["url"], bento=challenger["bento"],
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
        The numbers are each version's own, from its backend's ``/metrics`` (``kiln_requests_total`` and
        ``kiln_request_duration_seconds`` by ``model_version``): the same series a cluster's Prometheus scrapes.
        """
        state = self.challenger_report(pipeline)
        champion, challenger = state.get("champion"), state.get("challenger")
        if not challenger:
            return {"action": "none", "reason": "no challenger"}
        versions = state["versions"]
        ours = versions.get(str(challenger["version"]), {})
        theirs = versions.get(str(champion["version"]), {}) if champion else {}
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
        stop_group(record.get("pid"))  # the router stops the backends it fronts
        stop_group(record.get("backend_pid"))
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


BACKEND_HOMES = "backends"
BACKEND_HOME_PREFIX = "bentoml-"


def stop_backend(upstream: dict[str, Any] | None) -> None:
    """Stop a backend started by :meth:`ServingResource.start_backend` and remove its own ``BENTOML_HOME``."""
    if upstream:
        if upstream.get("container"):
            from resources.containers import stop_container

            stop_container(str(upstream["container"]))
        stop_group(upstream.get("pid"))
        remove_backend_home(upstream.get("bentoml_home"))


def remove_backend_home(home: str | None) -> None:
    """Remove a backend's own BentoML home (only one Kiln made: ``backends/bentoml-<port>``; the linked store stays)."""
    import shutil

    if not home:
        return
    path = Path(home)
    if path.name.startswith(BACKEND_HOME_PREFIX) and path.parent.name == BACKEND_HOMES and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # removes the links to models/ and bentos/, never what they point to


def backend_numbers(url: str, version: str, timeout: float = 10.0) -> dict[str, Any]:
    """One model version's numbers from a backend's own ``/metrics``: ``requests``, ``server_errors``,
    ``client_errors``, ``error_rate``, ``rows``, ``mean_score`` and ``p50_ms``/``p99_ms`` (the upper edge of the
    latency bucket the quantile falls in). Empty when the backend does not answer."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=timeout).text
    except httpx.HTTPError:
        return {}
    by_status: dict[int, float] = {}
    buckets: dict[float, float] = {}
    score_sum = score_count = rows = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_version") != version:
                continue
            if sample.name == "kiln_requests_total":
                status = int(sample.labels.get("status", "0"))
                by_status[status] = by_status.get(status, 0.0) + sample.value
            elif sample.name == "kiln_request_duration_seconds_bucket":
                edge = float(sample.labels["le"])
                buckets[edge] = buckets.get(edge, 0.0) + sample.value
            elif sample.name == "kiln_predicted_rows_total":
                rows += sample.value
            elif sample.name == "kiln_prediction_score_sum":
                score_sum += sample.value
            elif sample.name == "kiln_prediction_score_count":
                score_count += sample.value
    requests = int(sum(by_status.values()))
    errors = int(sum(n for s, n in by_status.items() if s >= 500))
    total = buckets.get(float("inf"), 0.0)

    def quantile(q: float) -> float | None:
        if not total:
            return None
        edge = next(e for e in sorted(buckets) if buckets[e] >= q * total)
        return None if edge == float("inf") else edge * 1000

    return {
        "requests": requests, "server_errors": errors, "client_errors": int(sum(n for s, n in by_status.items() if 400 <= s < 500)),
        "error_rate": errors / requests if requests else 0.0, "rows": int(rows),
        "mean_score": score_sum / score_count if score_count else None, "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
    }


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
