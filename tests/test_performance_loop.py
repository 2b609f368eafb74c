"""Retrain decisions that make sense, through the real assets, endpoint and drift sensor (local profile).

A fraud pipeline with a ``labels:`` section trains a champion and serves it over `bentoml serve`. Then:
1. drifted traffic alone (no new labeled rows in the source) makes the drift rule fire, but no retrain is launched: the
   sensor records "drift detected; no new labeled data; retrain skipped" as a decision and an observation;
2. two new labeled days reach `validated` and labels arrive for the served traffic showing a real drop: the sensor
   launches exactly one `<p>_retrain`, named after the realized-performance signal, and it trains on the new rows;
3. a retrain on unchanged data ties the champion and is not promoted.
The sensor is evaluated with Dagster's public ``build_sensor_context`` (no daemon); everything else is the real thing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest

from tests.conftest import free_port
from tests.results import fraud_endpoint

NAME = "perf"
DAYS = 4
ROWS = 3000
BATCH = 600  # rows per window: above drift.min_samples (500)


@pytest.fixture(scope="module")
def world(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from platform_defs.profiles import local_paths, resources

    def edit(data: dict[str, Any]) -> None:
        data["serving"].update(port=free_port(), workers=1)
        data["trainer"]["params"]["num_boost_round"] = 60
        data["labels"] = {"path": f"{NAME}_labels", "key": "txn_id", "label": "is_fraud", "event_time": "labeled_at"}
        data["drift"].update(min_samples=500, consecutive_windows=2, cooldown_minutes=60)
        data["retrain"] = {"min_new_rows": 1000, "consecutive_windows": 2, "realized_drop": 0.02}

    with fraud_endpoint(tmp_path_factory.mktemp("perf-pipelines"), NAME, days=DAYS, rows=ROWS, seed=8, edit=edit) as world:
        yield world | {"state": str(local_paths()["state"]), "labels": local_paths()["sources"] / f"{NAME}_labels",
                       "first": world["trained"].output_for_node(f"{NAME}__model"), "cursor": None,
                       "mlflow": resources("local")["mlflow"]}


def _serve(world: dict[str, Any], frame: pl.DataFrame) -> None:
    """POST the rows to the live endpoint in windows of BATCH rows, observing (`<p>_observe`) after each."""
    from kiln.features import sample_rows
    from tests.results import logged_rows, wait_for_flushed_log, wait_for_logged_rows

    url = world["serving"].state(NAME)["url"]
    wait_for_flushed_log(url, NAME)  # rows of earlier requests (the smoke check) are shipped before the first window
    for i in range(0, frame.height, BATCH):
        rows = sample_rows(frame.slice(i, BATCH), world["spec"], n=BATCH)
        logged = logged_rows(world["state"], NAME)
        response = httpx.post(f"{url}/predict", json={"rows": rows}, timeout=60)
        assert response.status_code == 200, response.text
        wait_for_logged_rows(world["state"], NAME, logged + BATCH)  # shipped as objects before it is observed
        _observe(world)


def _observe(world: dict[str, Any]) -> Any:
    result = world["defs"].resolve_job_def(f"{NAME}_observe").execute_in_process(instance=world["instance"])
    assert result.success
    return result


def _tick(world: dict[str, Any]) -> Any:
    sensor = next(s for s in world["defs"].sensors if s.name == f"{NAME}_drift")
    context = dg.build_sensor_context(instance=world["instance"], cursor=world["cursor"],
                                      resources={"storage": world["defs"].resources["storage"]})
    result = sensor.evaluate_tick(context)
    world["cursor"] = result.cursor
    return result


def _drifted(day: date, rows: int, seed: int) -> pl.DataFrame:
    from platform_defs.simulators.fraud import generate_day

    # drift 1: inputs move and the label mechanism changes (concept drift): the champion gets worse
    return generate_day(day, rows, seed, 1.0).sample(fraction=1.0, shuffle=True, seed=seed)


def test_drift_without_new_labeled_rows_launches_no_retrain_and_says_why(world: dict[str, Any]) -> None:
    from kiln.windows import last_retrain_decision

    traffic = _drifted(date(2026, 3, 1), 2 * BATCH, seed=21)
    world["traffic"] = traffic
    _serve(world, traffic)
    result = _tick(world)
    assert not result.run_requests
    assert "drift detected" in result.skip_message and "no new labeled data (0 < min_new_rows 1000)" in result.skip_message
    assert result.skip_message.endswith("retrain skipped")
    decision = last_retrain_decision(world["state"], NAME)
    assert decision is not None and decision["launch"] is False and "drift" in decision["fired"]
    assert decision["new_labeled_rows"] == 0
    observed = [e for e in result.asset_events if "retrain_decision" in e.metadata]
    assert observed and observed[-1].metadata["retrain_decision"].value == "skipped"
    # every window carries the label-free estimate, with a band around it
    from kiln.windows import load_windows

    windows = load_windows(world["state"], NAME)
    estimate = windows[-1]["estimated"]["metrics"]["roc_auc"]
    assert estimate["lower"] <= estimate["value"] <= estimate["upper"] and windows[-1]["estimated"]["rows"] == BATCH
    # ... and `<p>/predictions` shows it against the training reference over time (a plot in the UI)
    event = world["instance"].get_latest_materialization_event(dg.AssetKey([NAME, "predictions"]))
    metadata = event.asset_materialization.metadata
    assert metadata["estimated_roc_auc"].value == estimate["value"] and "performance_plot" in metadata


def test_new_labeled_rows_and_a_realized_drop_launch_one_retrain_that_trains_on_them(world: dict[str, Any]) -> None:
    from kiln.windows import WINDOW_CURSOR, load_realized
    from platform_defs.lifecycle import ingest, simulate

    spec, instance = world["spec"], world["instance"]
    # two new labeled days reach validated (6,000 rows >= min_new_rows)
    new_days = simulate(spec, world["folder"], 2, ROWS, drift=1.0, seed=9)
    assert all(r.success for r in ingest(world["defs"], spec, [p.stem for p in new_days], instance, progress=lambda _: None))
    # the served traffic's labels arrive (plus a few for transactions never served: counted, not used)
    traffic = world["traffic"]
    stray = pl.DataFrame({"txn_id": [f"never-served-{i}" for i in range(5)], "is_fraud": [0] * 5})
    labels = pl.concat([traffic.select("txn_id", "is_fraud"), stray]).with_columns(
        pl.lit(datetime(2026, 3, 3, tzinfo=UTC)).alias("labeled_at"))
    world["labels"].mkdir(parents=True, exist_ok=True)
    labels.write_parquet(world["labels"] / "2026-03-03.parquet")
    observed = _observe(world)
    labels_event = next(e for e in observed.get_asset_materialization_events() if e.asset_key == dg.AssetKey([NAME, "labels"]))
    metadata = labels_event.step_materialization_data.materialization.metadata
    assert metadata["labels_matched"].value == traffic.height and metadata["labels_unmatched"].value == 5
    assert "performance_plot" in metadata
    realized = load_realized(world["state"], NAME)
    reference = world["first"]["score"]  # the gate metric (average precision); the signal uses roc_auc:
    reference_file = Path(world["state"]) / "reference" / NAME / "reference.json"
    reference_auc = json.loads(reference_file.read_text())["performance"]["reference"]["roc_auc"]
    aucs = [w["metrics"]["roc_auc"] for w in realized["windows"].values()]
    assert len(aucs) == 2 and all(a < reference_auc - 0.02 for a in aucs), (reference_auc, aucs, reference)

    # both are SLIs: `kiln slo` reads the estimate and the realized value of each window from the state store
    from platform_defs.slo import performance_trend

    trend = performance_trend(spec, Path(world["state"]))
    labeled = [w for w in trend["windows"] if w["realized"] is not None]
    assert len(labeled) == 2 and all(w["estimated"] is not None for w in labeled)
    assert trend["reference"] == reference_auc and trend["labels"]["unmatched"] == 5

    before = json.loads(world["cursor"])
    result = _tick(world)
    assert len(result.run_requests) == 1, result.skip_message
    # a tick on new labels alone (no new window) keeps the cursor's window position and drift state
    after = json.loads(world["cursor"])
    assert after[WINDOW_CURSOR] == before[WINDOW_CURSOR] and after["state"] == before["state"]
    request = result.run_requests[0]
    assert request.tags["kiln/trigger"] == "realized_performance"
    assert "realized_performance" in request.tags["kiln/retrain_signals"].split(",")
    assert "6000 new labeled rows" in request.tags["kiln/retrain_reason"]
    # the launched retrain trains on the new rows too
    run = world["defs"].resolve_job_def(f"{NAME}_retrain").execute_in_process(instance=instance, tags=request.tags)
    assert run.success
    features = next(e for e in run.get_asset_materialization_events() if e.asset_key == dg.AssetKey([NAME, "features"]))
    assert features.step_materialization_data.materialization.metadata["dagster/row_count"].value == (DAYS + 2) * ROWS
    model = run.output_for_node(f"{NAME}__model")
    client = world["mlflow"].client()
    trained_rows = int(client.get_run(model["run_id"]).data.params["train_rows"])
    assert trained_rows > int(client.get_run(world["first"]["run_id"]).data.params["train_rows"])
    # the same signal on the next tick does not launch a second retrain (cooldown)
    assert not _tick(world).run_requests
    world["retrained"] = run


def test_a_retrain_on_unchanged_data_ties_and_is_never_promoted(world: dict[str, Any]) -> None:
    before = str(world["mlflow"].client().get_model_version_by_alias(NAME, "champion").version)
    run = world["defs"].resolve_job_def(f"{NAME}_retrain").execute_in_process(instance=world["instance"])
    assert run.success
    gate = next(e for e in run.get_asset_materialization_events() if e.asset_key == dg.AssetKey([NAME, "champion"]))
    metadata = gate.step_materialization_data.materialization.metadata
    assert metadata["promoted"].value is False
    assert "not more than" in metadata["reason"].value or "already the champion" in metadata["reason"].value
    assert str(world["mlflow"].client().get_model_version_by_alias(NAME, "champion").version) == before
