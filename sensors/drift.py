"""`<p>_drift`: decides from stored bin counts whether live traffic drifted from the training reference.

It reads only the small JSON window objects that `<p>/predictions` stores in the state store (and only those named after
the last one its cursor keeps: one listing plus the new objects), never the log itself, so a tick costs the same at any
log size. Its decisions go to the state store as objects too (:mod:`kiln.windows`): the sensor daemon, the steps and
`kiln status` run in different pods. `<p>_prediction_log` notices new
logged rows (a listing of the log's objects, none read) and launches `<p>_observe`, which materializes `<p>/predictions` into a new window.
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
        description=(f"Weighs {', '.join(spec.retrain_signals)} on stored windows ({spec.drift.method.upper()} > "
                     f"{spec.drift.threshold} for drift) and launches {spec.name}_retrain when one fired and at least "
                     f"{spec.retrain.min_new_rows} new labeled rows arrived."),
        required_resource_keys={"storage"},
    )
    def drift(context) -> Any:
        from kiln.windows import drift_tick, load_realized

        state_root = context.resources.storage.state_root
        cursor = json.loads(context.cursor) if context.cursor else {}
        tick = drift_tick(spec, state_root, cursor)
        realized = load_realized(state_root, spec.name)
        new_labels = realized.get("updated_at") is not None and realized.get("updated_at") != cursor.get("realized_at")
        carried = {k: cursor[k] for k in ("performance", "realized_at", "last_launch_at") if k in cursor}
        if tick.skip and not new_labels:
            if tick.cursor is not None:
                context.update_cursor(json.dumps(carried | tick.cursor))
            return dg.SkipReason(tick.skip)
        decisions, comparable = tick.decisions, tick.windows
        if decisions:
            context.log.info(
                f"{spec.name} drift: {len(decisions)} window(s) decided in {tick.elapsed_ms:.1f} ms; last "
                f"{[(d['window'], d['action'], round(d['max_score'], 4), d['drifted_columns']) for d in decisions[-5:]]}"
            )
        observations = [drift_observation(d) for i, d in enumerate(decisions)
                        # A catch-up tick over many windows records the ones that acted and the latest, not every clean window.
                        if i == len(decisions) - 1 or d["action"] in ("retrain", "wait", "cooldown")]
        # the old cursor as the base: a tick with new labels but no new window keeps its window position and drift state
        new_cursor, request, decision = weigh_retrain(context, cursor, cursor | (tick.cursor or {}), comparable, decisions, realized)
        context.update_cursor(json.dumps(new_cursor))
        if decision is not None:
            observations.append(dg.AssetObservation(asset_key=predictions_key, metadata={
                "retrain_decision": "launched" if request else "skipped",
                "retrain_signal": decision.signal or "none",
                "retrain_fired": ", ".join(decision.fired) or "none",
                "retrain_reason": decision.reason,
                "new_labeled_rows": decision.details.get("new_labeled_rows", 0),
            }))
            if request is None and decision.fired:
                context.log.warning(f"{spec.name}: {decision.reason}")
        if request is None:
            if decision is not None and decision.fired:
                reason = decision.reason
            elif decisions:
                last = decisions[-1]
                reason = f"{last['action']}: share {last['share']:.2f}, max score {last['max_score']:.3f}, streak {last['streak']}"
            else:
                reason = decision.reason if decision is not None else (tick.skip or "no decision")
            return dg.SensorResult(skip_reason=reason[:1000], asset_events=observations)
        return dg.SensorResult(run_requests=[request], asset_events=observations)

    def drift_observation(d: dict[str, Any]) -> Any:
        return dg.AssetObservation(
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

    def weigh_retrain(context: Any, cursor: dict[str, Any], new_cursor: dict[str, Any], windows: list[dict[str, Any]],
                      decisions: list[dict[str, Any]], realized: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
        """The retrain signals over the newest windows (kiln.retrain.decide_retrain): (cursor, run request or None, decision)."""
        import time

        from kiln.reference import load_reference
        from kiln.retrain import decide_retrain
        from kiln.windows import drift_verdict, performance_history, record_retrain_decision, run_key

        state_root = context.resources.storage.state_root
        now = time.time()
        history = performance_history(cursor.get("performance", []), windows, realized)
        new_cursor |= {"performance": [{k: v for k, v in w.items() if k != "realized"} for w in history],
                       "realized_at": realized.get("updated_at")}
        reference = load_reference(state_root, spec.name) or {}
        calibration = reference.get("performance") or {}
        training = reference.get("training") or {}
        trained_at = training.get("trained_at")
        drift_fired, drift_reason = drift_verdict(decisions)
        decision = decide_retrain(
            spec, drift_fired=drift_fired, drift_reason=drift_reason, windows=history,
            reference=calibration.get("reference") or {}, new_labeled_rows=new_labeled_rows(context, trained_at),
            champion_age_days=(now - trained_at) / 86400 if trained_at else None,
        )
        cooldown = spec.drift.cooldown_minutes * 60
        last_launch = cursor.get("last_launch_at")
        if decision.launch and last_launch is not None and now - last_launch < cooldown:
            decision.launch = False
            decision.reason += f" -- but a retrain launched {now - last_launch:.0f}s ago (cooldown {cooldown:.0f}s); not again yet"
        window = windows[-1]["window_id"] if windows else (history[-1]["window_id"] if history else "none")
        if decision.fired or decision.launch:
            record_retrain_decision(state_root, spec.name, {
                "decided_at": now, "window": window, "launch": decision.launch, "signal": decision.signal,
                "fired": decision.fired, "reason": decision.reason, "new_labeled_rows": decision.details.get("new_labeled_rows")})
        if not decision.launch:
            return new_cursor, None, decision
        versions = sorted({str(v) for w in windows for v in w.get("model_versions", [])})
        new_cursor["last_launch_at"] = now
        request = dg.RunRequest(
            run_key=run_key(spec.name, str(window), versions).replace(":drift:", f":{decision.signal}:"),
            tags={
                paths.TRIGGER_RUN_TAG: str(decision.signal),
                "kiln/retrain_signals": ",".join(decision.fired),
                "kiln/retrain_reason": decision.reason[:200],
                "kiln/drift_window": str(window),
                "kiln/drift_model_versions": ",".join(versions),
                "kiln/drifted_columns": ",".join(next((d["drifted_columns"] for d in reversed(decisions)
                                                       if d["action"] == "retrain"), []))[:200],
            },
        )
        return new_cursor, request, decision

    def new_labeled_rows(context: Any, since: float | None) -> int:
        """Rows that reached `<p>/validated` after the champion was trained (its training window ends there): the new
        labeled training rows a retrain would learn from. Every stored partition counts when the time is unknown."""
        validated_key = dg.AssetKey(key(spec.name, "validated"))
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=validated_key, after_timestamp=since), limit=10_000).records
        rows: dict[str, int] = {}
        for record in records:  # newest first: the latest materialization of each partition counts
            m = record.asset_materialization
            if m is None or (m.partition or "") in rows:
                continue
            by_partition = m.metadata.get("rows_by_partition")
            count = by_partition.value.get(m.partition) if by_partition is not None else None
            rows[m.partition or ""] = int(count if count is not None else m.metadata["dagster/row_count"].value)
        return sum(rows.values())

    return drift


def build_log_sensor(spec: PipelineSpec, observe_job: Any) -> dg.SensorDefinition:
    """The `<p>_prediction_log` sensor: new logged rows (seen as new prediction-log objects) launch `<p>_observe`."""
    import dagster as dg

    @dg.sensor(
        name=f"{spec.name}_prediction_log",
        job=observe_job,
        minimum_interval_seconds=spec.drift.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"New rows in {spec.name}'s prediction log (or new label files) materialize {spec.name}/predictions "
                    f"(a new drift window){' and ' + spec.name + '/labels' if spec.labels is not None else ''}.",
        required_resource_keys={"storage"},
    )
    def prediction_log(context) -> Any:
        from kiln.windows import LOG_SETTLE_S, log_signature

        # the newest log object listed in the last hour(s) and their count: a listing, no object is read
        signature = logged = log_signature(context.resources.storage.state_root, spec.name)
        labelled = ""
        if spec.labels is not None:  # arriving label files are joined by the same job (`<p>/labels`), traffic or not
            labelled = label_signature(context.resources.storage.source_dir(spec.labels.path))
            signature += ";labels:" + labelled
        if not logged and not labelled:
            return dg.SkipReason(f"nothing logged in the last {LOG_SETTLE_S / 3600:g} hour(s)")
        if signature == context.cursor:
            return dg.SkipReason("no new logged rows" + (" or labels" if spec.labels is not None else ""))
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

    def label_signature(folder: Any) -> str:
        """Names and sizes of the label files (no file is read)."""
        from kiln.labels import label_files

        return ",".join(f"{p.name}:{p.stat().st_size}" for p in label_files(folder, spec))

    return prediction_log
