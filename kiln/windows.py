"""Drift windows: logged predictions turned into bin counts, and the decisions the drift sensor takes on them.

`<p>/predictions` stores one small JSON object of bin counts per window (:func:`append_window`) in the state store,
named so that the names sort in time order (:func:`kiln.state.time_key` of the window's ``until``); `<p>_drift` keeps the
last name it read as its cursor, lists the names after it and reads only those objects (:func:`read_new_windows`), then
decides (:func:`evaluate_windows`): a tick costs one listing plus the new windows, at any log size. Decisions are stored
the same way, one object per tick (:func:`record_decisions`) and per retrain decision (:func:`record_retrain_decision`):
the steps, the sensors and `kiln status` run in different pods, and an object store has no append.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln import paths
from kiln.reference import PREDICTION, load_reference, reference_id
from kiln.spec import PipelineSpec
from kiln.state import list_keys, read_json, state_path, time_key, write_json

if TYPE_CHECKING:
    import polars as pl

DECISION_FIELDS = ("window", "action", "n", "max_score", "share", "streak", "drifted_columns")
SUMMARY_FIELDS = ("action", "max_score", "share", "drifted_columns", "streak", "n", "window", "prediction_drift")


JSON = ".json"


def _store(state_root: str, folder: str, at: float, value: Any) -> str:
    """Write ``value`` as a new object of ``folder`` named by :func:`time_key` of ``at``; returns the name."""
    text = json.dumps(value)
    name = time_key(at, text) + JSON
    write_json(state_path(state_root, folder) / name, value)
    return name


def _read(state_root: str, folder: str, names: list[str]) -> list[Any]:
    """The values of the named objects of ``folder``, in that order (one gone since the listing is left out)."""
    base = state_path(state_root, folder)
    return [v for v in (read_json(base / name) for name in names) if v is not None]


def _names(state_root: str, folder: str, after: str | None = None) -> list[str]:
    """The JSON objects of ``folder`` (sorted: time order), strictly after ``after``."""
    return [n for n in list_keys(state_path(state_root, folder), after) if n.endswith(JSON)]


def store_window(state_root: str, pipeline: str, window: dict[str, Any]) -> str:
    """Store one window (its ``until`` names it, so names sort in time order); returns its name, the sensor's cursor."""
    return _store(state_root, paths.windows_dir(pipeline), float(window["until"]), window)


def read_new_windows(state_root: str, pipeline: str, after_key: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The windows stored after the one named ``after_key`` (every one for None), oldest first, and the name of the last
    one read (``after_key`` when none is new): one listing plus a read of each new window.

    A cursor newer than every stored window means the store was reset (its windows removed): start over."""
    names = _names(state_root, paths.windows_dir(pipeline))
    if after_key is not None and names and after_key not in names and names[-1] < after_key:
        after_key = None
    new = [n for n in names if after_key is None or n > after_key]
    return _read(state_root, paths.windows_dir(pipeline), new), (new[-1] if new else after_key)


def load_windows(state_root: str, pipeline: str, last_n: int | None = None) -> list[dict[str, Any]]:
    """The stored windows, oldest first: the newest ``last_n`` of them, or all for None."""
    names = _names(state_root, paths.windows_dir(pipeline))
    if last_n is not None:
        names = names[-last_n:] if last_n > 0 else []
    return _read(state_root, paths.windows_dir(pipeline), names)


LOG_SETTLE_S = 3600.0
"""How far behind a cursor the prediction log is listed again: covers an object's flush interval (its rows may start in
the hour before the cursor) and objects a replica ships late after an outage (spilled under their older hour)."""


def last_window_until(state_root: str, pipeline: str) -> float:
    """The ``until`` of the newest stored window (0.0 before the first): rows logged after it are not yet observed."""
    last = load_windows(state_root, pipeline, 1)
    return float(last[-1]["until"]) if last else 0.0


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
    store_window(state_root, spec.name, record)
    return record


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
    """Add this tick's decisions to the history (one object, for `kiln slo`) and replace the newest decision (for
    `kiln status`)."""
    at = float(summary["decided_at"])
    _store(state_root, paths.decisions_dir(pipeline), at, {
        "decided_at": at, "decisions": [{k: d[k] for k in DECISION_FIELDS} | {"decided_at": at} for d in decisions]})
    write_json(state_path(state_root, paths.last_decision_file(pipeline)), summary)


def load_decisions(state_root: str, pipeline: str, last_ticks: int | None = None) -> list[dict[str, Any]]:
    """The recorded drift decisions (each with its ``decided_at``), oldest first: of the newest ``last_ticks`` ticks
    that decided, or of all for None."""
    names = _names(state_root, paths.decisions_dir(pipeline))
    if last_ticks is not None:
        names = names[-last_ticks:] if last_ticks > 0 else []
    return [d for tick in _read(state_root, paths.decisions_dir(pipeline), names) for d in tick.get("decisions", [])]


def last_decision(state_root: str, pipeline: str) -> dict[str, Any] | None:
    """The newest drift decision's summary (action, scores, when), or None before the first."""
    return read_json(state_path(state_root, paths.last_decision_file(pipeline)))


def last_drift_retrain_at(state_root: str, pipeline: str) -> float | None:
    """When the drift rule last decided ``retrain``, as a Unix time (None: never). Reads ticks newest first and stops
    at the first that has one."""
    folder = paths.decisions_dir(pipeline)
    for name in reversed(_names(state_root, folder)):
        for tick in _read(state_root, folder, [name]):
            times = [float(d["decided_at"]) for d in tick.get("decisions", []) if d.get("action") == "retrain"]
            if times:
                return max(times)
    return None


WINDOW_CURSOR = "window_key"  # the drift sensor's cursor: the name of the last window it read


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
    skipped. The cursor keeps the name of the last window read (``window_key``), the hysteresis/cooldown state and the
    last decision's summary.
    """
    started = time.perf_counter()
    reference = load_reference(state_root, spec.name)
    after = cursor.get(WINDOW_CURSOR)
    new, after = read_new_windows(state_root, spec.name, after) if reference is not None else ([], after)
    if after is None or reference is None:
        return DriftTick(None, "no prediction windows observed yet")
    if not new:
        return DriftTick(None, f"no new windows (read up to {after})")
    current_ref = reference_id(reference)
    comparable = [w for w in new if w.get("reference_id", current_ref) == current_ref]
    stale = len(new) - len(comparable)
    state = cursor.get("state", {})
    now = time.time() if now is None else now
    decisions, state = evaluate_windows(spec, reference, comparable, state, now) if comparable else ([], state)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not decisions:
        skip = f"{stale} new window(s) were binned against an older reference; skipped"
        return DriftTick({WINDOW_CURSOR: after, "state": state, "last": cursor.get("last")}, skip)
    summary = {k: decisions[-1][k] for k in SUMMARY_FIELDS}
    summary |= {"decided_at": now, "decide_ms": round(elapsed_ms, 3), "stale_windows": stale, "reference_id": current_ref}
    record_decisions(state_root, spec.name, decisions, summary)
    return DriftTick({WINDOW_CURSOR: after, "state": state, "last": summary}, None, decisions, comparable, elapsed_ms)


# ------------------------------------------------------------------------------------------- retrain decisions

PERFORMANCE_HISTORY = 20  # windows of estimates the drift sensor keeps in its cursor (more than any consecutive_windows)


def load_realized(state_root: str, pipeline: str) -> dict[str, Any]:
    """Realized performance per window and label counts from `<p>/labels` ({} before labels arrived)."""
    return read_json(state_path(state_root, paths.realized_file(pipeline))) or {}


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
    """Store a retrain decision (signal, reason, launched or skipped; named by its ``decided_at``) for `kiln status`
    and `kiln slo`."""
    _store(state_root, paths.retrain_decisions_dir(pipeline), float(record["decided_at"]), record)


def last_retrain_decision(state_root: str, pipeline: str) -> dict[str, Any] | None:
    """The newest recorded retrain decision, or None: one listing and one read."""
    names = _names(state_root, paths.retrain_decisions_dir(pipeline))
    found = _read(state_root, paths.retrain_decisions_dir(pipeline), names[-1:])
    return found[-1] if found else None
