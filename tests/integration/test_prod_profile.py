"""`fraud` end to end in KILN_PROFILE=prod on real services: Postgres run storage, an MLflow tracking server
(Postgres backend, S3 artifacts), sources and asset values on S3 (moto), and a live `bentoml serve` endpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import BUCKET, DAYS, ROWS


def _keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_every_run_succeeded_and_is_in_postgres_run_storage(prod_world: dict[str, Any], services: dict[str, Any]) -> None:
    results = [*prod_world["ingested"], prod_world["trained"]]
    assert len(prod_world["ingested"]) == DAYS
    assert all(r.success for r in results)
    rows = dict(services["pg"].query("dagster", "SELECT run_id, status FROM runs"))
    for result in results:
        assert rows.get(result.run_id) == "SUCCESS", f"run {result.run_id} not recorded as SUCCESS in Postgres: {rows}"
    events = services["pg"].query("dagster", "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                                  (prod_world["trained"].run_id, "ASSET_MATERIALIZATION"))
    assert events[0][0] >= 5  # features, model, champion, bento, endpoint


def test_model_in_the_mlflow_server_registry_with_champion_alias(prod_world: dict[str, Any], services: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from resources.mlflow import CHECKSUM_TAG, artifact_sha256

    model = prod_world["trained"].output_for_node("fraud__model")
    client = MlflowClient(tracking_uri=services["mlflow"].url, registry_uri=services["mlflow"].url)
    champion = client.get_model_version_by_alias("fraud", "champion")
    assert str(champion.version) == model["version"]
    assert champion.tags["dagster_run_id"] == prod_world["trained"].run_id
    assert champion.tags[CHECKSUM_TAG] == artifact_sha256(f"models:/fraud/{champion.version}")
    # the MLflow server stores its registry in Postgres
    assert services["pg"].query("mlflow", "SELECT name, alias, version FROM registered_model_aliases") == [
        ("fraud", "champion", int(model["version"]))]


def test_sources_asset_values_and_artifacts_are_in_s3(prod_world: dict[str, Any], services: dict[str, Any]) -> None:
    s3 = services["s3"]
    assert len(prod_world["source_keys"]) == DAYS
    assert set(prod_world["source_keys"]) <= set(_keys(s3, "sources/"))
    stored = _keys(s3, "storage/fraud/")
    for stage in ("raw", "validated"):
        assert {f"storage/fraud/{stage}/{p}.parquet" for p in prod_world["partitions"]} <= set(stored), stored
    for stage in ("features.parquet", "model.json", "champion.json", "bento.json", "endpoint.json"):
        assert f"storage/fraud/{stage}" in stored
    model = json.loads(s3.get_object(Bucket=BUCKET, Key="storage/fraud/model.json")["Body"].read())
    assert model["version"] == prod_world["trained"].output_for_node("fraud__model")["version"]
    artifacts = _keys(s3, "mlflow/")
    assert any(k.endswith("MLmodel") for k in artifacts), artifacts
    assert not any(Path(k).name.endswith(".tmp") for k in stored)
    raw = prod_world["ingested"][0].get_asset_materialization_events()[0].step_materialization_data.materialization
    assert raw.metadata["dagster/row_count"].value == ROWS


def test_live_endpoint_answers_predict(prod_world: dict[str, Any]) -> None:
    endpoint = prod_world["trained"].output_for_node("fraud__endpoint")
    assert endpoint["healthy"]
    sample = Path(os.environ["KILN_STATE_ROOT"]) / "reference" / "fraud" / "sample_rows.json"
    rows = json.loads(sample.read_text())[:5]
    response = httpx.post(f"{endpoint['url']}/predict", json={"rows": rows}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 5 and all(0.0 <= p <= 1.0 for p in body["predictions"])
    assert body["model_version"] == prod_world["trained"].output_for_node("fraud__model")["version"]
    checks = {e.check_name: e.passed for e in prod_world["trained"].get_asset_check_evaluations()}
    assert checks.get("live_smoke_test") is True and checks.get("champion_gate") is True
