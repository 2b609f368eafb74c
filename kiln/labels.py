"""Delayed labels: ground truth that arrives after the prediction, joined to the prediction log by key.

A spec's ``labels:`` section names a folder of label files (key, label, event time). `<p>/labels` joins them to the
logged predictions and computes the realized performance of each drift window (:func:`realized_windows`), next to the
label-free estimate (:mod:`kiln.performance`). Labels that match no logged prediction are counted, never dropped
silently; a key labelled twice keeps its latest label (by event time) and is counted as relabelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl

__all__ = ["LabelsError", "read_labels", "realized_windows"]

PREDICTION = "_prediction"
LOGGED_AT = "_logged_at"


class LabelsError(ValueError):
    """A label file cannot be used; the message names the file and the column."""


def label_files(folder: Any, spec: PipelineSpec) -> list[Any]:
    """The label files of the folder (extension matched case-insensitively; ``.pq`` counts as parquet)."""
    assert spec.labels is not None
    suffixes = {".parquet", ".pq"} if spec.labels.format == "parquet" else {".csv"}
    if not folder.exists():
        return []
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in suffixes), key=lambda p: p.name)


def read_labels(folder: Any, spec: PipelineSpec) -> pl.DataFrame | None:
    """All label rows of the folder as (key, label, event time), or None when no file arrived yet."""
    import polars as pl

    labels = spec.labels
    if labels is None:
        raise LabelsError(f"{spec.name}: the spec has no labels: section")
    frames = []
    for path in label_files(folder, spec):
        with path.open("rb") as fh:
            try:
                frame = pl.read_parquet(fh) if labels.format == "parquet" else pl.read_csv(fh, try_parse_dates=True)
            except Exception as exc:
                raise LabelsError(f"{spec.name}: label file {path}: unreadable as {labels.format}: {exc}") from exc
        missing = [c for c in (labels.key, labels.label, labels.event_time) if c not in frame.columns]
        if missing:
            raise LabelsError(f"{spec.name}: label file {path}: missing column(s) {missing} (labels.key/label/event_time); "
                              f"it has {frame.columns}")
        label = frame[labels.label]
        if label.dtype == pl.Boolean:
            label = label.cast(pl.Int8)
        bad = label.is_null() | ~label.cast(pl.Float64, strict=False).is_in([0.0, 1.0])
        if bad.any():
            raise LabelsError(f"{spec.name}: label file {path}: column {labels.label!r} must be 0/1; "
                              f"{int(bad.sum())} row(s) are not, e.g. {label.filter(bad).head(3).to_list()}")
        frames.append(frame.select(pl.col(labels.key).cast(pl.String).alias(labels.key),
                                   label.cast(pl.Int8).alias(labels.label),
                                   pl.col(labels.event_time).alias(labels.event_time)))
    if not frames:
        return None
    return pl.concat(frames, how="vertical_relaxed")


def realized_windows(spec: PipelineSpec, log: pl.DataFrame, labels: pl.DataFrame, windows: list[dict[str, Any]],
                     calibration: dict[str, Any]) -> dict[str, Any]:
    """Join labels to logged predictions by key; realized performance of every window that has labeled rows.

    ``windows`` are the stored window records (``window_id``, ``since``, ``until`` on the log's ``_logged_at``).
    Returns the counts (labels, relabelled keys, matched, unmatched) and ``{"windows": {window_id: realized}}``."""
    import numpy as np
    import polars as pl

    from kiln.performance import labeled_histograms, realized_performance

    assert spec.labels is not None
    key, label, event_time = spec.labels.key, spec.labels.label, spec.labels.event_time
    latest = labels.sort(event_time).unique(subset=[key], keep="last", maintain_order=True)
    predicted = (log.select(pl.col(key).cast(pl.String), pl.col(PREDICTION).cast(pl.Float64), pl.col(LOGGED_AT).cast(pl.Float64))
                 .unique(subset=[key], keep="last", maintain_order=True)) if log.height else None
    joined = latest.join(predicted, on=key, how="inner") if predicted is not None else latest.head(0).with_columns(
        pl.lit(None, dtype=pl.Float64).alias(PREDICTION), pl.lit(None, dtype=pl.Float64).alias(LOGGED_AT))
    out: dict[str, Any] = {"labels": labels.height, "relabelled": labels.height - latest.height, "matched": joined.height,
                           "unmatched": latest.height - joined.height, "windows": {}}
    for window in windows:
        rows = joined.filter((pl.col(LOGGED_AT) > window["since"]) & (pl.col(LOGGED_AT) <= window["until"]))
        if rows.height == 0:
            continue
        positives, negatives = labeled_histograms(calibration, rows[PREDICTION].to_numpy(), rows[label].to_numpy().astype(np.int64))
        out["windows"][window["window_id"]] = realized_performance(calibration, positives, negatives)
    return out


def realized_in_lookback(spec: PipelineSpec, log: pl.DataFrame, labels: pl.DataFrame, windows: list[dict[str, Any]],
                         calibration: dict[str, Any], since: float, earlier: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`realized_windows` over the labels' lookback: the logged rows after ``since`` (epoch seconds) and the
    windows that end after it. A window that ended before it keeps what ``earlier`` (the last stored result) had for it;
    a label of a prediction logged before ``since`` matches nothing and is counted as unmatched."""
    import polars as pl

    recent = [w for w in windows if w["until"] > since]
    result = realized_windows(spec, log.filter(pl.col(LOGGED_AT) > since), labels, recent, calibration)
    older = {w["window_id"] for w in windows} - {w["window_id"] for w in recent}
    kept = {k: v for k, v in ((earlier or {}).get("windows") or {}).items() if k in older}
    result["windows"] = {**kept, **result["windows"]}
    return result
