"""Service failures in the prod profile on real services, each checked for lost or corrupted state:
S3 unreachable, MLflow server stopped during training, a corrupted model artifact, Postgres restarted during a run,
a step process SIGKILLed mid-registration, and two retrains of one pipeline requested at once."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.conftest import BUCKET


def _failures(result: Any) -> str:
    """Every step/run failure message of a run, causes included."""
    texts = []
    for event in result.all_events:
        if event.event_type_value in ("STEP_FAILURE", "RUN_FAILURE"):
            error = getattr(event.event_specific_data, "error", None)
            texts.append(error.to_string() if error is not None else str(event.message))
    return "\n".join(texts)


def _objects(s3: Any) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _client(services: dict[str, Any]) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=services["mlflow"].url, registry_uri=services["mlflow"].url)


def _registry(services: dict[str, Any]) -> tuple[dict[str, dict[str, str]], str]:
    """Every version of `fraud` with its tags, and the champion version."""
    client = _client(services)
    versions = {str(v.version): dict(v.tags) for v in client.search_model_versions("name='fraud'")}
    return versions, str(client.get_model_version_by_alias("fraud", "champion").version)


def test_s3_unreachable_fails_naming_bucket_and_key(prod_world: dict[str, Any], services: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.lifecycle import ingest

    partition = prod_world["partitions"][0]
    before = _objects(services["s3"])
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    [failed] = ingest(prod_world["defs"], prod_world["spec"], [partition], prod_world["instance"], progress=lambda _: None)
    monkeypatch.undo()
    assert not failed.success
    assert f"bucket '{BUCKET}', key 'sources/fraud/{partition}.parquet'" in _failures(failed)
    assert _objects(services["s3"]) == before  # nothing written, nothing lost
    [again] = ingest(prod_world["defs"], prod_world["spec"], [partition], prod_world["instance"], progress=lambda _: None)
    assert again.success


def test_mlflow_stopped_during_training_bounded_retries_no_stray_alias_rerun_succeeds(
        prod_world: dict[str, Any], services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.trainers.lightgbm
    from platform_defs.lifecycle import retrain

    stages = ("features", "model", "champion")
    versions, champion = _registry(services)
    stored = {k: v for k, v in _objects(services["s3"]).items() if k in ("storage/fraud/model.json", "storage/fraud/champion.json")}
    training, stopped = threading.Event(), threading.Event()
    real_train = kiln.trainers.lightgbm.train_lightgbm

    def train_while_the_server_stops(*args: Any, **kwargs: Any) -> Any:
        # The model step's MLflow run is open and the booster is about to fit: the server goes away right now.
        if not training.is_set():
            training.set()
            assert stopped.wait(timeout=120), "the test did not stop the MLflow server"
        return real_train(*args, **kwargs)

    monkeypatch.setattr(kiln.trainers.lightgbm, "train_lightgbm", train_while_the_server_stops)
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = retrain(prod_world["defs"], prod_world["spec"], prod_world["instance"], progress=lambda _: None,
                                    stages=stages)

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    try:
        assert training.wait(timeout=240), "the model step never started training"
        services["mlflow"].stop()
        stopped.set()
        worker.join(timeout=600)
        elapsed = time.monotonic() - started
    finally:
        stopped.set()
        services["mlflow"].start()  # same port, same Postgres and S3
    assert not worker.is_alive() and elapsed < 600
    failed = outcome["result"]
    assert not failed.success
    retries = [e for e in failed.all_events if e.event_type_value == "STEP_UP_FOR_RETRY" and e.step_key == "fraud__model"]
    assert len(retries) == 2  # KILN_STEP_RETRIES=2, then a clear failure
    text = _failures(failed)
    assert services["mlflow"].url.split("//")[1] in text or "Connection" in text, text[-2000:]
    assert not [e for e in failed.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
                and e.asset_key is not None and e.asset_key.path[-1] in ("model", "champion")]
    monkeypatch.undo()
    # The training run the server lost never became a version; no half-registered version, alias untouched; the stored
    # model and champion records are the previous ones; the failure is in Postgres run storage.
    assert _registry(services) == (versions, champion)
    assert {k: v for k, v in _objects(services["s3"]).items() if k in stored} == stored and len(stored) == 2
    assert dict(services["pg"].query("dagster", "SELECT run_id, status FROM runs"))[failed.run_id] == "FAILURE"
    rerun = retrain(prod_world["defs"], prod_world["spec"], prod_world["instance"], progress=lambda _: None, stages=stages)
    assert rerun.success, _failures(rerun)
    after, champion_after = _registry(services)
    assert all("kiln_sha256" in tags for tags in after.values())  # every version completed its registration
    assert champion_after in after and len(after) == len(versions) + 1


def test_corrupted_model_artifact_is_refused_and_old_endpoint_keeps_serving(prod_world: dict[str, Any],
                                                                           services: dict[str, Any]) -> None:
    from platform_defs.lifecycle import retrain
    from resources.mlflow import MlflowResource, verify_checksum

    s3 = services["s3"]
    endpoint = prod_world["trained"].output_for_node("fraud__endpoint")
    rows = json.loads((Path(os.environ["KILN_STATE_ROOT"]) / "reference" / "fraud" / "sample_rows.json").read_text())[:3]
    _, champion = _registry(services)
    model_id = getattr(_client(services).get_model_version("fraud", champion), "model_id", None) or ""
    keys = [k for k in _objects(s3) if k.startswith("mlflow/") and k.endswith("model.lgb") and model_id in k]
    assert keys, "the champion's model.lgb is not in S3"
    original = {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    for k in keys:
        s3.put_object(Bucket=BUCKET, Key=k, Body=b"tree\nnot a model\n")
    try:
        refused = retrain(prod_world["defs"], prod_world["spec"], prod_world["instance"], progress=lambda _: None, stages=("endpoint",))
        assert not refused.success
        assert "sha256" in _failures(refused) and "refusing" in _failures(refused)
        live = httpx.post(f"{endpoint['url']}/predict", json={"rows": rows}, timeout=30)
        assert live.status_code == 200 and live.json()["model_version"] == endpoint["model_version"]
    finally:
        for k, body in original.items():
            s3.put_object(Bucket=BUCKET, Key=k, Body=body)
    verify_checksum(MlflowResource(tracking_uri=services["mlflow"].url), "fraud", champion)  # intact again


def test_postgres_restarted_during_a_run_instance_stays_usable(prod_world: dict[str, Any], services: dict[str, Any]) -> None:
    from platform_defs.lifecycle import retrain

    instance, pg = prod_world["instance"], services["pg"]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = retrain(prod_world["defs"], prod_world["spec"], instance, progress=lambda _: None,
                                        stages=("features", "model", "champion"))
        except Exception as exc:  # a storage write that failed while Postgres was down
            outcome["error"] = exc

    runs_before = {r.run_id for r in instance.get_runs()}
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ({r.run_id for r in instance.get_runs()} - runs_before):
        time.sleep(0.2)
    pg.stop()
    pg.start()
    worker.join(timeout=600)
    assert not worker.is_alive()
    [new_run] = [r for r in instance.get_runs() if r.run_id not in runs_before]
    assert new_run.is_finished or "error" in outcome  # the run failed or finished cleanly; never silently lost
    rerun = retrain(prod_world["defs"], prod_world["spec"], instance, progress=lambda _: None, stages=("features", "model", "champion"))
    assert rerun.success, _failures(rerun)
    assert dict(pg.query("dagster", "SELECT run_id, status FROM runs"))[rerun.run_id] == "SUCCESS"
    versions, champion = _registry(services)
    assert champion in versions and all("kiln_sha256" in t for t in versions.values())


def _steps(events: Any, kind: str) -> set[str]:
    return {e.step_key for e in events if e.event_type_value == kind and e.step_key}


def test_step_process_sigkilled_mid_registration_reexecution_from_failure(
        prod_world: dict[str, Any], services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import signal

    import dagster as dg
    import psutil

    from resources.mlflow import ChecksumMismatch, MlflowResource, verify_checksum
    from tests.integration import prod_jobs

    instance, s3, pg = prod_world["instance"], services["s3"], services["pg"]
    marker = tmp_path / "model-step.json"
    monkeypatch.setenv("KILN_EXECUTOR", "multiprocess")  # every step in its own process, as in a k8s step Job
    monkeypatch.setenv("KILN_STEP_RETRIES", "0")  # no in-run retry: recovery is the re-execution
    monkeypatch.setenv(prod_jobs.KILL_MARKER_ENV, str(marker))
    versions, champion = _registry(services)
    stored_model = _objects(s3)["storage/fraud/model.json"]
    job = dg.reconstructable(prod_jobs.fraud_retrain)
    selection = [dg.AssetKey(["fraud", s]) for s in ("features", "model", "champion")]
    killed: dict[str, Any] = {}

    def kill_when_paused() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.1)
        if not marker.exists():
            return
        killed.update(json.loads(marker.read_text()))
        # Only ever a step process of this test's run: a descendant of this process.
        killed["ours"] = killed["pid"] in {c.pid for c in psutil.Process().children(recursive=True)}
        if killed["ours"]:
            os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    failed = dg.execute_job(job, instance=instance, asset_selection=selection)
    killer.join(timeout=30)
    assert killed.get("ours"), f"the model step never reached the checksum, or not in a child process: {killed}"
    assert not failed.success
    events = failed.all_events
    [worker] = [e for e in events if e.event_type_value == "STEP_WORKER_STARTED" and e.step_key == "fraud__model"]
    assert worker.event_specific_data.metadata["pid"].value == str(killed["pid"])  # the process Dagster ran the step in
    assert "fraud__model" in _steps(events, "STEP_FAILURE") and "signal 9 (SIGKILL)" in "\n".join(
        str(e.message) for e in events if e.event_type_value == "ENGINE_EVENT")
    assert _steps(events, "STEP_SUCCESS") == {"fraud__features"} and "fraud__champion" not in _steps(events, "STEP_START")
    assert dict(pg.query("dagster", "SELECT run_id, status FROM runs"))[failed.run_id] == "FAILURE"

    # Nothing half-done is visible as done: no model materialization, the stored value and the alias unchanged, and
    # the version killed before its checksum is refused by every consumer.
    assert not [e for e in events if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key.path[-1] != "features"]
    assert _objects(s3)["storage/fraud/model.json"] == stored_model
    half, champion_now = _registry(services)
    assert champion_now == champion and set(half) == set(versions) | {killed["version"]}
    assert "kiln_sha256" not in half[killed["version"]] and half[killed["version"]]["dagster_run_id"] == failed.run_id
    assert not _client(services).get_model_version("fraud", killed["version"]).aliases
    with pytest.raises(ChecksumMismatch, match="never completed"):
        verify_checksum(MlflowResource(tracking_uri=services["mlflow"].url), "fraud", killed["version"])

    monkeypatch.delenv(prod_jobs.KILL_MARKER_ENV)
    again = dg.execute_job(job, instance=instance,
                           reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance))
    assert again.success, _failures(again)
    assert again.dagster_run.parent_run_id == failed.run_id
    assert _steps(again.all_events, "STEP_START") == {"fraud__model", "fraud__champion"}  # features is not rerun
    after, champion_after = _registry(services)
    assert killed["version"] not in after  # the re-execution discarded the half-registered version
    assert all("kiln_sha256" in tags for tags in after.values()) and len(after) == len(versions) + 1
    assert champion_after in after
    [new_version] = set(after) - set(versions)
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key="storage/fraud/model.json")["Body"].read())
    assert stored["version"] == new_version and after[new_version]["dagster_run_id"] == again.run_id
    assert dict(pg.query("dagster", "SELECT run_id, status FROM runs"))[again.run_id] == "SUCCESS"


QUEUED_STAGES = ("features", "model")  # a retrain that trains and registers; small enough for 2 cores


def _launch(context: Any, pipeline: str) -> str:
    """Request `<p>_retrain` (features, model) the way the UI does: GraphQL launchPipelineExecution."""
    from dagster_graphql.client.client_queries import CLIENT_SUBMIT_PIPELINE_RUN_MUTATION
    from dagster_graphql.test.utils import execute_dagster_graphql

    [location] = context.code_location_names
    variables = {"executionParams": {
        "selector": {"repositoryLocationName": location, "repositoryName": "__repository__",
                     "pipelineName": f"{pipeline}_retrain", "assetSelection": [{"path": [pipeline, s]} for s in QUEUED_STAGES]},
        "runConfigData": {}, "mode": "default"}}
    answer = execute_dagster_graphql(context, CLIENT_SUBMIT_PIPELINE_RUN_MUTATION, variables).data["launchPipelineExecution"]
    assert answer["__typename"] in ("LaunchRunSuccess", "LaunchPipelineRunSuccess"), answer
    return str(answer["run"]["runId"])


def test_two_retrains_of_one_pipeline_one_waits_another_pipeline_runs_in_parallel(
        prod_world: dict[str, Any], services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import yaml
    from dagster import DagsterRunStatus, RunsFilter
    from dagster_graphql.test.utils import define_out_of_process_context

    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest
    from tests.integration.conftest import DEPLOY_DAGSTER_YAML

    instance = prod_world["instance"]
    assert {"key": "kiln/retrain", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in yaml.safe_load(
        DEPLOY_DAGSTER_YAML.read_text())["concurrency"]["runs"]["tag_concurrency_limits"]
    # A second pipeline (same source files, its own assets, registry entry and retrain job), ingested for one day.
    specs = tmp_path / "pipelines"
    specs.mkdir()
    data = yaml.safe_load((Path(os.environ["KILN_PIPELINES_DIR"]) / "fraud.yaml").read_text())
    (specs / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    data |= {"name": "fraud_b", "serving": data["serving"] | {"port": free_port()}}
    (specs / "fraud_b.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    other = load_spec(specs / "fraud_b.yaml")
    [ingested] = ingest(build_definitions([other], "prod"), other, prod_world["partitions"][-1:], instance, progress=lambda _: None)
    assert ingested.success, _failures(ingested)
    versions, champion = _registry(services)

    # The code location is the repo's workspace.yaml (platform_defs.definitions) in the prod profile; runs are
    # launched by the instance's run launcher into local processes (no cluster: in-process executor).
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(specs))
    monkeypatch.setenv("KILN_EXECUTOR", "in_process")
    workspace = Path(__file__).resolve().parents[2] / "workspace.yaml"
    finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    # The daemon below would also tick the pipelines' sensors (declared running), whose ingest runs would join the queue.
    for sensor in build_definitions([load_spec(p) for p in sorted(specs.glob("*.yaml"))], "prod").sensors or []:
        _dagster("dagster", "sensor", "stop", sensor.name, "-w", str(workspace))
    with define_out_of_process_context(str(workspace), None, instance) as context:
        first, second, parallel = _launch(context, "fraud"), _launch(context, "fraud"), _launch(context, "fraud_b")
        ids = [first, second, parallel]

        def statuses() -> dict[str, DagsterRunStatus]:
            return {r.run_id: r.status for r in instance.get_runs(RunsFilter(run_ids=ids))}

        assert set(statuses().values()) == {DagsterRunStatus.QUEUED}  # requests wait for the daemon
        assert instance.get_run_by_id(second).tags["kiln/retrain"] == "fraud"
        # The queued-run coordinator as deployed: `dagster-daemon run` on this instance and workspace.
        daemon = _daemon(tmp_path, workspace)
        try:
            now = statuses()
            deadline = time.monotonic() + 180
            while now[first] == DagsterRunStatus.QUEUED or now[parallel] == DagsterRunStatus.QUEUED:
                assert time.monotonic() < deadline, f"the daemon did not dequeue within 180s: {now}\n{_tail(tmp_path)}"
                time.sleep(0.5)
                now = statuses()
            # fraud's first retrain and fraud_b's retrain left the queue; fraud's second waits.
            assert now[second] == DagsterRunStatus.QUEUED, now
            held = 0
            deadline = time.monotonic() + 480
            while not finished >= set(now.values()):
                if now[first] not in finished:
                    assert now[second] == DagsterRunStatus.QUEUED, now  # never two retrains of fraud at once
                    held += 1
                assert time.monotonic() < deadline, f"runs not finished within 480s: {now}"
                time.sleep(1.0)
                now = statuses()
        finally:
            for run_id, status in statuses().items():
                if status not in finished:
                    instance.run_launcher.terminate(run_id)
            _stop(daemon)
    assert held >= 2
    failures = {i: _failures_of(instance, i) for i in ids if now[i] != DagsterRunStatus.SUCCESS}
    assert not failures, failures
    records = {i: instance.get_run_record_by_id(i) for i in ids}
    assert records[second].start_time >= records[first].end_time  # it ran after the first, not beside it
    assert records[parallel].start_time < records[first].end_time  # the other pipeline did not wait
    # Nothing lost: each retrain registered one complete version under its own run; fraud's champion is untouched.
    after, champion_after = _registry(services)
    new = {v: t for v, t in after.items() if v not in versions}
    assert sorted(t["dagster_run_id"] for t in new.values()) == sorted([first, second])
    assert all("kiln_sha256" in t for t in after.values()) and champion_after == champion
    [other_version] = _client(services).search_model_versions("name='fraud_b'")
    assert other_version.tags["dagster_run_id"] == parallel and other_version.tags.get("kiln_sha256")
    rows = dict(services["pg"].query("dagster", "SELECT run_id, status FROM runs"))
    assert [rows[i] for i in ids] == ["SUCCESS"] * 3 and "QUEUED" not in rows.values()


def _dagster(*args: str) -> None:
    """Run a Dagster CLI command on the test's instance (DAGSTER_HOME) and environment; fail with its output."""
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


def _daemon(tmp_path: Path, workspace: Path) -> Any:
    """`dagster-daemon run` on the test's instance and the workspace, logging to ``tmp_path/daemon.log``."""
    import subprocess
    import sys

    with (tmp_path / "daemon.log").open("ab") as log:
        return subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _tail(tmp_path: Path) -> str:
    log = tmp_path / "daemon.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""


def _stop(proc: Any) -> None:
    """Stop a process group started with start_new_session (the daemon and the code server it started)."""
    from kiln.process import stop_group

    stop_group(proc.pid, timeout_s=60)
    proc.wait(timeout=10)  # already reaped: only records the return code


def _failures_of(instance: Any, run_id: str) -> str:
    """Step and run failure messages of a run from the event log."""
    from dagster import DagsterEventType

    texts = []
    for kind in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE):
        for record in instance.get_records_for_run(run_id, of_type=kind).records:
            event = record.event_log_entry.dagster_event
            error = getattr(event.event_specific_data, "error", None)
            texts.append(error.to_string() if error is not None else str(event.message))
    return "\n".join(texts)
