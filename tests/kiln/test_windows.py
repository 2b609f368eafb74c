"""The drift sensor's decision, without Dagster: windows from stored bin counts, cursor, stale references, the record."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from kiln import paths
from kiln.features import compute_features
from kiln.reference import PREDICTION, publish_features_reference, reference_id, training_reference
from kiln.spec import PipelineSpec, load_spec
from kiln.windows import WINDOW_CURSOR, append_window, drift_tick, load_decisions, load_windows, log_signature, read_log_since
from platform_defs.simulators.fraud import generate_day
from tests.conftest import FRAUD_SPEC


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    data = load_spec(FRAUD_SPEC).model_dump(mode="json", by_alias=True)
    data["drift"] |= {"min_samples": 500, "consecutive_windows": 2, "cooldown_minutes": 60}
    return PipelineSpec.model_validate(data)


def _served(spec: PipelineSpec, state_root: Path) -> dict[str, Any]:
    """A champion's reference published to the state store, as `<p>/champion` does."""
    source = generate_day(date(2026, 1, 1), 4000, 1, 0.0)
    features = compute_features(source, spec)
    reference = training_reference(spec, features, np.random.default_rng(0).beta(1, 20, features.height))
    path = state_root / paths.reference_file(spec.name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(reference))
    return reference


def _log(spec: PipelineSpec, day: int, drift: float, since: float) -> pl.DataFrame:
    rows = generate_day(date(2026, 2, day), 1000, day, drift)
    scores = np.random.default_rng(day).beta(2 if drift else 1, 5 if drift else 20, rows.height)
    return rows.with_columns(pl.Series(PREDICTION, scores), pl.lit(since + day).alias("_logged_at"), pl.lit("1").alias("_model_version"))


def test_a_tick_decides_on_new_windows_only_and_retrains_after_two_drifted_windows(spec: PipelineSpec, tmp_path: Path) -> None:
    _served(spec, tmp_path)
    assert drift_tick(spec, str(tmp_path), {}).skip == "no prediction windows observed yet"
    log = _log(spec, 1, 0.0, 0.0)
    assert append_window(spec, log, str(tmp_path)) is not None
    calm = drift_tick(spec, str(tmp_path), {}, now=1000.0)
    assert [d["action"] for d in calm.decisions] == ["ok"] and calm.cursor is not None
    again = drift_tick(spec, str(tmp_path), calm.cursor, now=1001.0)
    assert again.skip is not None and again.skip.startswith("no new windows") and again.cursor is None
    for day in (2, 3):
        log = pl.concat([log, _log(spec, day, 1.0, 0.0)], how="diagonal_relaxed")
        append_window(spec, log, str(tmp_path))
    drifted = drift_tick(spec, str(tmp_path), calm.cursor, now=1002.0)
    assert [d["action"] for d in drifted.decisions] == ["wait", "retrain"]
    assert [w["window_id"] for w in drifted.windows] == [d["window"] for d in drifted.decisions]
    last = json.loads((tmp_path / paths.last_decision_file(spec.name)).read_text())
    assert last["action"] == "retrain" and last["decided_at"] == 1002.0
    history = load_decisions(str(tmp_path), spec.name)
    assert [d["action"] for d in history] == ["ok", "wait", "retrain"]
    assert [d["decided_at"] for d in history] == [1000.0, 1002.0, 1002.0]
    assert [d["window"] for d in history] == [w["window_id"] for w in load_windows(str(tmp_path), spec.name)]
    # one object per tick that decided, not a file appended to (an object store has no append)
    assert len(list((tmp_path / paths.decisions_dir(spec.name)).glob("*.json"))) == 2


def test_windows_binned_against_an_older_reference_are_skipped(spec: PipelineSpec, tmp_path: Path) -> None:
    reference = _served(spec, tmp_path)
    append_window(spec, _log(spec, 1, 1.0, 0.0), str(tmp_path))
    newer = reference | {"n": reference["n"] + 1}  # a new champion published its own reference
    (tmp_path / paths.reference_file(spec.name)).write_text(json.dumps(newer))
    assert reference_id(newer) != reference_id(reference)
    tick = drift_tick(spec, str(tmp_path), {})
    assert tick.skip == "1 new window(s) were binned against an older reference; skipped"
    stored = sorted(p.name for p in (tmp_path / paths.windows_dir(spec.name)).iterdir())
    assert len(stored) == 1 and tick.cursor is not None and tick.cursor[WINDOW_CURSOR] == stored[0] and not tick.decisions


def test_the_first_training_set_s_reference_stands_until_a_champion_publishes_one(spec: PipelineSpec, tmp_path: Path) -> None:
    first = {"n": 1, "numeric": {}, "categorical": {}}
    publish_features_reference(str(tmp_path), spec.name, "v1", first, [{"amount": 1.0}])
    publish_features_reference(str(tmp_path), spec.name, "v2", first | {"n": 2}, [{"amount": 2.0}])
    assert json.loads((tmp_path / paths.reference_file(spec.name)).read_text()) == first
    assert json.loads((tmp_path / paths.features_reference_file(spec.name, "v2")).read_text())["n"] == 2
    assert json.loads((tmp_path / paths.sample_rows_file(spec.name)).read_text()) == [{"amount": 2.0}]


HOUR = 3600.0
T10 = 1_767_261_600.0  # 2026-01-01 10:00:00 UTC


def _ship(root: Path, replica: str, seq: int, logged_at: list[float], data: bytes | None = None) -> str:
    """A prediction-log object as a shipper writes it (kiln.predlog's layout); ``data``: its bytes, when not rows."""
    from kiln.predlog import log_prefix, object_key

    key = object_key(logged_at[0], replica, seq)
    path = Path(log_prefix(str(root), "p")) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        pl.DataFrame({"_logged_at": logged_at, "_model_version": ["1"] * len(logged_at),
                      "_prediction": [0.5] * len(logged_at)}).write_parquet(path)
    return key


def test_the_log_is_read_from_the_objects_of_the_settle_span_before_the_cursor(tmp_path: Path) -> None:
    _ship(tmp_path, "a", 1, [T10 - 2 * HOUR + 10])  # 08:00:10: more than the settle span before `since`, not read
    _ship(tmp_path, "a", 2, [T10 - 5, T10 + 5])  # starts in the hour before `since`'s, one row after it
    _ship(tmp_path, "b", 7, [T10 - 1800])  # 09:30, shipped late by another replica
    _ship(tmp_path, "a", 3, [T10 + 60, T10 + 120])
    since = T10 + 1  # rows up to here are in a window already
    log = read_log_since(str(tmp_path), "p", since, settle_s=HOUR)
    assert log is not None
    assert sorted(log["_logged_at"].to_list()) == [T10 - 1800, T10 - 5, T10 + 5, T10 + 60, T10 + 120]
    assert log.filter(pl.col("_logged_at") > since)["_logged_at"].to_list() == [T10 + 5, T10 + 60, T10 + 120]
    everything = read_log_since(str(tmp_path), "p", 0.0, settle_s=0.0)
    assert everything is not None and everything.height == 6
    assert read_log_since(str(tmp_path), "other", since) is None


def test_the_log_signature_is_a_listing_that_changes_with_every_object(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert log_signature(root, "p", now=T10 + 20, settle_s=HOUR) == ""
    newest = _ship(tmp_path, "a", 1, [T10 + 10], data=b"not parquet: a listing reads no object")
    first = log_signature(root, "p", now=T10 + 20, settle_s=HOUR)
    assert first == f"{newest}#1"
    _ship(tmp_path, "b", 5, [T10 - 1200])  # a late object of the hour before: sorts first, still seen by its count
    second = log_signature(root, "p", now=T10 + 20, settle_s=HOUR)
    assert second == f"{newest}#2"
    _ship(tmp_path, "c", 9, [T10 - 3 * HOUR])  # older than the settle span: not listed
    assert log_signature(root, "p", now=T10 + 20, settle_s=HOUR) == second
