"""Reading a Dagster run's results in lifecycle tests: a stage's last materialization, a check's last evaluation."""

from __future__ import annotations

from typing import Any


def materialization(result: Any, pipeline: str, stage: str) -> Any:
    """The last materialization of `<pipeline>/<stage>` in an ``ExecuteInProcessResult`` (fails the test if none)."""
    import dagster as dg

    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey([pipeline, stage])]
    assert events, f"{pipeline}/{stage} was not materialized"
    return events[-1].step_materialization_data.materialization


def partition_materializations(results: list[Any], pipeline: str, stage: str) -> dict[str, Any]:
    """The last materialization of each partition of `<pipeline>/<stage>` over runs (a range run has one per day)."""
    import dagster as dg

    found: dict[str, Any] = {}
    for result in results:
        for e in result.get_asset_materialization_events():
            if e.asset_key == dg.AssetKey([pipeline, stage]):
                m = e.step_materialization_data.materialization
                found[m.partition] = m
    return found


def check_evaluation(result: Any, name: str) -> Any:
    """The last evaluation of the asset check ``name`` (fails the test if it did not run)."""
    evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    assert evaluations, f"check {name} did not run"
    return evaluations[-1]


def served_matches_offline(url: str, rows: list[dict[str, Any]], spec: Any, version: str) -> Any:
    """POST rows to a live endpoint; assert it answers 200 from ``version`` with the registered model's offline
    predictions of the same rows (features computed as in training); returns those predictions."""
    import httpx
    import numpy as np

    from kiln.features import compute_features
    from kiln.trainers import load_predictor
    from serving.requests import parse_rows

    response = httpx.post(f"{url}/predict", json={"rows": rows}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == version
    offline = load_predictor(f"models:/{spec.name}/{version}", spec).predict(compute_features(parse_rows(rows, spec, 1000), spec))
    np.testing.assert_allclose(body["predictions"], offline, rtol=0, atol=1e-12)
    return offline
