"""Unit tests for kiln.performance: label-free (CBPE-style) performance estimation against known answers.

The reference answers are closed forms for populations where P(y=1 | score) is known:

- s ~ Uniform(0, 1), y ~ Bernoulli(s): positives have score density 2s, negatives 2(1 - s), so
  AUC = P(s1 > s0) = 5/6; at threshold 0.5 TP = FP-complement = 3/8 of rows, giving accuracy = precision = recall =
  F1 = 3/4.
- s = u^2 with u ~ Uniform(0, 1), y ~ Bernoulli(s) (a shifted score population, same calibration): P(y=1) = 1/3,
  AUC = [int_0^1 u1^2 (u1 - u1^3/3) du1] / (1/3 * 2/3) = (7/36) / (2/9) = 7/8; with a = 1/sqrt(2) (s >= 1/2 iff
  u >= a): TP = (1 - a^3)/3, TN = a - a^3/3, predicted positives = 1 - a.
- s ~ Uniform(0, 1), y ~ Bernoulli(s^2) (scores not calibrated): P(y=1) = 1/3, AUC = 7/8 (same integral),
  TP = 7/24, TN = 11/24, so accuracy 3/4, precision 7/12, recall 7/8, F1 = 2TP / (PP + P) = 7/10.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from kiln.performance import (
    METRICS,
    estimate_performance,
    fit_calibration,
    labeled_histograms,
    realized_performance,
    score_histogram,
)

A = 1 / math.sqrt(2)
UNIFORM = {"roc_auc": 5 / 6, "accuracy": 0.75, "precision": 0.75, "recall": 0.75, "f1": 0.75}
_TP_SQ, _PP_SQ, _P_SQ = (1 - A**3) / 3, 1 - A, 1 / 3
SQUARED_SCORES = {
    "roc_auc": 7 / 8,
    "accuracy": _TP_SQ + A - A**3 / 3,
    "precision": _TP_SQ / _PP_SQ,
    "recall": _TP_SQ / _P_SQ,
    "f1": 2 * _TP_SQ / (_PP_SQ + _P_SQ),
}
MISCALIBRATED = {"roc_auc": 7 / 8, "accuracy": 0.75, "precision": 7 / 12, "recall": 7 / 8, "f1": 0.7}


def _uniform_rows(n: int, seed: int, prob: object = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=n)
    p = s if prob is None else prob(s)  # type: ignore[operator]
    return s, (rng.uniform(size=n) < p).astype(np.int64)


@pytest.fixture(scope="module")
def calibration() -> dict:
    """Calibrated on a 200k-row holdout with s ~ U(0, 1), y ~ Bernoulli(s)."""
    return fit_calibration(*_uniform_rows(200_000, 1))


def _values(estimate: dict) -> dict[str, float]:
    return {m: estimate["metrics"][m]["value"] for m in METRICS}


def test_calibration_is_json_and_monotone(calibration: dict) -> None:
    text = json.dumps(calibration, allow_nan=False)  # strict JSON: no inf / NaN
    again = json.loads(text)
    edges = np.asarray(again["edges"])
    prob = np.asarray(again["probability"])
    assert np.all(np.diff(edges) > 0) and 0.5 in edges[1:-1]
    assert prob.size == edges.size - 1 and np.all(np.diff(prob) >= 0) and prob.min() >= 0 and prob.max() <= 1
    # calibrated probabilities track P(y=1 | s) = s: bin probability vs bin midpoint
    mids = (edges[1:-2] + edges[2:-1]) / 2
    assert np.abs(prob[1:-1] - mids).mean() < 0.02
    assert again["rows"] == 200_000 and abs(again["positive_rate"] - 0.5) < 0.005
    s, y = _uniform_rows(200_000, 1)
    ref = again["reference"]
    assert ref["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    pred = (s >= 0.5).astype(int)
    assert ref["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert ref["precision"] == pytest.approx(precision_score(y, pred), abs=1e-12)
    assert ref["recall"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert ref["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    h = score_histogram(calibration, s[:1000])
    assert estimate_performance(again, h) == estimate_performance(calibration, h)


def test_estimate_matches_closed_form_on_calibrated_scores(calibration: dict) -> None:
    s = np.random.default_rng(2).uniform(size=1_000_000)
    hist = score_histogram(calibration, s)
    assert hist.dtype == np.int64 and hist.sum() == s.size
    est = estimate_performance(calibration, hist)
    assert est["rows"] == s.size
    for m, want in UNIFORM.items():
        assert est["metrics"][m]["value"] == pytest.approx(want, abs=0.004), m


def test_estimate_tracks_shifted_scores(calibration: dict) -> None:
    """Scores move (s = u^2: fewer positives, higher AUC), P(y | s) stays: the estimate follows, labels unseen."""
    rng = np.random.default_rng(3)
    s = rng.uniform(size=1_000_000) ** 2
    y = (rng.uniform(size=s.size) < s).astype(np.int64)
    est = _values(estimate_performance(calibration, score_histogram(calibration, s)))
    real = realized_performance(calibration, *labeled_histograms(calibration, s, y))["metrics"]
    base = _values(estimate_performance(calibration, score_histogram(calibration, rng.uniform(size=100_000))))
    for m, want in SQUARED_SCORES.items():
        assert est[m] == pytest.approx(want, abs=0.004), m
        assert est[m] == pytest.approx(real[m], abs=0.004), m
    # the shift is visible: precision / recall / AUC move well beyond the tolerance from the unshifted window
    assert abs(est["recall"] - base["recall"]) > 0.05 and abs(est["roc_auc"] - base["roc_auc"]) > 0.03


def test_calibration_corrects_miscalibrated_scores() -> None:
    """Raw scores overstate P(y=1) (truth is s^2); the estimate uses the holdout's calibration, not the raw score."""
    cal = fit_calibration(*_uniform_rows(200_000, 4, prob=np.square))
    est = _values(estimate_performance(cal, score_histogram(cal, np.random.default_rng(5).uniform(size=1_000_000))))
    for m, want in MISCALIBRATED.items():
        assert est[m] == pytest.approx(want, abs=0.004), m
    assert abs(est["roc_auc"] - 5 / 6) > 0.03  # what taking the raw scores as probabilities would have said


def test_realized_from_histograms_matches_sklearn_on_rows(calibration: dict) -> None:
    s, y = _uniform_rows(100_000, 6)
    pos, neg = labeled_histograms(calibration, s, y)
    assert pos.dtype == np.int64 and pos.sum() == y.sum() and (pos + neg).sum() == s.size
    assert np.array_equal(pos + neg, score_histogram(calibration, s))
    real = realized_performance(calibration, pos, neg)
    assert real["rows"] == s.size
    pred = (s >= 0.5).astype(int)  # threshold is a bin edge: the confusion matrix is exact
    assert real["metrics"]["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert real["metrics"]["precision"] == pytest.approx(precision_score(y, pred), abs=1e-12)
    assert real["metrics"]["recall"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert real["metrics"]["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    # AUC: pairs inside one of ~1000 bins count 1/2, so it is within the bin resolution of the exact value
    assert real["metrics"]["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)


def test_other_threshold_is_exact() -> None:
    s, y = _uniform_rows(50_000, 7)
    cal = fit_calibration(s, y, bins=50, threshold=0.37)
    assert 0.37 in cal["edges"]
    t, u = _uniform_rows(20_000, 8)
    real = realized_performance(cal, *labeled_histograms(cal, t, u))["metrics"]
    pred = (t >= 0.37).astype(int)
    assert real["accuracy"] == pytest.approx(accuracy_score(u, pred), abs=1e-12)
    assert real["f1"] == pytest.approx(f1_score(u, pred), abs=1e-12)
    # closed form at threshold c: TP = (1 - c^2)/2, predicted positives 1 - c, P = 1/2
    est = _values(estimate_performance(cal, score_histogram(cal, np.random.default_rng(9).uniform(size=500_000))))
    c = 0.37
    assert est["precision"] == pytest.approx((1 - c**2) / 2 / (1 - c), abs=0.01)
    assert est["recall"] == pytest.approx(1 - c**2, abs=0.01)


def test_band_covers_realized_in_small_windows(calibration: dict) -> None:
    """300 seeded windows of 500 rows: the +/-3 SE band holds the realized value almost always, and SE has the
    right scale (close to the spread of realized - estimate over the windows), so the band is not trivially wide."""
    rng = np.random.default_rng(10)
    covered = dict.fromkeys(METRICS, 0)
    errors: dict[str, list[float]] = {m: [] for m in METRICS}
    ses: dict[str, list[float]] = {m: [] for m in METRICS}
    windows = 300
    for _ in range(windows):
        s = rng.uniform(size=500)
        y = (rng.uniform(size=s.size) < s).astype(np.int64)
        est = estimate_performance(calibration, score_histogram(calibration, s))["metrics"]
        real = realized_performance(calibration, *labeled_histograms(calibration, s, y))["metrics"]
        for m in METRICS:
            e = est[m]
            assert 0.0 <= e["lower"] <= e["value"] <= e["upper"] <= 1.0
            covered[m] += e["lower"] <= real[m] <= e["upper"]
            errors[m].append(real[m] - e["value"])
            ses[m].append(e["standard_error"])
    for m in METRICS:
        assert covered[m] / windows >= 0.95, (m, covered[m])
        ratio = float(np.mean(ses[m])) / float(np.std(errors[m]))
        assert 0.8 < ratio < 1.25, (m, ratio)


def test_empty_and_degenerate_windows(calibration: dict) -> None:
    bins = len(calibration["edges"]) - 1
    empty = estimate_performance(calibration, np.zeros(bins, dtype=np.int64))
    assert empty["rows"] == 0
    assert all(empty["metrics"][m] == {"value": None, "lower": None, "upper": None, "standard_error": None}
               for m in METRICS)
    assert realized_performance(calibration, np.zeros(bins), np.zeros(bins))["metrics"] == dict.fromkeys(METRICS)
    # all scores below the threshold: nothing predicted positive -> precision undefined, recall 0
    low = estimate_performance(calibration, score_histogram(calibration, np.full(100, 0.1)))["metrics"]
    assert low["precision"]["value"] is None and low["recall"]["value"] == 0.0
    # only negatives labeled: AUC undefined
    real = realized_performance(calibration, *labeled_histograms(calibration, np.array([0.2, 0.7]), np.array([0, 0])))
    assert real["metrics"]["roc_auc"] is None and real["metrics"]["accuracy"] == 0.5


def test_scores_outside_holdout_range_fall_in_end_bins(calibration: dict) -> None:
    hist = score_histogram(calibration, np.array([-5.0, 0.0, 1.0, 7.0]))
    assert hist[0] == 2 and hist[-1] == 2 and hist.sum() == 4


@pytest.mark.parametrize(
    ("scores", "labels", "kwargs", "match"),
    [
        ([0.1, 0.9, 0.5], [0, 1, 2], {}, "labels must be 0/1"),
        ([0.1, 0.9, 0.5], [0, 1], {}, "lengths differ"),
        ([0.1, 0.9, 0.5], [1, 1, 1], {}, "single class"),
        ([0.1, float("nan"), 0.5], [0, 1, 0], {}, "finite"),
        ([], [], {}, "empty"),
        ([0.1, 0.9], [0, 1], {"bins": 0}, "bins"),
        ([0.1, 0.9], [0, 1], {"threshold": float("inf")}, "threshold"),
        ([[0.1, 0.9]], [[0, 1]], {}, "1-D"),
    ],
)
def test_fit_calibration_rejects_bad_input(scores: list, labels: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_calibration(np.asarray(scores, dtype=float), np.asarray(labels), **kwargs)


def test_window_functions_reject_bad_input(calibration: dict) -> None:
    bins = len(calibration["edges"]) - 1
    with pytest.raises(ValueError, match="one count per calibration bin"):
        estimate_performance(calibration, np.ones(bins + 1))
    with pytest.raises(ValueError, match=">= 0"):
        estimate_performance(calibration, -np.ones(bins))
    with pytest.raises(ValueError, match="positives"):
        realized_performance(calibration, np.ones(3), np.ones(bins))
    with pytest.raises(ValueError, match="finite"):
        score_histogram(calibration, np.array([0.2, np.inf]))
    with pytest.raises(ValueError, match="labels must be 0/1"):
        labeled_histograms(calibration, np.array([0.2, 0.4]), np.array([0, -1]))
    with pytest.raises(ValueError, match="lengths differ"):
        labeled_histograms(calibration, np.array([0.2, 0.4]), np.array([0]))
    with pytest.raises(ValueError, match="missing"):
        score_histogram({"edges": calibration["edges"]}, np.array([0.2]))
    broken = dict(calibration, probability=calibration["probability"][:-1])
    with pytest.raises(ValueError, match="probability"):
        estimate_performance(broken, np.ones(bins))
