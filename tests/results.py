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


def logged_rows(state_root: str, pipeline: str) -> int:
    """Rows in a pipeline's prediction-log objects (from their footers; tests keep the log small)."""
    from kiln.predlog import list_log_objects, log_object_stats

    return sum(s["rows"] for s in log_object_stats(state_root, pipeline, list_log_objects(state_root, pipeline)))


def wait_for_logged_rows(state_root: str, pipeline: str, rows: int, timeout_s: float = 60.0) -> int:
    """Wait until the endpoint's shipper has put ``rows`` rows in the log's objects (it flushes every
    ``KILN_PREDICTION_LOG_FLUSH_SECONDS``); fails naming what it saw when they do not arrive within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    seen = logged_rows(state_root, pipeline)
    while seen < rows and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = logged_rows(state_root, pipeline)
    assert seen >= rows, f"{pipeline}: {seen} rows in the prediction log after {timeout_s:.0f}s, expected {rows}"
    return seen


def wait_for_flushed_log(url: str, pipeline: str, timeout_s: float = 60.0) -> float:
    """Wait until every row the endpoint (champion backend, through the router's ``/metrics``) logged is in the store:
    ``kiln_prediction_log_rows_total`` = flushed + dropped and none spilled; returns the flushed rows. No timing guess:
    a row is counted as logged before its request is answered."""
    import re
    import time

    import httpx

    def series() -> dict[str, float]:
        found: dict[str, float] = {}
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for name, labels, value in re.findall(r"^(kiln_prediction_log_\w+)\{([^}]*)\} (\S+)$", text, flags=re.M):
            if f'pipeline="{pipeline}"' in labels:
                found[name] = found.get(name, 0.0) + float(value)
        return found

    deadline = time.monotonic() + timeout_s
    while True:
        got = series()
        appended, flushed = got.get("kiln_prediction_log_rows_total", 0.0), got.get("kiln_prediction_log_flushed_rows_total", 0.0)
        dropped, spilled = got.get("kiln_prediction_log_dropped_rows_total", 0.0), got.get("kiln_prediction_log_spilled_rows", 0.0)
        if appended == flushed + dropped and spilled == 0:
            return flushed
        assert time.monotonic() < deadline, f"{pipeline}: prediction log not flushed after {timeout_s:.0f}s: {got}"
        time.sleep(0.1)
