"""Service failures in the prod profile on real services, each checked for lost or corrupted state:
S3 unreachable, MLflow server down, a corrupted model artifact, Postgres restarted during a run."""

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


def test_mlflow_down_bounded_retries_no_stray_alias_rerun_succeeds(prod_world: dict[str, Any], services: dict[str, Any]) -> None:
    from platform_defs.lifecycle import retrain

    stages = ("features", "model", "champion")
    versions, champion = _registry(services)
    services["mlflow"].stop()
    try:
        started = time.monotonic()
        failed = retrain(prod_world["defs"], prod_world["spec"], prod_world["instance"], progress=lambda _: None, stages=stages)
        elapsed = time.monotonic() - started
    finally:
        services["mlflow"].start()  # same port, same Postgres and S3
    assert not failed.success
    retries = [e for e in failed.all_events if e.event_type_value == "STEP_UP_FOR_RETRY" and e.step_key == "fraud__model"]
    assert len(retries) == 2  # KILN_STEP_RETRIES=2, then a clear failure
    text = _failures(failed)
    assert services["mlflow"].url.split("//")[1] in text or "Connection" in text, text[-2000:]
    assert elapsed < 600
    assert _registry(services) == (versions, champion)  # no new half-registered version, alias untouched
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
