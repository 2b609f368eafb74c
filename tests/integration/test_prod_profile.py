"""`fraud` end to end in KILN_PROFILE=prod on real services: Postgres run storage, an MLflow tracking server
(Postgres backend, S3 artifacts), sources, asset values and exported bentos on S3 (moto), and a live `bentoml serve`
endpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import BUCKET, DAYS, ROWS


def _keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_every_run_succeeded_and_is_in_postgres_run_storage(prod_world: dict[str, Any], services: dict[str, Any]) -> None:
    results = [*prod_world["ingested"], prod_world["trained"]]
    assert len(prod_world["ingested"]) == 1  # the days are one run over their partition range (single-run backfill)
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
    raws = [e.step_materialization_data.materialization for e in prod_world["ingested"][0].get_asset_materialization_events()
            if e.asset_key.path[-1] == "raw"]
    assert sorted(m.partition for m in raws) == sorted(prod_world["partitions"])
    assert raws[0].metadata["rows_by_partition"].value == {p: ROWS for p in prod_world["partitions"]}


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


def test_bento_exported_to_s3_imports_with_the_same_tag(prod_world: dict[str, Any], services: dict[str, Any],
                                                        tmp_path: Path) -> None:
    s3 = services["s3"]
    [event] = [e for e in prod_world["trained"].get_asset_materialization_events() if e.asset_key.path[-1] == "bento"]
    metadata = event.step_materialization_data.materialization.metadata
    tag, model_tag = metadata["bento"].value, metadata["bento_model"].value
    uri, sha256 = metadata["export_uri"].value, metadata["export_sha256"].value
    key = f"storage/bentos/fraud/{tag.replace(':', '-')}.bento"
    assert uri == f"s3://{BUCKET}/{key}"
    assert key in _keys(s3, "storage/bentos/fraud/")
    assert s3.head_object(Bucket=BUCKET, Key=key)["Metadata"]["sha256"] == sha256
    copy = tmp_path / "downloaded.bento"
    s3.download_file(BUCKET, key, str(copy))
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha256
    # An image build imports it into its own, empty BentoML store: the same bento, with its model inside.
    script = "import bentoml, sys; print(bentoml.bentos.import_bento(sys.argv[1]).tag); print(bentoml.models.get(sys.argv[2]).tag)"
    proc = subprocess.run([sys.executable, "-c", script, str(copy), model_tag], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"BENTOML_HOME": str(tmp_path / "bentoml")}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == [tag, model_tag]
