"""Pure parts of the drift loop: the Bonferroni noise bound, per-column thresholds, the windows reader, run keys,
the model reference with the prediction score, the drift report, and rollback planning against a real MLflow registry."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from kiln.drift import bin_counts, build_reference, column_scores, column_thresholds, decide, null_critical


def test_null_critical_matches_the_chi_square_quantile() -> None:
    from scipy.stats import chi2

    for bins, n, n_ref, tests in [(11, 600, 10_000, 17), (4, 500, 10_000, 1), (101, 100_000, 1_000_000, 20)]:
        exact = chi2.ppf(1 - 0.01 / tests, bins - 1) * (1 / n + 1 / n_ref)
        assert null_critical(bins, n, n_ref, alpha=0.01, tests=tests) == pytest.approx(exact, rel=0.02)
    js = null_critical(11, 600, 10_000, alpha=0.01, tests=17, method="js")
    assert js == pytest.approx(null_critical(11, 600, 10_000, alpha=0.01, tests=17) / (8 * np.log(2)))
    with pytest.raises(ValueError, match="alpha"):
        null_critical(11, 600, 10_000, alpha=0.0, tests=1)


def test_bonferroni_bound_stops_false_alarms_in_small_noisy_windows() -> None:
    rng = np.random.default_rng(0)
    ref = pl.DataFrame({f"x{i}": rng.normal(0, 1, 20_000) for i in range(30)})
    reference = build_reference(ref, numeric=list(ref.columns), categorical={}, bins=20)
    alarms_plain = alarms_bonferroni = 0
    for seed in range(20):
        window = pl.DataFrame({f"x{i}": np.random.default_rng(seed + 1).normal(0, 1, 60) for i in range(30)})
        counts = bin_counts(window, reference)
        scores = column_scores(reference, counts)
        limits = column_thresholds(reference, counts["n"], 0.2, alpha=0.01)
        assert all(v > 0.2 for v in limits.values())  # 60 rows in 21 bins: noise alone gives PSI ~0.3
        kwargs: dict[str, Any] = dict(threshold=0.2, min_samples=50, consecutive_windows=1, cooldown_seconds=0,
                                      drifted_feature_share=0.3)
        alarms_plain += decide(scores, counts["n"], {}, 0.0, **kwargs)[0]["action"] == "retrain"
        alarms_bonferroni += decide(scores, counts["n"], {}, 0.0, thresholds=limits, **kwargs)[0]["action"] == "retrain"
    assert alarms_plain >= 10 and alarms_bonferroni == 0
    # A real shift still counts at the same size.
    shifted = pl.DataFrame({f"x{i}": np.random.default_rng(99).normal(1.5 if i < 15 else 0, 1, 60) for i in range(30)})
    counts = bin_counts(shifted, reference)
    decision, _ = decide(column_scores(reference, counts), counts["n"], {}, 0.0, threshold=0.2, min_samples=50,
                         consecutive_windows=1, cooldown_seconds=0, drifted_feature_share=0.3,
                         thresholds=column_thresholds(reference, counts["n"], 0.2, alpha=0.01))
    assert decision["action"] == "retrain" and decision["share"] >= 0.3


def test_prediction_score_drift_alone_triggers() -> None:
    scores = {"a": 0.0, "b": 0.01, "_prediction": 0.5}
    decision, _ = decide(scores, 1000, {}, 0.0, threshold=0.2, min_samples=500, consecutive_windows=1, cooldown_seconds=0,
                         drifted_feature_share=0.5, score_key="_prediction", thresholds={"_prediction": 0.3})
    assert decision["action"] == "retrain" and decision["prediction_drift"] is True
    decision, _ = decide(scores, 1000, {}, 0.0, threshold=0.2, min_samples=500, consecutive_windows=1, cooldown_seconds=0,
                         drifted_feature_share=0.5, score_key="_prediction", thresholds={"_prediction": 0.6})
    assert decision["action"] == "ok"


def test_windows_reader_resumes_after_the_cursor_key_and_skips_unfinished_writes(tmp_path: Path) -> None:
    from kiln import paths
    from kiln.windows import read_new_windows, store_window

    root = str(tmp_path)
    assert read_new_windows(root, "p", None) == ([], None)
    a = store_window(root, "p", {"window_id": "a", "until": 10.5})
    b = store_window(root, "p", {"window_id": "b", "until": 9.0})  # an earlier window, stored later: sorts first
    assert b < a and a.startswith("0000000010.500000-") and a.endswith(".json")
    windows, cursor = read_new_windows(root, "p", None)
    assert [w["window_id"] for w in windows] == ["b", "a"] and cursor == a
    assert read_new_windows(root, "p", cursor) == ([], a)
    folder = tmp_path / paths.windows_dir("p")
    (folder / "0000000011.000000-deadbeef.json.tmp").write_text('{"window_id": "half')  # a write still in progress
    assert read_new_windows(root, "p", cursor) == ([], a)
    c = store_window(root, "p", {"window_id": "c", "until": 11.0})
    windows, cursor2 = read_new_windows(root, "p", cursor)
    assert [w["window_id"] for w in windows] == ["c"] and cursor2 == c
    for stored in folder.glob("*.json"):  # the store was reset: a cursor newer than every window starts over
        stored.unlink()
    store_window(root, "p", {"window_id": "z", "until": 1.0})
    assert [w["window_id"] for w in read_new_windows(root, "p", cursor2)[0]] == ["z"]


def test_run_key_differs_per_window_and_model_version() -> None:
    from kiln.windows import run_key

    keys = {run_key("fraud", w, v) for w in ("w1", "w2") for v in (["1"], ["2"], ["1", "2"])}
    assert len(keys) == 6
    assert run_key("fraud", "w1", ["1"]) == run_key("fraud", "w1", ["1"])


def _fraud_spec() -> Any:
    from kiln.spec import load_spec
    from tests.conftest import FRAUD_SPEC

    return load_spec(FRAUD_SPEC)


def test_training_reference_profiles_features_and_the_prediction_score(tmp_path: Path) -> None:
    from kiln.drift_report import write_report
    from kiln.features import compute_features
    from kiln.reference import PREDICTION, reference_id, training_reference
    from kiln.windows import window_counts
    from platform_defs.simulators.fraud import generate_day

    spec = _fraud_spec()
    source = generate_day(date(2026, 1, 1), 3000, 1, 0.0)
    features = compute_features(source, spec).with_columns(is_fraud=source["is_fraud"])
    predictions = np.random.default_rng(0).beta(1, 20, features.height)
    reference = training_reference(spec, features, predictions)
    assert PREDICTION in reference["numeric"] and sum(reference["numeric"][PREDICTION]["counts"]) == 3000
    assert reference["categorical"]["channel"]["categories"] == ["pos", "online", "atm"]
    assert sum(reference["categorical"]["channel"]["counts"][:3]) == 3000  # decoded back to raw values, no `other`
    assert reference_id(reference) == reference_id(json.loads(json.dumps(reference)))

    drifted = generate_day(date(2026, 2, 1), 2000, 2, 1.0)
    with pytest.raises(KeyError, match="_prediction"):
        window_counts(spec, drifted, reference)
    logged = drifted.with_columns(pl.Series(PREDICTION, np.random.default_rng(1).beta(2, 5, drifted.height)))
    window = {"window_id": "1.5-2.5", "counts": window_counts(spec, logged, reference)}
    report = write_report(spec, reference, window, tmp_path, {"drifted_columns": ["amount"]})
    assert report["image"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["image"].stat().st_size > 10_000
    rows = {r["column"]: r for r in report["rows"]}
    assert rows[PREDICTION]["psi"] > 0.5 and rows["amount"]["drifted"] and rows["amount"]["psi"] > 0.2
    assert json.loads(report["table"].read_text())["n"] == 2000


def test_rollback_plan_uses_the_champion_history(tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from platform_defs.rollback import RollbackError, plan

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(uri)
    client.create_registered_model("demo")
    exp = client.create_experiment("demo", artifact_location=str(tmp_path / "artifacts"))
    versions = []
    for _ in range(3):
        run = client.create_run(exp)
        versions.append(str(client.create_model_version("demo", f"runs:/{run.info.run_id}/model", run.info.run_id).version))
    with pytest.raises(RollbackError, match="no model version holds alias"):
        plan(client, "demo", None)
    client.set_registered_model_alias("demo", "champion", versions[0])
    with pytest.raises(RollbackError, match="first champion"):
        plan(client, "demo", None)
    client.set_registered_model_alias("demo", "champion", versions[2])
    client.set_model_version_tag("demo", versions[2], "kiln.previous_champion", versions[0])
    current, target = plan(client, "demo", None)
    assert (str(current.version), str(target.version)) == (versions[2], versions[0])
    assert str(plan(client, "demo", versions[1])[1].version) == versions[1]
    with pytest.raises(RollbackError, match="no such registered model version"):
        plan(client, "demo", "99")
    with pytest.raises(RollbackError, match="already the champion"):
        plan(client, "demo", versions[2])


def test_the_prediction_log_sensor_launches_once_per_new_object(tmp_path: Path) -> None:
    """`<p>_prediction_log` watches a listing of the log's objects: each shipped object (a late one too) launches one
    `<p>_observe`, an unchanged listing none."""
    import time
    from types import SimpleNamespace

    import dagster as dg

    from kiln.predlog import log_prefix, object_key
    from kiln.spec import load_spec
    from sensors.drift import build_log_sensor
    from tests.conftest import FRAUD_SPEC

    spec = load_spec(FRAUD_SPEC).model_copy(update={"labels": None})

    @dg.job(name=f"{spec.name}_observe")
    def observe() -> None: ...

    sensor = build_log_sensor(spec, observe)
    storage = SimpleNamespace(state_root=str(tmp_path))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor: str | None) -> Any:
        return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}))

    def ship(replica: str, logged_at: float) -> str:
        key = object_key(logged_at, replica, 1)
        path = Path(log_prefix(str(tmp_path), spec.name)) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"_logged_at": [logged_at], "_prediction": [0.5]}).write_parquet(path)
        return key

    first = tick(None)
    assert not first.run_requests and "nothing logged" in (first.skip_message or "")
    now = time.time()
    key = ship("a", now)
    launched = tick(None)
    assert len(launched.run_requests) == 1 and launched.cursor == f"{key}#1"
    assert not tick(launched.cursor).run_requests  # nothing new
    ship("b", now - 60)  # a late object of another replica: a new count, one more observation
    again = tick(launched.cursor)
    assert len(again.run_requests) == 1 and again.cursor == f"{max(key, object_key(now - 60, 'b', 1))}#2"
