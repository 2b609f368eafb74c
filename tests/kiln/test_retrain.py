"""The retrain policy without Dagster: which signals count, the performance streak, and the new-labeled-rows guard."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.retrain import decide_retrain, performance_drop
from kiln.spec import PipelineSpec, load_spec
from tests.conftest import FRAUD_SPEC

REFERENCE = {"roc_auc": 0.90, "accuracy": 0.95}


def _spec(**retrain: Any) -> PipelineSpec:
    data = load_spec(FRAUD_SPEC).model_dump(mode="json", by_alias=True)
    data["retrain"] = {"signals": ["drift", "estimated_performance"], "metric": "roc_auc", "estimated_drop": 0.02,
                       "realized_drop": 0.03, "consecutive_windows": 2, "min_new_rows": 1000} | retrain
    data["labels"] = {"path": "fraud_labels", "key": "txn_id", "label": "is_fraud", "event_time": "labeled_at"}
    return PipelineSpec.model_validate(data)


def _est(value: float) -> dict[str, Any]:
    return {"estimated": {"rows": 5000, "metrics": {"roc_auc": {"value": value, "lower": value - 0.01, "upper": value + 0.01}}}}


def _real(value: float | None) -> dict[str, Any]:
    return {"realized": {"rows": 5000, "metrics": {"roc_auc": value}}}


def test_estimated_drop_needs_consecutive_windows() -> None:
    spec = _spec()
    # 0.90 - 0.87 = 0.03 > 0.02 twice in a row: fires; the older good window does not matter.
    fired, why = performance_drop(spec, [_est(0.90), _est(0.87), _est(0.86)], REFERENCE, "estimated")
    assert fired and "2 window(s) in a row" in why and "0.8700, 0.8600" in why
    # only the last window dropped: 1 of 2
    fired, why = performance_drop(spec, [_est(0.87), _est(0.90), _est(0.86)], REFERENCE, "estimated")
    assert not fired and "1 of 2" in why
    # a drop of exactly estimated_drop is not "more than" it
    fired, _ = performance_drop(spec, [_est(0.88), _est(0.88)], REFERENCE, "estimated")
    assert not fired
    fired, _ = performance_drop(spec, [_est(0.8799), _est(0.8799)], REFERENCE, "estimated")
    assert fired


def test_realized_uses_its_own_drop_and_skips_windows_whose_labels_are_pending() -> None:
    spec = _spec(signals=["realized_performance"], consecutive_windows=2)
    # realized_drop is 0.03: 0.875 (a 0.025 drop) does not count although it would for the estimated 0.02
    assert not performance_drop(spec, [_real(0.875), _real(0.875)], REFERENCE, "realized")[0]
    # two labeled windows below 0.87, then today's window with no labels yet (estimated only): still fires
    windows = [_real(0.86), _real(0.85), _est(0.89)]
    assert performance_drop(spec, windows, REFERENCE, "realized")[0]
    # a labeled window without a value (a single class that day) breaks the streak
    assert not performance_drop(spec, [_real(0.86), _real(None), _real(0.85)], REFERENCE, "realized")[0]
    # no reference value for the metric: never fires, and says so
    fired, why = performance_drop(spec, [_real(0.5), _real(0.5)], {"accuracy": 0.9}, "realized")
    assert not fired and "no reference roc_auc" in why


def test_drift_without_new_labels_is_skipped_with_the_reason() -> None:
    spec = _spec()
    decision = decide_retrain(spec, drift_fired=True, drift_reason="share 0.50 of features drifted", windows=[_est(0.90)],
                              reference=REFERENCE, new_labeled_rows=0, champion_age_days=3)
    assert not decision.launch
    assert decision.signal == "drift" and decision.fired == ["drift"]
    assert decision.reason.startswith("drift detected: share 0.50 of features drifted")
    assert "no new labeled data (0 < min_new_rows 1000); retrain skipped" in decision.reason
    launched = decide_retrain(spec, drift_fired=True, drift_reason="", windows=[], reference=REFERENCE, new_labeled_rows=1000,
                              champion_age_days=3)
    assert launched.launch and launched.signal == "drift" and "retrain launched" in launched.reason


def test_only_enabled_signals_count_and_performance_outranks_drift() -> None:
    dropped = [_est(0.85), _est(0.85)]
    # estimated_performance is not enabled: a big estimated drop alone does not fire
    only_drift = _spec(signals=["drift"])
    decision = decide_retrain(only_drift, drift_fired=False, drift_reason="", windows=dropped, reference=REFERENCE,
                              new_labeled_rows=10_000, champion_age_days=1)
    assert not decision.launch and decision.signal is None and decision.fired == []
    assert decision.details["signals"]["estimated_performance"] == {
        "enabled": False, "fired": False, "reason": decision.details["signals"]["estimated_performance"]["reason"]}
    # both enabled and both fired: the decision names the performance drop and lists drift as also fired
    both = _spec(signals=["drift", "estimated_performance"])
    decision = decide_retrain(both, drift_fired=True, drift_reason="", windows=dropped, reference=REFERENCE,
                              new_labeled_rows=10_000, champion_age_days=1)
    assert decision.launch and decision.signal == "estimated_performance"
    assert decision.fired == ["estimated_performance", "drift"] and "also fired: drift" in decision.reason


def test_schedule_fires_on_the_champions_age() -> None:
    spec = _spec(signals=["schedule"], schedule_days=7, min_new_rows=0)
    young = decide_retrain(spec, drift_fired=True, drift_reason="", windows=[], reference=REFERENCE, new_labeled_rows=0,
                           champion_age_days=6.5)
    assert not young.launch and young.signal is None and "trained 6.5 day(s) ago, under schedule_days 7" in young.reason
    old = decide_retrain(spec, drift_fired=False, drift_reason="", windows=[], reference=REFERENCE, new_labeled_rows=0,
                         champion_age_days=7)
    assert old.launch and old.signal == "schedule" and old.fired == ["schedule"]
    assert old.reason.startswith("schedule: the champion was trained 7 day(s) ago (schedule_days 7)")
    unknown = decide_retrain(spec, drift_fired=False, drift_reason="", windows=[], reference=REFERENCE, new_labeled_rows=0,
                             champion_age_days=None)
    assert not unknown.launch


def test_schedule_signal_needs_a_period() -> None:
    with pytest.raises(ValueError, match="schedule_days"):
        _spec(signals=["schedule"])


def test_signals_left_unset_are_what_the_pipeline_can_measure() -> None:
    data = load_spec(FRAUD_SPEC).model_dump(mode="json", by_alias=True)
    data["retrain"] = {"min_new_rows": 0}
    spec = PipelineSpec.model_validate(data)  # classification without a labels: section: drift and estimated performance
    realized_drop = [_real(0.5), _real(0.5)]
    decision = decide_retrain(spec, drift_fired=False, drift_reason="", windows=realized_drop, reference=REFERENCE,
                              new_labeled_rows=0, champion_age_days=None)
    assert not decision.launch and decision.fired == []
    assert not decision.details["signals"]["realized_performance"]["enabled"]
    decision = decide_retrain(spec, drift_fired=False, drift_reason="", windows=[_est(0.5), _est(0.5)], reference=REFERENCE,
                              new_labeled_rows=0, champion_age_days=None)
    assert decision.launch and decision.signal == "estimated_performance"
