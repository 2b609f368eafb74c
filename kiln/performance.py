"""Label-free performance estimation for binary classifiers (confidence-based, like NannyML's CBPE).

Labels arrive late; model scores arrive at once. If the scores are calibrated -- P(y=1 | score) is known -- the
confusion matrix and ROC AUC a window of scores will show once its labels arrive can be estimated from the scores
alone. Kiln keeps that cheap and storable:

1. ``fit_calibration`` (training holdout: scores + true labels) cuts the score axis into fine quantile bins (the
   decision threshold is always one of the edges, so no bin straddles it) and learns a calibrated P(y=1) per bin by
   isotonic regression (pool-adjacent-violators on the bin label rates, weighted by bin counts; monotone by
   construction). The result is a plain JSON dict.
2. ``score_histogram`` counts a window's scores per bin: the only pass over rows.
3. ``estimate_performance`` works on the histogram only, O(bins): expected positives per bin ``n_i * p_i`` and
   negatives ``n_i * (1 - p_i)`` give the expected confusion matrix at the threshold and the expected ROC curve (AUC
   from the ranked bins, pairs inside one bin counted 1/2). Ratio metrics are ratios of expectations, as in CBPE.
4. ``labeled_histograms`` + ``realized_performance`` compute the same metrics from labeled bin counts once labels
   arrive (AUC with ties inside a bin counted 1/2), so estimate and realized are measured on the same scale.

Bins: ``edges`` ``e_0 < e_1 < ... < e_k`` define ``k`` bins ``[e_j, e_{j+1})``; the first and last bins are open-ended
(a score below ``e_1`` lands in bin 0, at or above ``e_{k-1}`` in bin ``k-1``), so ``e_0`` and ``e_k`` are nominal
(finite, to keep the dict strict JSON). A score equal to the threshold is predicted positive (``score >= threshold``).

Band: for each metric, ``standard_error`` is the delta-method standard error of the *realized* metric of this window
given its scores, under the calibrated Bernoulli model (each row's label ~ Bernoulli(p of its bin), independent):
accuracy and precision have exact binomial-sum variances, recall / F1 / ROC AUC are linearised in the per-row labels
(for AUC the gradient of ``U / (P * N)`` per bin is O(bins) with cumulative sums). ``lower``/``upper`` are
``value -/+ 3 * standard_error`` clipped to [0, 1], like NannyML's confidence band. The band covers label noise for the
window's rows, not error in the calibration itself (a holdout that no longer describes P(y | score), i.e. concept
drift, is invisible to any label-free estimate).

A metric that is undefined for the counts (no predicted positives for precision, one expected class for AUC, an empty
window) is ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("roc_auc", "accuracy", "precision", "recall", "f1")
CALIBRATION_VERSION = 1
BAND_SE = 3.0  # half-width of the band in standard errors (NannyML uses 3)


# ---------------------------------------------------------------------------------------------------------- inputs


def _scores(scores: Any, where: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{where}: scores must be 1-D, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{where}: scores must be finite; {int(bad.sum())} of {arr.size} are NaN or infinite "
                         f"(first at index {int(np.flatnonzero(bad)[0])})")
    return arr


def _labels(labels: Any, n: int, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    if arr.size != n:
        raise ValueError(f"{where}: scores and labels lengths differ ({n} scores, {arr.size} labels)")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: labels must be 0/1, got dtype {arr.dtype}") from exc
    bad = ~np.isin(num, (0.0, 1.0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: labels must be 0/1; {int(bad.sum())} are not (first at index {first}: {arr[first]!r})")
    return num.astype(np.int64)


def _edges(calibration: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """Validated (edges, probability, threshold) of a calibration dict."""
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be the dict fit_calibration returns, got {type(calibration).__name__}")
    missing = [k for k in ("edges", "probability", "threshold") if k not in calibration]
    if missing:
        raise ValueError(f"calibration is missing {missing}; build it with fit_calibration")
    edges = np.asarray(calibration["edges"], dtype=np.float64)
    prob = np.asarray(calibration["probability"], dtype=np.float64)
    threshold = float(calibration["threshold"])
    if edges.ndim != 1 or edges.size < 3 or not np.all(np.diff(edges) > 0):
        raise ValueError("calibration['edges'] must be >= 3 strictly increasing values")
    if prob.shape != (edges.size - 1,):
        raise ValueError(f"calibration['probability'] has {prob.size} values for {edges.size - 1} bins")
    if not np.all((prob >= 0) & (prob <= 1)):
        raise ValueError("calibration['probability'] values must lie in [0, 1]")
    if threshold not in edges[1:-1]:
        raise ValueError(f"calibration threshold {threshold} is not an interior bin edge; build it with fit_calibration")
    return edges, prob, threshold


def _counts(counts: Any, bins: int, what: str) -> np.ndarray:
    arr = np.asarray(counts, dtype=np.float64)
    if arr.shape != (bins,):
        raise ValueError(f"{what} must have one count per calibration bin ({bins}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{what} counts must be finite and >= 0")
    return arr


def _bin_index(edges: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges[1:-1], scores, side="right")


# ---------------------------------------------------------------------------------------------------------- maths


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression of ``y`` by pool-adjacent-violators; O(len(y))."""
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        means.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            w2 = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w2
            weights[-2] = w2
            sizes[-2] += sizes[-1]
            del means[-1], weights[-1], sizes[-1]
    return np.repeat(np.asarray(means), sizes)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative) over ranked bins; pairs in one bin count 1/2."""
    p_total, n_total = float(pos.sum()), float(neg.sum())
    if p_total <= 0 or n_total <= 0:
        return None
    pos_above = p_total - np.cumsum(pos)  # positives in strictly higher bins
    return float(np.sum(neg * (pos_above + 0.5 * pos)) / (p_total * n_total))


def _confusion(pos: np.ndarray, neg: np.ndarray, predicted_positive: np.ndarray) -> tuple[float, float, float, float]:
    tp = float(pos[predicted_positive].sum())
    fp = float(neg[predicted_positive].sum())
    fn = float(pos[~predicted_positive].sum())
    tn = float(neg[~predicted_positive].sum())
    return tp, fp, fn, tn


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _metrics(pos: np.ndarray, neg: np.ndarray, predicted_positive: np.ndarray) -> dict[str, float | None]:
    tp, fp, fn, tn = _confusion(pos, neg, predicted_positive)
    n = tp + fp + fn + tn
    return {
        "roc_auc": _auc(pos, neg),
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _standard_errors(n_i: np.ndarray, p_i: np.ndarray, predicted_positive: np.ndarray,
                     auc: float | None) -> dict[str, float | None]:
    """Delta-method SE of each realized metric given the window's scores, labels ~ Bernoulli(p_i) per row."""
    var_i = n_i * p_i * (1.0 - p_i)  # variance of the positive count of each bin
    pos, neg = n_i * p_i, n_i * (1.0 - p_i)
    tp, fp, fn, tn = _confusion(pos, neg, predicted_positive)
    n = float(n_i.sum())
    var_tp = float(var_i[predicted_positive].sum())  # TP = sum of Bernoullis over predicted-positive rows
    var_fn = float(var_i[~predicted_positive].sum())  # FN likewise over predicted-negative rows; independent of TP
    pp = tp + fp  # predicted positives: fixed by the scores
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    if n > 0:
        out["accuracy"] = float(np.sqrt(var_tp + var_fn)) / n  # correct = TP + (predicted negatives - FN)
    if pp > 0:
        out["precision"] = float(np.sqrt(var_tp)) / pp
    if tp + fn > 0:  # recall = TP / (TP + FN)
        d = (tp + fn) ** 2
        out["recall"] = float(np.sqrt((fn / d) ** 2 * var_tp + (tp / d) ** 2 * var_fn))
    if 2 * tp + fp + fn > 0:  # f1 = 2 TP / (TP + PP + FN)
        d = (tp + pp + fn) ** 2
        out["f1"] = float(np.sqrt((2 * (pp + fn) / d) ** 2 * var_tp + (2 * tp / d) ** 2 * var_fn))
    if auc is not None:
        # AUC = U / (P N); flipping one row of bin k from negative to positive changes U by
        # G_k = (negatives below k + neg_k / 2) - (positives above k + pos_k / 2), P by +1 and N by -1.
        p_total, n_total = float(pos.sum()), float(neg.sum())
        neg_below = np.cumsum(neg) - neg
        pos_above = p_total - np.cumsum(pos)
        g = (neg_below + 0.5 * neg) - (pos_above + 0.5 * pos)
        grad = (g - auc * (n_total - p_total)) / (p_total * n_total)
        out["roc_auc"] = float(np.sqrt(np.sum(var_i * grad**2)))
    return out


def _exact_metrics(sorted_scores: np.ndarray, cum_labels: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Metrics on raw rows (AUC with tied scores counted 1/2, i.e. the Mann-Whitney statistic), from the sorted
    scores and the running label sum in that order."""
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    bounds = np.r_[starts, sorted_scores.size]
    pos = np.diff(cum_labels[bounds])
    neg = np.diff(bounds) - pos
    return _metrics(pos, neg, sorted_scores[starts] >= threshold)


# ---------------------------------------------------------------------------------------------------------- API


def fit_calibration(scores: np.ndarray, labels: np.ndarray, bins: int = 1000, threshold: float = 0.5) -> dict[str, Any]:
    """Fit bin edges and calibrated P(y=1) per bin on the training holdout; a JSON-serialisable dict.

    ``edges`` are the ``bins``-quantiles of the holdout scores (deduplicated) plus ``threshold``; ``probability`` is
    the isotonic regression of the labels on the bins (monotone in the score). ``reference`` holds the realized
    metrics on the holdout rows themselves (exact, not binned).
    """
    where = "fit_calibration"
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"{where}: bins must be an integer >= 1, got {bins!r}")
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"{where}: threshold must be finite, got {threshold}")
    s = _scores(scores, where)
    y = _labels(labels, s.size, where)
    if s.size == 0:
        raise ValueError(f"{where}: the holdout is empty")
    positives = int(y.sum())
    if positives in (0, s.size):
        raise ValueError(f"{where}: the holdout has a single class ({positives} positives of {s.size} rows); "
                         "calibration needs both 0 and 1 labels")

    order = np.argsort(s, kind="stable")  # one sort serves the quantiles, the bin counts and the exact metrics
    s_sorted = s[order]
    cum = np.r_[0, np.cumsum(y[order])]  # cum[i] = positives among the i lowest scores
    if bins > 1:  # linear-interpolated quantiles (numpy's default method) at k / bins, from the sorted scores
        at = np.arange(1, bins) / bins * (s.size - 1)
        below = np.floor(at).astype(np.int64)
        above = np.minimum(below + 1, s.size - 1)
        interior = s_sorted[below] + (at - below) * (s_sorted[above] - s_sorted[below])
    else:
        interior = np.empty(0)
    interior = np.unique(np.append(interior, threshold))
    lo = min(0.0, float(s_sorted[0]))  # nominal outer edges: cover [0, 1] and the holdout's range
    lo = lo if lo < interior[0] else float(interior[0]) - 1.0
    hi = max(1.0, float(s_sorted[-1]))
    hi = hi if hi > interior[-1] else float(interior[-1]) + 1.0
    edges = np.concatenate(([lo], interior, [hi]))

    k = edges.size - 1
    bounds = np.r_[0, np.searchsorted(s_sorted, interior, side="left"), s.size]  # bin j = [edges[j], edges[j+1])
    n_i = np.diff(bounds).astype(np.float64)
    pos_i = np.diff(cum[bounds]).astype(np.float64)
    filled = n_i > 0
    prob = np.empty(k)
    prob[filled] = _pav(pos_i[filled] / n_i[filled], n_i[filled])
    if not filled.all():  # bins no holdout row fell in (e.g. next to the threshold): the nearest filled bin below
        last = np.maximum.accumulate(np.where(filled, np.arange(k), -1))
        first_filled = int(np.flatnonzero(filled)[0])
        prob = prob[np.where(last >= 0, last, first_filled)]
    prob = np.clip(np.maximum.accumulate(prob), 0.0, 1.0)

    return {
        "version": CALIBRATION_VERSION,
        "edges": [float(e) for e in edges],
        "probability": [float(p) for p in prob],
        "threshold": threshold,
        "reference": _exact_metrics(s_sorted, cum, threshold),
        "rows": int(s.size),
        "positive_rate": positives / s.size,
    }


def score_histogram(calibration: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """Count ``scores`` per calibration bin (int64); the one pass over rows a window needs."""
    edges, _, _ = _edges(calibration)
    s = _scores(scores, "score_histogram")
    return np.bincount(_bin_index(edges, s), minlength=edges.size - 1).astype(np.int64)


def labeled_histograms(calibration: dict[str, Any], scores: np.ndarray,
                       labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per calibration bin (int64) of labeled rows."""
    edges, _, _ = _edges(calibration)
    s = _scores(scores, "labeled_histograms")
    y = _labels(labels, s.size, "labeled_histograms")
    idx = _bin_index(edges, s)
    k = edges.size - 1
    pos = np.bincount(idx, weights=y, minlength=k).astype(np.int64)
    return pos, np.bincount(idx, minlength=k).astype(np.int64) - pos


def estimate_performance(calibration: dict[str, Any], histogram: np.ndarray) -> dict[str, Any]:
    """Expected metrics (CBPE) and a +/-3 SE band from a window's score histogram alone; O(bins)."""
    edges, prob, threshold = _edges(calibration)
    n_i = _counts(histogram, edges.size - 1, "histogram")
    n = float(n_i.sum())
    predicted_positive = edges[:-1] >= threshold  # edges[0] < threshold, so bin 0 is never predicted positive
    values = _metrics(n_i * prob, n_i * (1.0 - prob), predicted_positive) if n > 0 else dict.fromkeys(METRICS)
    errors = _standard_errors(n_i, prob, predicted_positive, values["roc_auc"]) if n > 0 else dict.fromkeys(METRICS)
    metrics: dict[str, dict[str, float | None]] = {}
    for m in METRICS:
        v, se = values[m], errors[m]
        if v is None or se is None:
            metrics[m] = {"value": v, "lower": None, "upper": None, "standard_error": se}
        else:
            metrics[m] = {"value": v, "lower": max(0.0, v - BAND_SE * se), "upper": min(1.0, v + BAND_SE * se),
                          "standard_error": se}
    return {"rows": int(round(n)), "metrics": metrics}


def realized_performance(calibration: dict[str, Any], positives: np.ndarray, negatives: np.ndarray) -> dict[str, Any]:
    """Realized metrics from labeled bin counts (AUC with pairs inside one bin counted 1/2); O(bins)."""
    edges, _, threshold = _edges(calibration)
    k = edges.size - 1
    pos = _counts(positives, k, "positives")
    neg = _counts(negatives, k, "negatives")
    n = float(pos.sum() + neg.sum())
    values = _metrics(pos, neg, edges[:-1] >= threshold) if n > 0 else dict.fromkeys(METRICS)
    return {"rows": int(round(n)), "metrics": values}
