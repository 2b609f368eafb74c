"""Freshness policy on `<p>/raw`: a daily source that stops arriving shows as stale in the UI."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

from tests.conftest import FRAUD_SPEC


def test_daily_raw_has_a_time_window_freshness_policy() -> None:
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions

    spec = load_spec(FRAUD_SPEC)
    defs = build_definitions([spec])
    raw = defs.resolve_assets_def(dg.AssetKey(["fraud", "raw"]))
    policy = raw.specs_by_key[dg.AssetKey(["fraud", "raw"])].freshness_policy
    assert policy is not None
    assert policy.fail_window.to_timedelta() == timedelta(hours=48)
    assert policy.warn_window is not None and policy.warn_window.to_timedelta() == timedelta(hours=26)
    validated = defs.resolve_assets_def(dg.AssetKey(["fraud", "validated"]))
    assert validated.specs_by_key[dg.AssetKey(["fraud", "validated"])].freshness_policy is None


def test_unpartitioned_source_has_no_daily_policy() -> None:
    from assets.raw import raw_freshness_policy
    from kiln.spec import load_spec

    spec = load_spec(FRAUD_SPEC)
    snapshot = spec.model_copy(update={"source": spec.source.model_copy(update={"partitions": "none"})})
    assert raw_freshness_policy(snapshot) is None
