"""`<p>_drift`: decides from stored bin counts whether live traffic drifted from the training reference.

It reads only the small JSON window records that `<p>/predictions` stores (and only those appended since its cursor,
by byte offset), never the log itself, so a tick costs the same at any log size. `<p>_prediction_log` notices new
logged rows (file sizes only) and launches `<p>_observe`, which materializes `<p>/predictions` into a new window.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kiln import paths
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


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
        from kiln.windows import drift_tick

        tick = drift_tick(spec, context.resources.storage.state_root, json.loads(context.cursor) if context.cursor else {})
        if tick.cursor is not None:
            context.update_cursor(json.dumps(tick.cursor))
        if tick.skip:
            return dg.SkipReason(tick.skip)
        decisions, last, comparable, elapsed_ms = tick.decisions, tick.decisions[-1], tick.windows, tick.elapsed_ms
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
        from kiln.windows import run_key

        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key(spec.name, str(d["window"]), versions),
                    tags={
                        paths.TRIGGER_RUN_TAG: "drift",
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
        from kiln.windows import log_signature, prediction_log_dir

        signature = log_signature(prediction_log_dir(context.resources.storage.state_root, spec.name))
        if not signature:
            return dg.SkipReason("nothing logged yet")
        if signature == context.cursor:
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
        return dg.RunRequest(run_key=f"{spec.name}:log:{signature}"[:500], tags={paths.TRIGGER_RUN_TAG: "prediction_log"})

    return prediction_log
