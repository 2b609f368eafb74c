"""The drift loop under a real `dagster dev` (webserver + daemon, sensors on) in its own KILN_HOME and DAGSTER_HOME.

`kiln demo` trains and serves a first champion; `kiln simulate --drift` writes two drifted days, which the
`fraud_new_data` sensor ingests. Normal traffic sent to the endpoint gives no retrain; drifted traffic gives exactly one
`fraud_retrain` run; drift that persists inside the cooldown gives no second one; `kiln rollback` restores the
previous champion and the endpoint serves it. A client sends requests throughout and counts failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import yaml

from kiln.process import stop_group
from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, REPO, free_port

DAYS = 4
ROWS = 2500
BATCH = 600  # rows per drift window: above min_samples (500)
TICK_S = 3


def _wait(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _kiln(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return done


def _request_rows(frame: pl.DataFrame, spec: Any) -> list[dict[str, Any]]:
    from kiln.features import sample_rows

    return sample_rows(frame, spec, n=frame.height)


class Client(threading.Thread):
    """Sends one small request every 100 ms until stopped and counts non-200 answers and connection errors."""

    def __init__(self, url: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.url, self.rows = url, rows
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self.halt.is_set():
                try:
                    r = client.post(f"{self.url}/predict", json={"rows": [self.rows[i % len(self.rows)]]})
                    if r.status_code == 200:
                        self.ok += 1
                        self.versions.add(r.json()["model_version"])
                    else:
                        self.failures.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(type(exc).__name__)
                i += 1
                self.halt.wait(0.1)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import dagster as dg

    from kiln.spec import load_spec

    home = tmp_path_factory.mktemp("drift-e2e")
    spec_dir = home / "pipelines"
    spec_dir.mkdir()
    data = spec_data(FRAUD_SPEC)
    data["serving"]["port"] = free_port()
    data["drift"].update(min_samples=500, consecutive_windows=2, cooldown_minutes=30, sensor_interval_seconds=TICK_S)
    (spec_dir / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(spec_dir / "fraud.yaml")
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "run_queue": {"max_concurrent_runs": 2},
        "sensors": {"use_threads": True, "num_workers": 2},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KILN_PROFILE")} | {
        "KILN_HOME": str(home), "DAGSTER_HOME": str(dagster_home), "BENTOML_HOME": str(home / "bentoml"),
        "KILN_PIPELINES_DIR": str(spec_dir), "BENTOML_DO_NOT_TRACK": "True", "KILN_USER": "e2e-tester",
        "PYTHONPATH": str(REPO),
    }
    state = home / "state"
    out: dict[str, Any] = {"spec": spec, "env": env, "home": home, "state": state}
    demo = _kiln(env, "demo", "--days", str(DAYS), "--rows-per-day", str(ROWS), "--seed", "3")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    endpoint = json.loads((state / "endpoints" / "fraud" / "endpoint.json").read_text())
    url = endpoint["url"]
    out["first_version"] = endpoint["model_version"]
    # The demo already ingested its days: start the new-data sensor's cursor past them, so under `dagster dev` it
    # ingests only the files written after (two runs instead of six on a 2-core machine).
    seen = {p.name: p.stat().st_mtime for p in (home / "sources" / "fraud").glob("*.parquet")}
    done = subprocess.run([str(Path(sys.executable).parent / "dagster"), "sensor", "cursor", "fraud_new_data", "--set",
                           json.dumps(seen), "-w", str(REPO / "workspace.yaml")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    # `sensor cursor` stores a sensor that had no state as stopped; it is declared running, so keep it running.
    started = subprocess.run([str(Path(sys.executable).parent / "dagster"), "sensor", "start", "fraud_new_data",
                              "-w", str(REPO / "workspace.yaml")],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert started.returncode == 0, started.stderr[-3000:]
    sim = _kiln(env, "simulate", "fraud", "--drift", "1", "--days", "2", "--rows-per-day", str(ROWS), "--seed", "5")
    assert sim.returncode == 0, sim.stderr[-3000:]
    drifted = pl.concat([pl.read_parquet(p) for p in sorted((home / "sources" / "fraud").glob("*.parquet"))[DAYS:]])
    drifted = drifted.sample(fraction=1.0, shuffle=True, seed=1)  # each batch spans whole days, not a few hours
    drifted_rows = _request_rows(drifted, spec)
    from platform_defs.simulators.fraud import generate_day

    normal_rows = _request_rows(generate_day(date(2026, 3, 1), BATCH, 21, 0.0), spec)

    port = free_port()
    log = (home / "dagster-dev.log").open("wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    client: Client | None = None

    def decisions() -> list[dict[str, Any]]:
        from kiln.windows import load_decisions

        return load_decisions(str(state), "fraud")

    def runs(job: str) -> list[Any]:
        return list(instance.get_runs(filters=dg.RunsFilter(job_name=job)))

    def send_and_decide(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """POST rows, then wait for the drift sensor to decide on a window holding at least min_samples of them."""
        before = len(decisions())
        for i in range(0, len(rows), 300):
            r = httpx.post(f"{url}/predict", json={"rows": rows[i:i + 300]}, timeout=60)
            assert r.status_code == 200, r.text
        return _wait("a drift decision on the new rows", lambda: next(
            (d for d in decisions()[before:] if d["n"] >= 500), None), timeout=240)

    try:
        _wait("dagster dev webserver", lambda: _up(f"http://127.0.0.1:{port}/server_info"), timeout=180)
        # The sensor ingests the two drifted days (new data alone never retrains: drift in traffic does).
        _wait("ingest runs of the two drifted days", lambda: len(
            [r for r in runs("fraud_ingest") if r.status == dg.DagsterRunStatus.SUCCESS and r.tags.get("dagster/partition") in
             {p.stem for p in sorted((home / "sources" / "fraud").glob("*.parquet"))[DAYS:]}]) >= 2, timeout=300, every=2)

        out["normal"] = send_and_decide(normal_rows)
        out["retrains_after_normal"] = len(runs("fraud_retrain"))

        out["drift_1"] = send_and_decide(drifted_rows[:BATCH])
        client = Client(url, drifted_rows[-200:])
        client.start()
        out["drift_2"] = send_and_decide(drifted_rows[BATCH:2 * BATCH])
        retrain = _wait("a fraud_retrain run", lambda: runs("fraud_retrain"), timeout=60)[0]
        finished = _wait("the fraud_retrain run to finish", lambda: next(
            (r for r in runs("fraud_retrain") if r.is_finished), None), timeout=420, every=2)
        out["retrain_run"] = finished
        out["retrain_errors"] = [
            str(e.dagster_event.step_key) + ": " + e.dagster_event.step_failure_data.error.to_string()[-3000:]
            for e in instance.all_logs(finished.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        ]
        out["retrain_tags"] = retrain.tags
        time.sleep(2)
        client.halt.set()
        client.join(timeout=60)
        out["client"] = client
        champion_event = instance.get_latest_materialization_event(dg.AssetKey(["fraud", "champion"]))
        assert champion_event is not None and champion_event.asset_materialization is not None
        out["gate"] = {k: v.value for k, v in champion_event.asset_materialization.metadata.items()}
        out["served_after_retrain"] = httpx.get(f"{url}/metadata", timeout=30).json()["model_version"]

        # Drift persists (the new champion's reference was published, so these windows are judged against it).
        out["drift_3"] = send_and_decide(drifted_rows[2 * BATCH:3 * BATCH])
        time.sleep(3 * TICK_S)
        out["retrain_runs_final"] = runs("fraud_retrain")
        records = instance.fetch_observations(dg.AssetKey(["fraud", "predictions"]), limit=100).records
        out["observed_actions"] = [r.asset_observation.metadata["drift_action"].value for r in records
                                   if r.asset_observation and "drift_action" in r.asset_observation.metadata]
        out["url"] = url
        yield out
    finally:
        if client is not None:
            client.halt.set()
        stop_group(server.pid, timeout_s=60)
        server.wait(timeout=10)  # already reaped: only records the return code
        log.close()
        from resources.serving import stop_backend

        endpoint_file = state / "endpoints" / "fraud" / "endpoint.json"
        if endpoint_file.exists():
            stop_group(json.loads(endpoint_file.read_text()).get("pid"))
        router_file = state / "endpoints" / "fraud" / "router.json"
        if router_file.exists():  # the backends the router fronted, and their handoff folders
            router = json.loads(router_file.read_text())
            for upstream in (router.get("champion"), router.get("challenger")):
                stop_backend(upstream)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_normal_traffic_does_not_retrain(loop: dict[str, Any]) -> None:
    assert loop["normal"]["action"] == "ok", loop["normal"]
    assert loop["retrains_after_normal"] == 0


def test_drifted_traffic_retrains_exactly_once(loop: dict[str, Any]) -> None:
    assert loop["drift_1"]["action"] == "wait", loop["drift_1"]  # hysteresis: the first drifted window only waits
    assert loop["drift_2"]["action"] == "retrain", loop["drift_2"]
    assert {"amount", "channel"} <= set(loop["drift_2"]["drifted_columns"])
    run = loop["retrain_run"]
    assert run.status.value == "SUCCESS", "\n".join(loop["retrain_errors"])
    # Drift fired, with the two drifted days as new labeled rows (min_new_rows): the launch names every signal that fired.
    assert "drift" in loop["retrain_tags"]["kiln/retrain_signals"].split(",")
    assert loop["retrain_tags"]["kiln/trigger"] in loop["retrain_tags"]["kiln/retrain_signals"].split(",")
    assert loop["retrain_tags"]["kiln/retrain_reason"].startswith("drift detected: ")
    assert loop["retrain_tags"]["dagster/sensor_name"] == "fraud_drift"
    # Each decision is also an observation on fraud/predictions, with its action and scores.
    assert {"ok", "wait", "retrain"} <= set(loop["observed_actions"])
    assert loop["observed_actions"].count("retrain") == 1


def test_new_champion_only_if_better_and_served(loop: dict[str, Any]) -> None:
    gate = loop["gate"]
    if gate["promoted"]:
        gain = gate["challenger_score"] - gate["previous_score"]
        assert gain > loop["spec"].evaluation.min_improvement  # strictly: a tie never rolls
        assert gate["version"] == gate["challenger_version"] != loop["first_version"]
    else:
        assert gate["version"] == loop["first_version"]
    assert loop["served_after_retrain"] == gate["version"]


def test_persisting_drift_does_not_retrain_inside_cooldown(loop: dict[str, Any]) -> None:
    assert loop["drift_3"]["action"] in ("cooldown", "ok"), loop["drift_3"]
    assert len(loop["retrain_runs_final"]) == 1


def test_client_was_served_by_both_models_through_the_roll(loop: dict[str, Any]) -> None:
    client = loop["client"]
    if not loop["gate"]["promoted"]:
        pytest.skip("the gate kept the champion, so the endpoint did not roll")
    assert client.versions == {loop["first_version"], loop["gate"]["version"]}, client.versions


def test_client_sees_no_failure_through_the_roll(loop: dict[str, Any]) -> None:
    client = loop["client"]
    if not loop["gate"]["promoted"]:
        pytest.skip("the gate kept the champion, so the endpoint did not roll")
    kinds = sorted(set(client.failures))
    assert client.failures == [], f"{len(client.failures)} failed of {client.ok + len(client.failures)} requests: {kinds}"


def test_rollback_restores_previous_champion_over_http(loop: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{loop['home'] / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    current = str(mlflow.get_model_version_by_alias("fraud", "champion").version)
    if current == loop["first_version"]:
        done = _kiln(loop["env"], "rollback", "fraud", "--reason", "e2e")
        assert done.returncode == 1 and "first champion" in done.stderr  # nothing before the first champion
        return
    done = _kiln(loop["env"], "rollback", "fraud", "--reason", "e2e: bad model")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    restored = mlflow.get_model_version_by_alias("fraud", "champion")
    assert str(restored.version) == loop["first_version"]
    assert restored.tags["kiln.rolled_back_by"] == "e2e-tester"
    assert restored.tags["kiln.rollback_reason"] == "e2e: bad model"
    assert restored.tags["kiln.rolled_back_from"] == current
    response = httpx.post(f"{loop['url']}/predict", json={"rows": _request_rows(
        pl.read_parquet(sorted((loop["home"] / "sources" / "fraud").glob("*.parquet"))[0]).head(3), loop["spec"])}, timeout=60)
    assert response.status_code == 200 and response.json()["model_version"] == loop["first_version"]
    assert httpx.get(f"{loop['url']}/metadata", timeout=30).json()["model_version"] == loop["first_version"]
