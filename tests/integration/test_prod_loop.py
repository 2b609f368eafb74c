"""The production loop in KILN_PROFILE=prod with every shared state on object storage (``KILN_STATE_ROOT=s3://...``, moto):

serve (a local `bentoml serve` endpoint whose workers ship the prediction log as Parquet objects to S3) -> `<p>_observe`
in its own process materializes drift windows -> `<p>_drift` evaluated in its own process, its cursor handed from one
tick to the next as the daemon stores it -> `<p>_retrain` launched from the run request's tags -> the champion gate ->
the new version answering over HTTP. Each process gets its own cwd, TMPDIR, KILN_HOME, DAGSTER_HOME (a copy of the
instance config: the runs are in Postgres) and pipelines folder: nothing shared on local disk, only S3, Postgres and
the MLflow server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port
from tests.integration.conftest import BUCKET, store_cleanup, upload_sources

NAME = "loop"
STATE_PREFIX = "loop-state"
DAYS = 3
ROWS = 3000
BATCH = 600  # rows per window: above drift.min_samples (500)

# `<p>_observe` as a job run of its own, on the instance of DAGSTER_HOME (Postgres), the code rebuilt from the env;
# it prints the new window's rows and each step failure's message (the failing run's text a person would read).
OBSERVE = """
import json, sys
import dagster as dg
from kiln.spec import load_specs
from platform_defs.definitions import build_definitions

defs = build_definitions(load_specs(), "prod")
with dg.DagsterInstance.get() as instance:
    result = defs.resolve_job_def(sys.argv[1] + "_observe").execute_in_process(instance=instance, raise_on_error=False)
    rows = [e.step_materialization_data.materialization.metadata["new_window_rows"].value
            for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "predictions"]
    failures = [e.step_failure_data.error.to_string() for e in result.all_events
                if e.is_step_failure and e.step_failure_data.error is not None]
    print(json.dumps({"success": result.success, "run_id": result.run_id, "new_window_rows": rows, "failures": failures}))
"""

# One tick of `<p>_drift`, as the sensor daemon evaluates it: the stored cursor in, the run request and new cursor out.
TICK = """
import json, sys
import dagster as dg
from kiln.spec import load_specs
from platform_defs.definitions import build_definitions

defs = build_definitions(load_specs(), "prod")
sensor = next(s for s in defs.sensors if s.name == sys.argv[1] + "_drift")
with dg.DagsterInstance.get() as instance:
    context = dg.build_sensor_context(instance=instance, cursor=sys.argv[2] or None,
                                      resources={"storage": defs.resources["storage"]})
    result = sensor.evaluate_tick(context)
print(json.dumps({"cursor": result.cursor, "skip": result.skip_message,
                  "run_requests": [{"run_key": r.run_key, "tags": dict(r.tags)} for r in result.run_requests]}))
"""


def _keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _process(work: Path, name: str, spec_file: Path, script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a fresh Python process with its own cwd, TMPDIR, KILN_HOME, DAGSTER_HOME and pipelines folder;
    the JSON it prints last is its answer."""
    own = work / name
    for sub in ("tmp", "home", "dagster", "pipelines"):
        (own / sub).mkdir(parents=True)
    shutil.copy(Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml", own / "dagster" / "dagster.yaml")
    shutil.copy(spec_file, own / "pipelines" / spec_file.name)
    repo = Path(__file__).resolve().parents[2]
    env = os.environ | {"TMPDIR": str(own / "tmp"), "KILN_HOME": str(own / "home"), "DAGSTER_HOME": str(own / "dagster"),
                        "KILN_PIPELINES_DIR": str(own / "pipelines"), "BENTOML_HOME": str(own / "home" / "bentoml"),
                        "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=own, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{name} printed no answer:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    answer = json.loads(lines[-1])
    # nothing of the state store was written on this process's local disk
    assert not [p for p in own.rglob("*") if set(p.parts) & {"drift", "predictions", "reference", "s3:"}], own
    return answer


def _drifted(day: date, rows: int, seed: int) -> pl.DataFrame:
    from platform_defs.simulators.fraud import generate_day

    return generate_day(day, rows, seed, 1.0).sample(fraction=1.0, shuffle=True, seed=seed)


def test_serve_observe_drift_retrain_gate_serve_with_the_state_root_on_s3(
        services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg

    from kiln.features import sample_rows
    from kiln.spec import load_spec
    from kiln.windows import WINDOW_CURSOR
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from resources.serving import ServingResource
    from tests.results import logged_rows, wait_for_flushed_log, wait_for_logged_rows

    s3, instance = services["s3"], services["instance"]
    state_root = f"s3://{BUCKET}/{STATE_PREFIX}"
    monkeypatch.setenv("KILN_STATE_ROOT", state_root)
    spec_dir = tmp_path / "pipelines"
    spec_dir.mkdir()
    data = spec_data(FRAUD_SPEC)
    data["name"] = NAME
    data["source"]["path"] = NAME
    data["serving"].update(port=free_port(), workers=1)
    data["trainer"]["params"]["num_boost_round"] = 60
    data["drift"].update(min_samples=500, consecutive_windows=2, cooldown_minutes=60)
    data["retrain"] = {"min_new_rows": 1000, "consecutive_windows": 2}
    spec_file = spec_dir / f"{NAME}.yaml"
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(spec_dir))
    spec = load_spec(spec_file)
    defs = build_definitions([spec], "prod")
    serving = ServingResource(state_root=state_root, bentoml_home=os.environ["BENTOML_HOME"])
    local = tmp_path / "sim"
    with store_cleanup(serving, NAME):
        # A champion trained on three days in S3, served by a local `bentoml serve` behind the router.
        simulate(spec, local, DAYS, ROWS, seed=8, start=date(2026, 1, 1))
        upload_sources(s3, local, f"sources/{NAME}")
        assert all(r.success for r in ingest(defs, spec, source_partitions(spec, local), instance, progress=lambda _: None))
        first = retrain(defs, spec, instance, progress=lambda _: None)
        assert first.success
        first_version = first.output_for_node(f"{NAME}__model")["version"]
        record = serving.state(NAME)
        assert record is not None and record["model_version"] == first_version
        # the endpoint's process bookkeeping is local (under KILN_HOME), never a folder named after the s3:// root
        assert serving.folder(NAME).is_relative_to(Path(os.environ["KILN_HOME"]))
        assert not (Path.cwd() / "s3:").exists()
        url = record["url"]

        # Two new labeled days (drifted) arrive in the S3 source and are ingested: rows a retrain can learn from.
        new_days = simulate(spec, local, 2, ROWS, drift=1.0, seed=9)
        for path in new_days:
            s3.upload_file(str(path), BUCKET, f"sources/{NAME}/{path.name}")
        assert all(r.success for r in ingest(defs, spec, [p.stem for p in new_days], instance, progress=lambda _: None))

        # Drifted traffic, two windows: logged as objects on S3, each observed and ticked in processes of their own.
        traffic = _drifted(date(2026, 3, 1), 2 * BATCH, seed=21)
        wait_for_flushed_log(url, NAME)  # the smoke check's rows are shipped before the first window
        cursor, ticks = "", []
        for i in range(0, traffic.height, BATCH):
            logged = logged_rows(state_root, NAME)
            response = httpx.post(f"{url}/predict", json={"rows": sample_rows(traffic.slice(i, BATCH), spec, n=BATCH)}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == first_version
            wait_for_logged_rows(state_root, NAME, logged + BATCH)
            observed = _process(tmp_path, f"observe-{i}", spec_file, OBSERVE, NAME)
            assert observed["success"] and observed["new_window_rows"] and observed["new_window_rows"][0] >= BATCH, observed
            tick = _process(tmp_path, f"tick-{i}", spec_file, TICK, NAME, cursor)
            cursor = tick["cursor"] or cursor
            ticks.append(tick)
        assert not ticks[0]["run_requests"], ticks[0]  # one drifted window is not yet a streak of two
        assert len(ticks[1]["run_requests"]) == 1, ticks[1]["skip"]
        tags = ticks[1]["run_requests"][0]["tags"]
        assert "drift" in tags["kiln/retrain_signals"].split(",")
        assert tags["kiln/retrain_reason"].startswith("drift detected")

        # The windows, decisions and log are objects on S3 (listed in moto), written by the endpoint and the processes.
        stored = _keys(s3, f"{STATE_PREFIX}/")
        for prefix in (f"predictions/{NAME}/", f"drift/{NAME}/windows/", f"drift/{NAME}/decisions/",
                       f"drift/{NAME}/retrain_decisions/"):
            assert any(k.startswith(f"{STATE_PREFIX}/{prefix}") for k in stored), (prefix, stored)
        assert f"{STATE_PREFIX}/reference/{NAME}/reference.json" in stored
        windows = sorted(k for k in stored if k.startswith(f"{STATE_PREFIX}/drift/{NAME}/windows/"))
        decisions = [k for k in stored if k.startswith(f"{STATE_PREFIX}/drift/{NAME}/decisions/")]
        assert len(windows) == 2 and len(decisions) == 2  # one window per observe run, one decision per tick
        # each tick read exactly the window observed before it: the cursor crossed the processes
        read = [json.loads(t["cursor"])[WINDOW_CURSOR] for t in ticks]
        assert [Path(k).name.startswith(r) for k, r in zip(windows, read)] == [True, True], (windows, read)
        from kiln.windows import last_retrain_decision

        decision = last_retrain_decision(state_root, NAME)
        assert decision is not None and decision["launch"] is True and decision["new_labeled_rows"] == 2 * ROWS
        assert f"{2 * ROWS} new labeled rows" in decision["reason"] and decision["reason"].endswith("retrain launched")

        # `<p>_retrain` launched from the request: trains on the new rows, passes the gate, the new version serves.
        run = defs.resolve_job_def(f"{NAME}_retrain").execute_in_process(instance=instance, tags=tags, raise_on_error=False)
        assert run.success
        assert run.dagster_run.tags["kiln/trigger"] == tags["kiln/trigger"]
        features = next(e for e in run.get_asset_materialization_events() if e.asset_key == dg.AssetKey([NAME, "features"]))
        assert features.step_materialization_data.materialization.metadata["dagster/row_count"].value == (DAYS + 2) * ROWS
        new_version = run.output_for_node(f"{NAME}__model")["version"]
        assert new_version != first_version
        gate = next(e for e in run.get_asset_materialization_events() if e.asset_key == dg.AssetKey([NAME, "champion"]))
        gate_metadata = gate.step_materialization_data.materialization.metadata
        assert gate_metadata["promoted"].value is True, gate_metadata["reason"].value
        assert _champion(services) == new_version
        rows = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{STATE_PREFIX}/reference/{NAME}/sample_rows.json")["Body"].read())[:5]
        answer = httpx.post(f"{url}/predict", json={"rows": rows}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == new_version and len(answer.json()["predictions"]) == 5


def _champion(services: dict[str, Any]) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services["mlflow"].url, registry_uri=services["mlflow"].url)
    return str(client.get_model_version_by_alias(NAME, "champion").version)


# ------------------------------------------------------------------------------------------ faults: S3 unreachable
# The package's moto server also holds MLflow's artifacts and the other modules' state, so the outages below stop a
# moto server of their own (own port, own bucket) that is the whole Kiln state store of one pipeline, `loopfault`:
# its sources, IO-manager storage, state root and the endpoint's prediction log. MLflow stays on the package's server.

FAULT = "loopfault"
FAULT_BATCH = 150  # rows per request in the fault tests


class OwnS3:
    """A moto S3 server on a fixed 127.0.0.1 port that a test stops and starts again (moto's buckets live on in this
    process); stopping drops the server object so that its listening socket closes and connections are refused."""

    def __init__(self) -> None:
        import uuid

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = f"kiln-fault-{uuid.uuid4().hex[:10]}"
        self.server: Any = None

    def start(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        client = boto3.client("s3", endpoint_url=self.url)
        if self.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        """Stop the server and wait (bounded) until its port refuses connections: the store is really unreachable."""
        import gc
        import socket
        import time

        if self.server is None:
            return
        self.server.stop()
        self.server = None
        gc.collect()
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            except OSError:
                return
            assert time.monotonic() < deadline, f"moto on {self.url} still accepts connections after stop()"
            time.sleep(0.1)


def _metrics(url: str, pipeline: str) -> dict[str, float]:
    """The endpoint's ``kiln_prediction_log_*`` series of ``pipeline`` (through the router's ``/metrics``), summed."""
    import re

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(kiln_prediction_log_\w+)\{([^}]*)\} (\S+)$", text, flags=re.M):
        if f'pipeline="{pipeline}"' in labels:
            found[name] = found.get(name, 0.0) + float(value)
    return found


@pytest.fixture(scope="module")
def fault_world(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`loopfault` trained and served with every Kiln store on an S3 server of its own; yields what the tests need."""
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate
    from resources.serving import ServingResource

    own = OwnS3()
    own.start()
    work = tmp_path_factory.mktemp("fault")
    state_root = f"s3://{own.bucket}/{STATE_PREFIX}"
    spec_dir = work / "pipelines"
    spec_dir.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KILN_S3_ENDPOINT_URL", own.url)
        env.setenv("KILN_SOURCE_ROOT", f"s3://{own.bucket}/sources")
        env.setenv("KILN_STORAGE_PREFIX", f"s3://{own.bucket}/storage")
        env.setenv("KILN_STATE_ROOT", state_root)
        env.setenv("KILN_PIPELINES_DIR", str(spec_dir))
        data = spec_data(FRAUD_SPEC)
        data["name"] = FAULT
        data["source"]["path"] = FAULT
        data["serving"].update(port=free_port(), workers=1)
        data["trainer"]["params"]["num_boost_round"] = 30
        spec_file = spec_dir / f"{FAULT}.yaml"
        spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
        spec = load_spec(spec_file)
        defs = build_definitions([spec], "prod")
        serving = ServingResource(state_root=state_root, bentoml_home=os.environ["BENTOML_HOME"])
        try:
            with store_cleanup(serving, FAULT):
                import boto3

                client = boto3.client("s3", endpoint_url=own.url)
                local = work / "sim"
                days = simulate(spec, local, 2, 1500, seed=31, start=date(2026, 1, 1))
                for path in days:
                    client.upload_file(str(path), own.bucket, f"sources/{FAULT}/{path.name}")
                instance = services["instance"]
                assert all(r.success for r in ingest(defs, spec, [p.stem for p in days], instance, progress=lambda _: None))
                assert retrain(defs, spec, instance, progress=lambda _: None).success
                record = serving.state(FAULT)
                assert record is not None
                yield {"s3": own, "client": client, "state_root": state_root, "spec": spec, "spec_file": spec_file,
                       "url": record["url"], "work": work}
        finally:
            own.stop()


def _post(url: str, frame: pl.DataFrame, spec: Any) -> None:
    from kiln.features import sample_rows

    response = httpx.post(f"{url}/predict", json={"rows": sample_rows(frame, spec, n=frame.height)}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == frame.height


def test_requests_while_s3_is_down_are_answered_and_their_log_rows_all_reach_s3_when_it_is_back(
        fault_world: dict[str, Any]) -> None:
    import time

    from tests.results import logged_rows, wait_for_flushed_log

    own, url, spec, root = fault_world["s3"], fault_world["url"], fault_world["spec"], fault_world["state_root"]
    traffic = _drifted(date(2026, 3, 2), 6 * FAULT_BATCH, seed=41)
    wait_for_flushed_log(url, FAULT)
    _post(url, traffic.slice(0, FAULT_BATCH), spec)  # one request while S3 is up
    wait_for_flushed_log(url, FAULT)
    before = logged_rows(root, FAULT)
    errors_before = _metrics(url, FAULT).get("kiln_prediction_log_flush_errors_total", 0.0)

    own.stop()
    try:
        for i in range(1, 6):  # five requests while S3 is down: every one answered, from the loaded model
            _post(url, traffic.slice(i * FAULT_BATCH, FAULT_BATCH), spec)
        deadline = time.monotonic() + 60  # the shipper tried S3 and failed: the rows are spilled, not yet shipped
        down = _metrics(url, FAULT)
        while down.get("kiln_prediction_log_flush_errors_total", 0.0) <= errors_before \
                or down.get("kiln_prediction_log_spilled_rows", 0.0) == 0:
            assert time.monotonic() < deadline, f"no failed flush and spill while S3 was down: {down}"
            time.sleep(0.2)
            down = _metrics(url, FAULT)
        assert down["kiln_prediction_log_flushed_rows_total"] == before, down  # nothing reached S3 meanwhile
    finally:
        own.start()

    flushed = wait_for_flushed_log(url, FAULT, timeout_s=240)  # the backoff retries reach S3 again
    sent_down = 5 * FAULT_BATCH
    assert logged_rows(root, FAULT) == before + sent_down
    after = _metrics(url, FAULT)
    assert after["kiln_prediction_log_flushed_rows_total"] + after.get("kiln_prediction_log_dropped_rows_total", 0.0) \
        == after["kiln_prediction_log_rows_total"], after
    assert after.get("kiln_prediction_log_dropped_rows_total", 0.0) == 0, after
    assert flushed == after["kiln_prediction_log_flushed_rows_total"]


def test_observe_fails_naming_the_bucket_and_key_while_s3_is_down_and_then_makes_exactly_one_window(
        fault_world: dict[str, Any]) -> None:
    from urllib.parse import unquote

    from kiln.windows import load_windows
    from tests.results import logged_rows, wait_for_flushed_log

    own, url, spec, root = fault_world["s3"], fault_world["url"], fault_world["spec"], fault_world["state_root"]
    work, spec_file = fault_world["work"], fault_world["spec_file"]
    wait_for_flushed_log(url, FAULT)
    first = _process(work, "fault-observe-0", spec_file, OBSERVE, FAULT)  # everything logged so far: one window
    assert first["success"] and first["failures"] == [], first
    windows = load_windows(root, FAULT)
    assert windows and sum(w["counts"]["n"] for w in windows) == logged_rows(root, FAULT)

    new = 2 * FAULT_BATCH  # new log objects on S3
    traffic = _drifted(date(2026, 3, 3), new, seed=43)
    logged = logged_rows(root, FAULT)
    _post(url, traffic.slice(0, FAULT_BATCH), spec)
    _post(url, traffic.slice(FAULT_BATCH, FAULT_BATCH), spec)
    wait_for_flushed_log(url, FAULT)
    assert logged_rows(root, FAULT) == logged + new

    own.stop()
    try:
        failed = _process(work, "fault-observe-down", spec_file, OBSERVE, FAULT)
    finally:
        own.start()
    assert not failed["success"] and failed["failures"], failed
    # the first read of the step (the listing of the windows) names the bucket and the prefix in the URL it could not
    # reach (URL-encoded there: decoded before matching)
    text = unquote("\n".join(failed["failures"]))
    assert own.bucket in text, text
    assert f"{own.bucket}?list-type=2&prefix={STATE_PREFIX}/drift/{FAULT}/windows/" in text, text
    assert f"state store: could not list s3://{own.bucket}/{STATE_PREFIX}/drift/{FAULT}/windows" in text, text

    again = _process(work, "fault-observe-back", spec_file, OBSERVE, FAULT)
    assert again["success"] and again["new_window_rows"] == [new], again
    after = load_windows(root, FAULT)
    assert len(after) == len(windows) + 1, [w["window_id"] for w in after]
    assert after[:-1] == windows  # the earlier windows untouched
    assert after[-1]["counts"]["n"] == new and after[-1]["since"] == windows[-1]["until"]
    assert sum(w["counts"]["n"] for w in after) == logged_rows(root, FAULT)  # no row in two windows, none in none


# ------------------------------------------------------------------ fault: a training step killed mid-checkpoint
CKPT = "loopckpt"  # the breast_cancer torch pipeline under another name, its checkpoints on S3
CKPT_STATE = "ckpt-state"
KILL_AT_EPOCH = 3  # the step is killed once the checkpoint pointer on S3 names this epoch or a later one


def _pointer(s3: Any) -> dict[str, Any] | None:
    """The torch checkpoint pointer of `loopckpt` on S3 (``<stem>.latest.json``), or None before the first epoch."""
    keys = [k for k in _keys(s3, f"{CKPT_STATE}/checkpoints/{CKPT}/") if k.endswith(".latest.json")]
    if not keys:
        return None
    [key] = keys
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return {"key": key, **json.loads(body)}


def test_a_training_step_killed_mid_checkpoint_is_reexecuted_from_the_last_complete_checkpoint_on_s3(
        services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<p>/model` of a torch pipeline runs in its own step process (the multiprocess executor, as a k8s step Job would)
    with its checkpoints on S3. The process is SIGKILLed once the pointer names epoch >= KILL_AT_EPOCH, and an object of
    the next epoch is left torn beside it (an upload cut off). Dagster's re-execution from failure runs the step in a
    new process: it resumes from the pointed-to epoch (not from scratch, not from the torn object), registers the
    version, and removes the checkpoints."""
    import signal
    import threading
    import time

    import dagster as dg
    import psutil

    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate
    from tests.conftest import REPO
    from tests.integration import prod_jobs

    s3, instance = services["s3"], services["instance"]
    # the package's stores (a module fixture of the fault tests may have pointed the environment at its own S3)
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", services["s3_url"])
    monkeypatch.setenv("KILN_SOURCE_ROOT", f"s3://{BUCKET}/sources")
    monkeypatch.setenv("KILN_STORAGE_PREFIX", f"s3://{BUCKET}/storage")
    monkeypatch.setenv("KILN_STATE_ROOT", f"s3://{BUCKET}/{CKPT_STATE}")
    spec_dir = tmp_path / "pipelines"
    spec_dir.mkdir()
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(spec_dir))
    data = spec_data(REPO / "platform_defs" / "pipelines" / "breast_cancer" / "defs.yaml")
    data["name"] = CKPT
    data["source"]["path"] = CKPT
    data["serving"]["port"] = free_port()
    data["trainer"]["params"].update(epochs=400, patience=400)  # no early stop: the kill lands mid-training
    spec_file = spec_dir / f"{CKPT}.yaml"
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(spec_file)
    defs = build_definitions([spec], "prod")
    local = tmp_path / "sim"
    [snapshot] = simulate(spec, local, 1, 400, seed=9)
    s3.upload_file(str(snapshot), BUCKET, f"sources/{CKPT}/{snapshot.name}")
    assert all(r.success for r in ingest(defs, spec, [None], instance, progress=lambda _: None))
    assert retrain(defs, spec, instance, progress=lambda _: None, stages=("features",)).success

    monkeypatch.setenv("KILN_EXECUTOR", "multiprocess")  # the step in its own process, as in a k8s step Job
    monkeypatch.setenv("KILN_STEP_RETRIES", "0")  # no in-run retry: recovery is the re-execution
    monkeypatch.setenv(prod_jobs.PIPELINE_ENV, CKPT)
    job = dg.reconstructable(prod_jobs.pipeline_retrain)
    started = time.time()
    killed: dict[str, Any] = {}

    def kill_mid_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            pointer = _pointer(s3)
            if pointer is not None and pointer["epoch"] >= KILL_AT_EPOCH:
                break
            time.sleep(0.05)
        else:
            return
        # the step process: a child of this process spawned by the multiprocess executor during this run
        steps = [c for c in psutil.Process().children() if c.create_time() >= started - 1
                 and "spawn_main" in " ".join(c.cmdline())]
        killed["candidates"] = [c.pid for c in steps]
        if len(steps) == 1:
            killed["pid"] = steps[0].pid
            os.kill(steps[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_training, daemon=True)
    killer.start()
    failed = dg.execute_job(job, instance=instance, asset_selection=[dg.AssetKey([CKPT, "model"])])
    killer.join(timeout=30)
    assert "pid" in killed, f"the model step was not killed mid-training (candidates {killed.get('candidates')})"
    assert not failed.success
    [worker] = [e for e in failed.all_events if e.event_type_value == "STEP_WORKER_STARTED"]
    assert worker.event_specific_data.metadata["pid"].value == str(killed["pid"])

    last = _pointer(s3)  # the last complete checkpoint: what the pointer names now that its writer is dead
    assert last is not None and KILL_AT_EPOCH <= last["epoch"] < 399, last
    folder = last["key"].rsplit("/", 1)[0]
    stem = last["key"].rsplit("/", 1)[1].removesuffix(".latest.json")
    torn = f"{folder}/{stem}.epoch-{last['epoch'] + 1:06d}.pt"
    s3.put_object(Bucket=BUCKET, Key=torn, Body=b"PK\x03\x04 cut off mid-upload")
    assert s3.get_object(Bucket=BUCKET, Key=f"{folder}/{last['object']}")["ContentLength"] == last["bytes"]

    again = dg.execute_job(job, instance=instance,
                           reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance))
    assert again.success, [str(e.message) for e in again.all_events if e.is_failure]
    [resumed] = [e.materialization for e in again.get_asset_materialization_events()
                 if e.asset_key == dg.AssetKey([CKPT, "model"])]
    assert resumed.metadata["training/resumed_from_epoch"].value == last["epoch"]
    assert resumed.metadata["training/start_epoch"].value == last["epoch"] + 1
    assert resumed.metadata["training/epochs_run"].value == 400 - last["epoch"] - 1
    [step_start] = [e for e in again.all_events if e.event_type_value == "STEP_WORKER_STARTED"]
    assert step_start.event_specific_data.metadata["pid"].value != str(killed["pid"])
    # registered: the checkpoints (pointer, pointed-to object and the torn one) are gone from S3
    assert _keys(s3, f"{CKPT_STATE}/checkpoints/{CKPT}/") == []


def test_a_replica_killed_between_flushes_loses_at_most_its_last_flush_interval_and_counts_it(
        fault_world: dict[str, Any]) -> None:
    """The endpoint's worker (a replica's process) is SIGKILLed while requests keep coming. BentoML starts a new worker;
    the rows the dead one had answered but not yet shipped are lost, and only those: each lost row was answered within
    one flush interval (plus the time of one flush) before the kill. They are counted: the workers' counters live in
    BentoML's multiprocess Prometheus files, which outlive the process, so ``kiln_prediction_log_rows_total`` minus
    flushed, dropped and spilled rows counts them (and, at most, the rows of requests in flight to the dying worker and
    of a flush that landed in the instant before the kill)."""
    import re
    import signal
    import threading
    import time

    import psutil

    from kiln.predlog import list_log_objects, read_log_objects
    from kiln.settings import prediction_log_flush_seconds
    from tests.results import logged_rows, wait_for_flushed_log

    url, spec, root = fault_world["url"], fault_world["spec"], fault_world["state_root"]
    flush_s = prediction_log_flush_seconds()
    # Steady state first: after the outages above the shipper may still be backing off (up to a minute between tries),
    # and until one flush works, new rows wait in memory longer than a flush interval. One request shipped ends that.
    _post(url, _drifted(date(2026, 3, 6), 20, seed=45), spec)
    wait_for_flushed_log(url, FAULT, timeout_s=150)
    workers = {int(m.group(1)) for key in list_log_objects(root, FAULT)
               if (m := re.search(r"-(\d+)-\d+\.parquet$", key)) and psutil.pid_exists(int(m.group(1)))}
    assert len(workers) == 1, f"expected the one live worker among the log's replicas: {workers}"
    [worker] = workers
    before = set(read_log_objects(root, FAULT, list_log_objects(root, FAULT))["txn_id"].to_list())

    traffic = _drifted(date(2026, 3, 4), 4000, seed=47)
    from kiln.features import sample_rows

    rows = sample_rows(traffic, spec, n=traffic.height)
    answered: dict[str, float] = {}  # txn_id -> when its 200 came back
    failed: list[int] = []  # rows of requests that got no 200 (in flight to the dead worker, or while none was up)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            for i in range(0, len(rows), 20):
                if stop.is_set():
                    return
                batch = rows[i:i + 20]
                try:
                    response = http.post(f"{url}/predict", json={"rows": batch})
                except httpx.HTTPError:
                    failed.append(len(batch))
                    continue
                if response.status_code == 200:
                    now = time.monotonic()
                    answered.update({r["txn_id"]: now for r in batch})
                else:
                    failed.append(len(batch))
                time.sleep(0.1)  # a steady pace: the traffic before the kill spans many flush intervals

    sender = threading.Thread(target=client, daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while not answered and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(8 * flush_s + 2)  # then traffic for several flush intervals
    assert len(answered) >= 200, f"only {len(answered)} rows answered before the kill ({failed})"
    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(3)
    stop.set()
    sender.join(timeout=60)
    assert not sender.is_alive()

    # the new worker serves and ships what it answered; then nothing more changes in the log
    probe = _drifted(date(2026, 3, 5), 20, seed=49)
    deadline = time.monotonic() + 180
    while True:
        try:
            _post(url, probe, spec)
            break
        except (AssertionError, httpx.HTTPError):
            assert time.monotonic() < deadline, "no worker answers after the kill"
            time.sleep(0.5)
    answered.update({t: time.monotonic() for t in probe["txn_id"].to_list()})
    stable, last = 0, -1
    deadline = time.monotonic() + 120
    while stable < 4:
        now = logged_rows(root, FAULT)
        stable = stable + 1 if now == last else 0
        last = now
        assert time.monotonic() < deadline, "the prediction log keeps changing"
        time.sleep(flush_s)

    logged = set(read_log_objects(root, FAULT, list_log_objects(root, FAULT))["txn_id"].to_list()) - before
    assert logged <= set(answered), "a row in the log that was never answered"
    lost = set(answered) - logged
    bound = flush_s + 1.0  # one flush interval, plus one flush's time (a PUT to S3)
    older = [t for t in answered if answered[t] < killed_at - bound]
    assert len(older) >= 100, f"too little traffic before the last flush interval to tell: {len(older)} rows"
    too_old = [t for t in lost if answered[t] < killed_at - bound]
    assert not too_old, f"{len(too_old)} lost rows (of {len(lost)}) were answered more than {bound}s before the kill"

    series = _metrics(url, FAULT)
    counted = (series["kiln_prediction_log_rows_total"] - series["kiln_prediction_log_flushed_rows_total"]
               - series.get("kiln_prediction_log_dropped_rows_total", 0.0) - series.get("kiln_prediction_log_spilled_rows", 0.0))
    # Every lost row is counted. The count is exact but for rows the worker had logged and not yet counted as flushed
    # when it died: a request in flight (logged, never answered) or a flush whose object landed just before the kill.
    recent = [t for t in answered if killed_at - bound <= answered[t] <= killed_at]
    assert len(lost) <= counted <= len(recent) + sum(failed), (series, len(lost), len(recent), sum(failed))
