"""`kiln.labels.realized_in_lookback`: delayed labels are joined to the prediction log of the lookback only; windows that
ended before it keep their stored realized numbers, labels of older predictions count as unmatched."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from kiln.labels import realized_in_lookback
from kiln.performance import fit_calibration
from kiln.spec import PipelineSpec, load_spec
from tests.conftest import FRAUD_SPEC

NOW = 1_800_000_000.0
DAY = 86400.0


def _spec() -> PipelineSpec:
    data = load_spec(FRAUD_SPEC).model_dump(mode="json", by_alias=True)
    data["labels"] = {"path": "fraud_labels", "key": "txn_id", "label": "is_fraud", "event_time": "labeled_at",
                      "lookback_days": 7}
    return PipelineSpec.model_validate(data)


def _world(seed: int = 3) -> tuple[pl.DataFrame, pl.DataFrame, list[dict[str, Any]], dict[str, Any]]:
    """Two windows of 2,000 logged rows: one 10 days old, one from the last day; a label for every row."""
    rng = np.random.default_rng(seed)
    n = 2000
    scores = rng.uniform(size=2 * n)
    truth = (rng.uniform(size=2 * n) < scores).astype(np.int64)
    logged_at = np.concatenate([NOW - 10 * DAY + rng.uniform(0, 3600, n), NOW - DAY + rng.uniform(0, 3600, n)])
    keys = [f"t{i}" for i in range(2 * n)]
    log = pl.DataFrame({"txn_id": keys, "_prediction": scores, "_logged_at": logged_at})
    labels = pl.DataFrame({"txn_id": keys, "is_fraud": truth.astype(np.int8)}).with_columns(
        pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("labeled_at"))
    windows = [{"window_id": "old", "since": NOW - 11 * DAY, "until": NOW - 9 * DAY},
               {"window_id": "new", "since": NOW - 2 * DAY, "until": NOW}]
    return log, labels, windows, fit_calibration(*(lambda s: (s, (rng.uniform(size=s.size) < s).astype(np.int64)))(
        rng.uniform(size=100_000)))


def test_only_the_lookback_is_joined_and_older_windows_keep_their_stored_numbers() -> None:
    spec = _spec()
    log, labels, windows, calibration = _world()
    since = NOW - spec.labels.lookback_days * DAY  # type: ignore[union-attr]
    earlier = {"windows": {"old": {"rows": 2000, "metrics": {"roc_auc": 0.5}}, "gone": {"rows": 1, "metrics": {}}}}
    result = realized_in_lookback(spec, log, labels, windows, calibration, since, earlier)

    assert result["matched"] == 2000 and result["unmatched"] == 2000  # the old window's labels find no logged row
    assert result["windows"]["old"] == earlier["windows"]["old"]  # kept as stored, not recomputed
    assert "gone" not in result["windows"]  # a window no longer stored is not carried on
    new = log.filter(pl.col("_logged_at") > since).join(labels, on="txn_id")
    expected = roc_auc_score(new["is_fraud"].to_numpy(), new["_prediction"].to_numpy())
    assert result["windows"]["new"]["rows"] == 2000
    assert abs(result["windows"]["new"]["metrics"]["roc_auc"] - expected) < 0.01


def test_a_longer_lookback_recomputes_the_older_window_from_its_rows() -> None:
    spec = _spec()
    log, labels, windows, calibration = _world()
    result = realized_in_lookback(spec, log, labels, windows, calibration, NOW - 30 * DAY,
                                  {"windows": {"old": {"rows": 2000, "metrics": {"roc_auc": 0.5}}}})
    assert result["matched"] == 4000 and result["unmatched"] == 0
    old = log.filter(pl.col("_logged_at") < NOW - 9 * DAY).join(labels, on="txn_id")
    assert abs(result["windows"]["old"]["metrics"]["roc_auc"]
               - roc_auc_score(old["is_fraud"].to_numpy(), old["_prediction"].to_numpy())) < 0.01
