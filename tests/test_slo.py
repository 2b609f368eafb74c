"""`kiln slo` against a live endpoint with known traffic: the request count, availability and p95 follow what was sent,
from the stored telemetry (kiln/telemetry.py), which a restart of the backend does not reset."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port

DAYS = 2
ROWS = 1500
SENT_OK = 40
SENT_BAD = 5
WAIT_S = 90.0  # a deadline against hangs while the workers flush their telemetry (every 0.5 s in tests), not a timing


@pytest.fixture(scope="module")
def live(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources

    spec_dir = tmp_path_factory.mktemp("slo-pipelines")
    data = spec_data(FRAUD_SPEC)
    data["name"] = "fraud_slo"
    data["source"]["path"] = "fraud_slo"
    data["serving"]["port"] = free_port()
    data["trainer"]["params"]["num_boost_round"] = 30
    (spec_dir / "fraud_slo.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    spec = load_spec(spec_dir / "fraud_slo.yaml")
    defs = build_definitions([spec])
    folder = local_paths()["sources"] / spec.source.path
    simulate(spec, folder, DAYS, ROWS, seed=13, start=date(2026, 1, 1))
    instance = dg.DagsterInstance.get()
    assert all(r.success for r in ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None))
    assert retrain(defs, spec, instance, progress=lambda _: None).success
    serving = resources("local")["serving"]
    try:
        yield {"spec": spec, "serving": serving, "kiln_home": kiln_home}
    finally:
        serving.shutdown(spec.name)  # the router and the backends it fronts
        os.environ.pop("KILN_PIPELINES_DIR", None)


def _slo(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    from platform_defs.cli import main

    assert main(["slo", "fraud_slo", "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def _wait_for(check: Callable[[], bool], what: str, seconds: float = WAIT_S) -> None:
    """Poll until true; fail naming what never happened (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"not within {seconds}s: {what}")


def _stored(live: dict[str, Any]) -> dict[str, Any]:
    """The endpoint SLIs from every telemetry object stored so far."""
    from kiln.telemetry import load_telemetry, slis

    return slis(load_telemetry(str(live["kiln_home"] / "state"), "fraud_slo", None, None))


def _live_requests(url: str) -> int:
    from platform_defs.slo import endpoint_sli

    return int(endpoint_sli(httpx.get(f"{url}/metrics", timeout=10).text)["requests"])


def _send(url: str, rows: list[dict[str, Any]], ok: int, bad: int) -> None:
    for _ in range(ok):
        assert httpx.post(f"{url}/predict", json={"rows": rows}, timeout=30).status_code == 200
    for _ in range(bad):  # a bad request is the client's fault (4xx): it does not cost availability
        assert httpx.post(f"{url}/predict", json={"rows": [{"amount": "x"}]}, timeout=30).status_code // 100 == 4


def _sample_rows(live: dict[str, Any]) -> list[dict[str, Any]]:
    return list(json.loads((live["kiln_home"] / "state" / "reference" / "fraud_slo" / "sample_rows.json").read_text())[:5])


def test_slo_counts_known_traffic(live: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    url = live["serving"].state("fraud_slo")["url"]
    rows = _sample_rows(live)
    # One backend has served so far: once its telemetry is flushed, the stored count is what it answered (smoke tests).
    _wait_for(lambda: _stored(live)["requests"] == _live_requests(url), "the stored telemetry to catch up with /metrics")
    before = _slo(capsys)
    assert before["endpoint"]["reachable"] is True and before["endpoint"]["source"] == "telemetry"
    _send(url, rows, SENT_OK, SENT_BAD)
    expected = before["endpoint"]["requests"] + SENT_OK + SENT_BAD
    _wait_for(lambda: _stored(live)["requests"] >= expected, f"{expected} stored requests")
    after = _slo(capsys)
    ep = after["endpoint"]
    assert ep["requests"] - before["endpoint"]["requests"] == SENT_OK + SENT_BAD
    assert ep["errors_4xx"] - before["endpoint"]["errors_4xx"] == SENT_BAD
    assert ep["rows"] - before["endpoint"]["rows"] == SENT_OK * len(rows)
    assert ep["errors_5xx"] == 0 and ep["availability"] == 1.0
    assert ep["p95_latency_s"] is not None and 0 < ep["p95_latency_s"] < 30
    assert 0 < ep["p50_ms"] <= ep["p95_ms"] <= ep["p99_ms"]
    assert ep["live"]["requests"] - before["endpoint"]["live"]["requests"] == SENT_OK + SENT_BAD  # the same backend
    cost = after["cost"]
    assert cost["predictions"] >= before["cost"]["predictions"] + SENT_OK * len(rows)
    assert cost["cpu_seconds"] > 0 and cost["cpu_seconds_per_1k_predictions"] > 0
    fresh = after["freshness"]
    assert fresh["files"] == DAYS and fresh["newest_partition"] == "2026-01-02" and fresh["age_hours"] >= 0
    assert after["training"]["runs"] == 0  # materialized directly, not through fraud_slo_retrain
    assert after["registry"]["promotions"] >= 1 and after["registry"]["rollbacks"] == 0
    assert after["registry"]["rollback_rate"] == 0.0 and after["registry"]["drift_to_new_champion_s"] is None  # no drift yet
    import dagster as dg

    observed = dg.DagsterInstance.get().fetch_observations(dg.AssetKey(["fraud_slo", "endpoint"]), limit=5).records
    assert len(observed) >= 2  # one per `kiln slo`
    latest = observed[0].asset_observation.metadata
    assert latest["sli/requests"].value == ep["requests"] and latest["sli/availability"].value == 1.0


def test_a_restarted_backend_does_not_reset_the_stored_slis(live: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from resources.serving import stop_backend

    serving = live["serving"]
    record = serving.state("fraud_slo")
    url, rows = record["url"], _sample_rows(live)
    _wait_for(lambda: _stored(live)["requests"] == _live_requests(url), "the stored telemetry to catch up with /metrics")
    base = _slo(capsys)["endpoint"]
    before_ok, before_bad, after_ok, after_bad = 12, 3, 8, 2
    _send(url, rows, before_ok, before_bad)
    _wait_for(lambda: _stored(live)["requests"] == base["requests"] + before_ok + before_bad, "the first requests stored")

    # Restart: the backend goes away (its workers shut down), a new one takes the router's traffic.
    stop_backend(serving.router_config("fraud_slo")["champion"])
    restarted = serving.deploy("fraud_slo", record["bento"], record["model_tag"], record["model_version"],
                               int(url.rsplit(":", 1)[1]))
    assert restarted["backend_pid"] != record["backend_pid"]
    _send(url, rows, after_ok, after_bad)
    total = before_ok + before_bad + after_ok + after_bad
    _wait_for(lambda: _stored(live)["requests"] >= base["requests"] + total, f"{total} more stored requests")

    ep = _slo(capsys)["endpoint"]
    assert ep["requests"] - base["requests"] == total  # the restart reset nothing
    assert ep["errors_4xx"] - base["errors_4xx"] == before_bad + after_bad
    assert ep["rows"] - base["rows"] == (before_ok + after_ok) * len(rows)
    assert ep["errors_5xx"] == 0 and ep["availability"] == 1.0
    assert ep["window"]["replicas"] >= 2  # the workers of both backends wrote telemetry
    assert ep["live"]["requests"] == after_ok + after_bad  # /metrics of the new backend saw only what came after


def test_telemetry_survives_a_store_outage_without_double_counting(tmp_path: Path) -> None:
    import prometheus_client as prom

    from kiln import paths
    from kiln.telemetry import list_telemetry_objects, load_telemetry, slis
    from serving.predlog import PredictionShipper

    root = tmp_path / "state"
    root.mkdir()
    shipper = PredictionShipper(str(root), "p", "r-1", spill_dir=tmp_path / "spill", start=False, retry_initial=0.0,
                                registry=prom.CollectorRegistry())
    assert shipper.flush() and list_telemetry_objects(str(root), "p") == []  # nothing counted: nothing written
    blocker = root / paths.TELEMETRY
    blocker.write_text("the store is down")  # a file where the telemetry folder must go: every write fails
    shipper.telemetry.request(200, 0.004, rows=5)
    shipper.telemetry.request(500, 0.2)
    shipper.flush()  # fails: the object is kept, nothing raises
    shipper.telemetry.request(404, 0.003, count=2)
    shipper.flush()
    blocker.unlink()
    shipper.telemetry.request(200, 3.0, rows=1)
    shipper.flush()
    keys = list_telemetry_objects(str(root), "p")
    assert len(keys) == 2  # the kept object under its own key, then everything counted since
    got = slis(load_telemetry(str(root), "p", None, None))
    assert (got["requests"], got["errors_4xx"], got["errors_5xx"], got["rows"]) == (5, 2, 1, 6)
    assert got["availability"] == 0.8
    shipper.close()


def test_registry_indicators_rollback_rate_and_drift_to_champion(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kiln.windows import record_decisions
    from platform_defs.slo import last_drift_retrain, registry_indicators

    assert last_drift_retrain("p", tmp_path) is None

    def tick(at: float, *actions: str) -> None:  # one drift-sensor tick's decisions, as the sensor records them
        decisions = [{"window": f"w{at}-{i}", "action": a, "n": 600, "max_score": 0.1, "share": 0.0, "streak": 0,
                      "drifted_columns": []} for i, a in enumerate(actions)]
        record_decisions(str(tmp_path), "p", decisions, {"action": actions[-1], "decided_at": at})

    tick(50, "wait")
    tick(100, "wait", "retrain")
    tick(130, "cooldown")
    assert last_drift_retrain("p", tmp_path) == 100.0

    def version(created_s: float, **tags: str) -> Any:
        return SimpleNamespace(creation_timestamp=created_s * 1000, tags=tags)

    registry = SimpleNamespace(search_model_versions=lambda _: [
        version(10, **{"kiln.promoted_by": "run a"}), version(160, **{"kiln.promoted_by": "run b"}),
        version(200, **{"kiln.promoted_by": "run c", "kiln.rolled_back_by": "ana"}), version(220)])
    got = registry_indicators(registry, "p", 100.0)
    assert got == {"model_versions": 4, "promotions": 3, "rollbacks": 1, "rollback_rate": 1 / 3, "drift_to_new_champion_s": 60.0}


def test_quantile_interpolates_within_the_bucket() -> None:
    from platform_defs.slo import quantile

    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.01)
    assert quantile(buckets, 0.95) == pytest.approx(0.1 + 0.9 * 0.5)
    assert quantile([], 0.95) is None


def test_drift_trend_scores_stored_windows(live: dict[str, Any], tmp_path: Path) -> None:
    import polars as pl

    from kiln.windows import window_counts
    from platform_defs.lifecycle import simulate
    from platform_defs.slo import drift_trend

    spec, state = live["spec"], live["kiln_home"] / "state"
    reference = json.loads((state / "reference" / spec.name / "reference.json").read_text())
    calm = pl.read_parquet(simulate(spec, tmp_path / "calm", 1, 1500, seed=21, start=date(2026, 1, 3))[0])
    drifted = pl.read_parquet(simulate(spec, tmp_path / "drifted", 1, 1500, drift=1.0, seed=22, start=date(2026, 1, 3))[0])
    import shutil

    from kiln import paths

    shutil.rmtree(state / paths.windows_dir(spec.name), ignore_errors=True)  # these two windows are the whole history
    from kiln.features import compute_features
    from kiln.trainers.lightgbm import load_booster, predict
    from platform_defs.profiles import resources

    resources("local")["mlflow"].client()  # points MLflow at the session registry
    booster = load_booster(f"models:/{spec.name}/{live['serving'].state(spec.name)['model_version']}")
    scored = [(name, frame.with_columns(pl.Series("_prediction", predict(booster, compute_features(frame, spec), spec))))
              for name, frame in (("calm", calm), ("drifted", drifted))]
    from kiln.windows import store_window

    for until, (name, frame) in enumerate(scored, start=1):
        store_window(str(state), spec.name, {"window_id": name, "until": float(until),
                                             "counts": window_counts(spec, frame, reference)})
    trend = drift_trend(spec, state)
    assert [w["window"] for w in trend["windows"]] == ["calm", "drifted"]
    assert all(w["n"] == 1500 for w in trend["windows"])
    calm_score, drifted_score = (w["max_score"] for w in trend["windows"])
    assert calm_score < spec.drift.threshold < drifted_score
