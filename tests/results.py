"""Lifecycle tests' shared pieces: a trained fraud endpoint of a test's own, and reading a Dagster run's results (a
stage's last materialization, a check's last evaluation)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any


@contextmanager
def fraud_endpoint(spec_dir: Path, name: str, *, days: int, rows: int, seed: int, edit: Callable[[dict[str, Any]], None],
                   api_key: str | None = None) -> Iterator[dict[str, Any]]:
    """The fraud pipeline under its own ``name`` (and source folder), its spec changed by ``edit``, simulated for ``days``
    of ``rows`` rows from 2026-01-01, ingested and retrained into a live local endpoint; shut down on exit.

    Yields spec, defs, instance, serving, folder (the source folder), trained (the retrain result), rows (the reference
    sample rows) and url. ``KILN_PIPELINES_DIR`` (and ``KILN_API_KEY``, given ``api_key``) are set while it is open."""
    import dagster as dg
    import yaml

    from kiln.spec import load_spec, spec_data
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources
    from tests.conftest import FRAUD_SPEC

    data = spec_data(FRAUD_SPEC)
    data["name"] = name
    data["source"]["path"] = name
    edit(data)
    (spec_dir / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    if api_key is not None:
        os.environ["KILN_API_KEY"] = api_key
    serving = resources("local")["serving"]
    try:
        spec = load_spec(spec_dir / f"{name}.yaml")
        defs = build_definitions([spec])
        folder = local_paths()["sources"] / spec.source.path
        simulate(spec, folder, days, rows, seed=seed, start=date(2026, 1, 1))
        instance = dg.DagsterInstance.get()
        assert all(r.success for r in ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None))
        trained = retrain(defs, spec, instance, progress=lambda _: None)
        assert trained.success
        sample = (local_paths()["state"] / "reference" / name / "sample_rows.json").read_text()
        state = serving.state(name)
        assert state and state.get("url"), state
        yield {"spec": spec, "defs": defs, "instance": instance, "serving": serving, "folder": folder, "trained": trained,
               "rows": json.loads(sample), "url": state["url"]}
    finally:
        serving.shutdown(name)
        os.environ.pop("KILN_PIPELINES_DIR", None)
        if api_key is not None:
            os.environ.pop("KILN_API_KEY", None)


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
