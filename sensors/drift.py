"""`<p>_drift`: decides from stored bin counts whether live traffic drifted from the training reference.

It reads only the small JSON window records that `<p>/predictions` stores (and only those appended since its cursor,
by byte offset), never the log itself, so a tick costs the same at any log size. `<p>_prediction_log` notices new
logged rows (file sizes only) and launches `<p>_observe`, which materializes `<p>/predictions` into a new window.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def windows_file(state_root: str, pipeline: str) -> Path:
    """Where `<p>/predictions` appends one JSON line of bin counts per observed window."""
    return Path(state_root) / "drift" / pipeline / "windows.jsonl"


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
            score_key="_prediction" if "_prediction" in scores else None,
            thresholds=limits,
        )
        decisions.append(decision | {"window": window["window_id"], "scores": scores})
    return decisions, state


def build(spec: PipelineSpec, retrain_job: Any) -> dg.SensorDefinition:
    """The `<p>_drift` sensor."""
    import dagster as dg

    from kiln.keys import key

    predictions_key = dg.AssetKey(key(spec.name, "predictions"))

    @dg.sensor(
        name=f"{spec.name}_drift",
        job=retrain_job,
        minimum_interval_seconds=spec.drift.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"{spec.drift.method.upper()} > {spec.drift.threshold} on stored bin counts launches {spec.name}_retrain.",
        required_resource_keys={"storage"},
    )
    def drift(context) -> Any:
        from assets.drift_report import reference_id, reference_path

        started = time.perf_counter()
        state_root = context.resources.storage.state_root
        path = windows_file(state_root, spec.name)
        ref_path = reference_path(state_root, spec.name)
        if not path.exists() or not ref_path.exists():
            return dg.SkipReason("no prediction windows observed yet")
        cursor: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
        offset = int(cursor.get("offset", 0))
        new, offset = read_new_windows(path, offset)
        if not new:
            return dg.SkipReason(f"no new windows (read up to byte {offset})")
        reference = json.loads(ref_path.read_text())
        current_ref = reference_id(reference)
        # Windows binned against an older reference (before a new champion published its own) are not comparable.
        comparable = [w for w in new if w.get("reference_id", current_ref) == current_ref]
        stale = len(new) - len(comparable)
        state = cursor.get("state", {})
        decisions, state = evaluate_windows(spec, reference, comparable, state, time.time()) if comparable else ([], state)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if not decisions:
            context.update_cursor(json.dumps({"offset": offset, "state": state, "last": cursor.get("last")}))
            return dg.SkipReason(f"{stale} new window(s) were binned against an older reference; skipped")
        last = decisions[-1]
        summary = {k: last[k] for k in ("action", "max_score", "share", "drifted_columns", "streak", "n", "window", "prediction_drift")}
        summary |= {"decided_at": time.time(), "decide_ms": round(elapsed_ms, 3), "stale_windows": stale, "reference_id": current_ref}
        context.update_cursor(json.dumps({"offset": offset, "state": state, "last": summary}))
        (path.parent / "last_decision.json").write_text(json.dumps(summary))
        with (path.parent / "decisions.jsonl").open("a") as fh:  # the decision history, one small line per window
            for d in decisions:
                fh.write(json.dumps({k: d[k] for k in ("window", "action", "n", "max_score", "share", "streak", "drifted_columns")}
                                    | {"decided_at": summary["decided_at"]}) + "\n")
        context.log.info(
            f"{spec.name} drift: {len(decisions)} window(s) decided in {elapsed_ms:.1f} ms; last "
            f"{[(d['window'], d['action'], round(d['max_score'], 4), d['drifted_columns']) for d in decisions[-5:]]}"
        )
        observations = [
            dg.AssetObservation(
                asset_key=predictions_key,
                metadata={
                    "drift_action": d["action"],
                    "drift_window": str(d["window"]),
                    "drift_rows": d["n"],
                    "drift_max_score": d["max_score"],
                    "drift_share": d["share"],
                    "drift_streak": d["streak"],
                    "drift_prediction_score_drifted": d["prediction_drift"],
                    "drifted_columns": ", ".join(d["drifted_columns"]) or "none",
                    "drift_scores": dg.MetadataValue.json({c: round(v, 5) for c, v in d["scores"].items()}),
                    "drift_method": spec.drift.method,
                },
            )
            # A catch-up tick over many windows records the ones that acted and the latest, not every clean window.
            for i, d in enumerate(decisions)
            if i == len(decisions) - 1 or d["action"] in ("retrain", "wait", "cooldown")
        ]
        retrains = [d for d in decisions if d["action"] == "retrain"]
        if not retrains:
            reason = f"{last['action']}: share {last['share']:.2f}, max score {last['max_score']:.3f}, streak {last['streak']}"
            return dg.SensorResult(skip_reason=reason, asset_events=observations)
        d = retrains[-1]
        window = next(w for w in comparable if w["window_id"] == d["window"])
        versions = [str(v) for v in window.get("model_versions", [])]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key(spec.name, str(d["window"]), versions),
                    tags={
                        "kiln/trigger": "drift",
                        "kiln/drift_window": str(d["window"]),
                        "kiln/drift_model_versions": ",".join(versions),
                        "kiln/drifted_columns": ",".join(d["drifted_columns"])[:200],
                    },
                )
            ],
            asset_events=observations,
        )

    return drift


def build_log_sensor(spec: PipelineSpec, observe_job: Any) -> dg.SensorDefinition:
    """The `<p>_prediction_log` sensor: new logged rows (seen as changed file sizes) launch `<p>_observe`."""
    import dagster as dg

    @dg.sensor(
        name=f"{spec.name}_prediction_log",
        job=observe_job,
        minimum_interval_seconds=spec.drift.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"New rows in {spec.name}'s prediction log materialize {spec.name}/predictions (a new drift window).",
        required_resource_keys={"storage"},
    )
    def prediction_log(context) -> Any:
        folder = Path(context.resources.storage.state_root) / "predictions" / spec.name
        if not folder.exists():
            return dg.SkipReason("nothing logged yet")
        sizes = {p.name: p.stat().st_size for p in folder.glob("*.jsonl")}
        signature = ",".join(f"{name}:{size}" for name, size in sorted(sizes.items()))
        if not sizes or signature == context.cursor:
            return dg.SkipReason("no new logged rows")
        # Skip while an observation is still running: its window will hold these rows or the next tick will.
        runs = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=observe_job.name, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
                                                                        dg.DagsterRunStatus.STARTED]),
            limit=1,
        )
        if runs:
            return dg.SkipReason(f"{observe_job.name} run {runs[0].run_id} is still in progress")
        context.update_cursor(signature)
        return dg.RunRequest(run_key=f"{spec.name}:log:{signature}"[:500], tags={"kiln/trigger": "prediction_log"})

    return prediction_log
