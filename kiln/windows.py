"""Drift windows: logged predictions turned into bin counts, and the decisions the drift sensor takes on them.

`<p>/predictions` appends one small JSON record of bin counts per window (:func:`append_window`); `<p>_drift` reads
only the records appended since its cursor (:func:`read_new_windows`) and decides (:func:`evaluate_windows`), so a
tick costs the same at any log size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import paths
from kiln.reference import PREDICTION, load_reference, reference_id
from kiln.spec import PipelineSpec
from kiln.state import state_path

if TYPE_CHECKING:
    import polars as pl

DECISION_FIELDS = ("window", "action", "n", "max_score", "share", "streak", "drifted_columns")
SUMMARY_FIELDS = ("action", "max_score", "share", "drifted_columns", "streak", "n", "window", "prediction_drift")


def windows_path(state_root: str, pipeline: str) -> Path:
    """Where `<p>/predictions` appends one JSON line of bin counts per observed window."""
    return state_path(state_root, paths.windows_file(pipeline))


LOG_SETTLE_S = 3600.0
"""How far behind a cursor the prediction log is listed again: covers an object's flush interval (its rows may start in
the hour before the cursor) and objects a replica ships late after an outage (spilled under their older hour)."""


def last_window_until(state_root: str, pipeline: str) -> float:
    """The ``until`` of the newest stored window (0.0 before the first): rows logged after it are not yet observed."""
    path = windows_path(state_root, pipeline)
    if not path.exists():
        return 0.0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return float(json.loads(lines[-1])["until"]) if lines else 0.0


def read_log_since(state_root: str, pipeline: str, since: float, settle_s: float = LOG_SETTLE_S) -> pl.DataFrame | None:
    """Logged prediction rows of every object listed from ``hour_cursor(since - settle_s)`` (:mod:`kiln.predlog`), or
    None when there is none. Rows at or before ``since`` are included (the settle span is read again); filter on
    ``_logged_at`` (:func:`append_window` does) so that they are never counted twice."""
    from kiln.predlog import hour_cursor, list_log_objects, read_log_objects

    keys = list_log_objects(state_root, pipeline, hour_cursor(max(since - settle_s, 0.0)))
    if not keys:
        return None
    return read_log_objects(state_root, pipeline, keys)


def log_signature(state_root: str, pipeline: str, now: float | None = None, settle_s: float = LOG_SETTLE_S) -> str:
    """The last log object listed since ``hour_cursor(now - settle_s)`` and how many were listed: changes whenever an
    object is shipped, late ones included (a listing only, no object is read); empty when none was."""
    from kiln.predlog import hour_cursor, list_log_objects

    now = time.time() if now is None else now
    keys = list_log_objects(state_root, pipeline, hour_cursor(max(now - settle_s, 0.0)))
    return f"{keys[-1]}#{len(keys)}" if keys else ""


def window_counts(spec: PipelineSpec, rows: pl.DataFrame, reference: dict[str, Any]) -> dict[str, Any]:
    """Bin counts of logged request rows in the training reference's bins (features computed as in training)."""
    import polars as pl

    from kiln.contracts import cast_to_spec
    from kiln.drift import bin_counts
    from kiln.features import compute_features, profile_frame

    inputs = rows.select(spec.input_columns)
    text_ts = [c for c in spec.input_columns if spec.schema_[c].dtype == "datetime" and inputs.schema[c] == pl.String]
    inputs = inputs.with_columns([pl.col(c).str.to_datetime(time_unit="us") for c in text_ts])
    typed = cast_to_spec(inputs, spec, spec.input_columns)
    profile_input, _, _ = profile_frame(spec, typed, compute_features(typed, spec))
    if PREDICTION in reference.get("numeric", {}):
        if PREDICTION not in rows.columns:
            raise KeyError(f"{spec.name}: the reference profiles the prediction score but the rows have no {PREDICTION!r} column")
        # The model's own score, as logged next to the inputs: drift in what users see, one test for the whole model.
        profile_input = profile_input.with_columns(rows.get_column(PREDICTION).cast(pl.Float64).alias(PREDICTION))
    return bin_counts(profile_input, reference)


def window_performance(reference: dict[str, Any], rows: pl.DataFrame) -> dict[str, Any]:
    """The window's score histogram (in the reference calibration's fine bins) and the label-free performance estimate
    from it (:mod:`kiln.performance`); empty for a model without calibration (regression, or an old reference)."""
    import polars as pl

    from kiln.performance import estimate_performance, score_histogram

    calibration = reference.get("performance")
    if not calibration or PREDICTION not in rows.columns or rows.height == 0:
        return {}
    histogram = score_histogram(calibration, rows.get_column(PREDICTION).cast(pl.Float64).to_numpy())
    return {"scores": histogram.tolist(), "estimated": estimate_performance(calibration, histogram)}


def append_window(spec: PipelineSpec, log: pl.DataFrame, state_root: str) -> dict[str, Any] | None:
    """Store the bin counts of rows logged since the last window; the drift sensor reads only these records."""
    import polars as pl

    reference = load_reference(state_root, spec.name)
    if reference is None or log.height == 0:
        return None
    path = windows_path(state_root, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    since = last_window_until(state_root, spec.name)
    new = log.filter(pl.col("_logged_at") > since)
    if new.height == 0:
        return None
    until = float(new["_logged_at"].max())  # type: ignore[arg-type]
    record = {
        "window_id": f"{since:.6f}-{until:.6f}",
        "since": since,
        "until": until,
        "model_versions": sorted(new["_model_version"].cast(pl.String).unique().to_list()),
        "reference_id": reference_id(reference),
        "counts": window_counts(spec, new, reference),
        **window_performance(reference, new),
    }
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def read_new_windows(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete window records appended after byte ``offset``, and the offset after the last complete one."""
    with path.open("rb") as fh:
        if offset > path.stat().st_size:
            offset = 0  # the file was replaced (state reset): start over
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1  # a line still being written is left for the next tick
    windows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return windows, offset + end


def run_key(pipeline: str, window_id: str, model_versions: list[str]) -> str:
    """One retrain per (window, model version): a re-evaluated window or a restarted sensor cannot launch it twice."""
    return f"{pipeline}:drift:{window_id}:v{'+'.join(model_versions) or 'none'}"


def evaluate_windows(
    spec: PipelineSpec, reference: dict[str, Any], windows: list[dict[str, Any]], state: dict[str, Any], now: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the drift decision over new windows in order; returns the decisions and the final state."""
    from kiln.drift import column_scores, column_thresholds, decide

    decisions = []
    for window in windows:
        scores = column_scores(reference, window["counts"], spec.drift.method)
        n = int(window["counts"]["n"])
        limits = column_thresholds(reference, n, spec.drift.threshold, alpha=spec.drift.alpha, method=spec.drift.method)
        decision, state = decide(
            scores,
            int(window["counts"]["n"]),
            state,
            now,
            threshold=spec.drift.threshold,
            min_samples=spec.drift.min_samples,
            consecutive_windows=spec.drift.consecutive_windows,
            cooldown_seconds=spec.drift.cooldown_minutes * 60,
            drifted_feature_share=spec.drift.drifted_feature_share,
            score_key=PREDICTION if PREDICTION in scores else None,
            thresholds=limits,
        )
        decisions.append(decision | {"window": window["window_id"], "scores": scores})
    return decisions, state


def record_decisions(state_root: str, pipeline: str, decisions: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Keep the newest decision (for `kiln status`) and append every decision to the history (for `kiln slo`)."""
    last = state_path(state_root, paths.last_decision_file(pipeline))
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(json.dumps(summary))
    with state_path(state_root, paths.decisions_file(pipeline)).open("a") as fh:
        for d in decisions:
            fh.write(json.dumps({k: d[k] for k in DECISION_FIELDS} | {"decided_at": summary["decided_at"]}) + "\n")


@dataclass
class DriftTick:
    """What one `<p>_drift` tick decided: the new cursor (None: unchanged), a skip reason or the decisions."""

    cursor: dict[str, Any] | None
    skip: str | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)  # the comparable windows the decisions are about
    elapsed_ms: float = 0.0


def drift_tick(spec: PipelineSpec, state_root: str, cursor: dict[str, Any], now: float | None = None) -> DriftTick:
    """Decide on the windows appended since the cursor, from stored bin counts only; record the decisions.

    Windows binned against an older reference (before a new champion published its own) are not comparable and are
    skipped. The cursor keeps the byte offset, the hysteresis/cooldown state and the last decision's summary.
    """
    started = time.perf_counter()
    path = windows_path(state_root, spec.name)
    reference = load_reference(state_root, spec.name)
    if not path.exists() or reference is None:
        return DriftTick(None, "no prediction windows observed yet")
    offset = int(cursor.get("offset", 0))
    new, offset = read_new_windows(path, offset)
    if not new:
        return DriftTick(None, f"no new windows (read up to byte {offset})")
    current_ref = reference_id(reference)
    comparable = [w for w in new if w.get("reference_id", current_ref) == current_ref]
    stale = len(new) - len(comparable)
    state = cursor.get("state", {})
    now = time.time() if now is None else now
    decisions, state = evaluate_windows(spec, reference, comparable, state, now) if comparable else ([], state)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not decisions:
        skip = f"{stale} new window(s) were binned against an older reference; skipped"
        return DriftTick({"offset": offset, "state": state, "last": cursor.get("last")}, skip)
    summary = {k: decisions[-1][k] for k in SUMMARY_FIELDS}
    summary |= {"decided_at": now, "decide_ms": round(elapsed_ms, 3), "stale_windows": stale, "reference_id": current_ref}
    record_decisions(state_root, spec.name, decisions, summary)
    return DriftTick({"offset": offset, "state": state, "last": summary}, None, decisions, comparable, elapsed_ms)


# ------------------------------------------------------------------------------------------- retrain decisions

PERFORMANCE_HISTORY = 20  # windows of estimates the drift sensor keeps in its cursor (more than any consecutive_windows)


def load_realized(state_root: str, pipeline: str) -> dict[str, Any]:
    """Realized performance per window and label counts from `<p>/labels` ({} before labels arrived)."""
    path = state_path(state_root, paths.realized_file(pipeline))
    return json.loads(path.read_text()) if path.exists() else {}


def performance_history(previous: list[dict[str, Any]], new_windows: list[dict[str, Any]],
                        realized: dict[str, Any]) -> list[dict[str, Any]]:
    """The newest windows (oldest first) with their estimate and, where labels arrived, their realized performance."""
    merged = [*previous, *({"window_id": w["window_id"], "estimated": w.get("estimated")} for w in new_windows)]
    merged = merged[-PERFORMANCE_HISTORY:]
    by_window = realized.get("windows", {})
    return [{k: v for k, v in w.items() if k != "realized"} | ({"realized": by_window[w["window_id"]]} if w["window_id"] in by_window
                                                                else {}) for w in merged]


def drift_verdict(decisions: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether the drift rule asked for a retrain in these decisions, and a sentence saying what drifted."""
    fired = [d for d in decisions if d["action"] == "retrain"]
    if not fired:
        last = decisions[-1] if decisions else None
        return False, (f"{last['action']}: share {last['share']:.2f}, max score {last['max_score']:.3f}" if last else "no new window")
    d = fired[-1]
    columns = ", ".join(d["drifted_columns"]) or "the prediction score"
    return True, f"{len(d['drifted_columns'])} column(s) drifted ({columns}) for {d['streak']} window(s), share {d['share']:.2f}"


def record_retrain_decision(state_root: str, pipeline: str, record: dict[str, Any]) -> None:
    """Append a retrain decision (signal, reason, launched or skipped) for `kiln status` and `kiln slo`."""
    path = state_path(state_root, paths.retrain_decisions_file(pipeline))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def last_retrain_decision(state_root: str, pipeline: str) -> dict[str, Any] | None:
    """The newest recorded retrain decision, or None."""
    path = state_path(state_root, paths.retrain_decisions_file(pipeline))
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else None
