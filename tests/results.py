"""Reading a Dagster run's results in lifecycle tests: a stage's last materialization, a check's last evaluation."""

from __future__ import annotations

from typing import Any


def materialization(result: Any, pipeline: str, stage: str) -> Any:
    """The last materialization of `<pipeline>/<stage>` in an ``ExecuteInProcessResult`` (fails the test if none)."""
    import dagster as dg

    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey([pipeline, stage])]
    assert events, f"{pipeline}/{stage} was not materialized"
    return events[-1].step_materialization_data.materialization


def check_evaluation(result: Any, name: str) -> Any:
    """The last evaluation of the asset check ``name`` (fails the test if it did not run)."""
    evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    assert evaluations, f"check {name} did not run"
    return evaluations[-1]
