"""`<p>_drift`: decides from stored bin counts whether live traffic drifted from the training reference.

It reads only the small JSON window records that `<p>/predictions` stores, never the log itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from platform_defs.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def windows_file(state_root: str, pipeline: str) -> Path:
    """Where `<p>/predictions` appends one JSON line of bin counts per observed window."""
    return Path(state_root) / "drift" / pipeline / "windows.jsonl"


def evaluate_windows(
    spec: PipelineSpec, reference: dict[str, Any], windows: list[dict[str, Any]], state: dict[str, Any], now: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the drift decision over new windows in order; returns the decisions and the final state."""
    from sensors.drift_stats import column_scores, decide

    decisions = []
    for window in windows:
        scores = column_scores(reference, window["counts"], spec.drift.method)
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
        )
        decisions.append(decision | {"window": window["window_id"], "scores": scores})
    return decisions, state


def build(spec: PipelineSpec, retrain_job: Any) -> dg.SensorDefinition:
    """The `<p>_drift` sensor."""
    import dagster as dg

    @dg.sensor(
        name=f"{spec.name}_drift",
        job=retrain_job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"{spec.drift.method.upper()} > {spec.drift.threshold} on stored bin counts launches {spec.name}_retrain.",
        required_resource_keys={"storage"},
    )
    def drift(context) -> Any:
        state_root = context.resources.storage.state_root
        path = windows_file(state_root, spec.name)
        reference_path = Path(state_root) / "reference" / spec.name / "reference.json"
        if not path.exists() or not reference_path.exists():
            return dg.SkipReason("no prediction windows observed yet")
        cursor: dict[str, Any] = json.loads(context.cursor) if context.cursor else {"seen": 0, "state": {}}
        lines = path.read_text().splitlines()
        new = [json.loads(line) for line in lines[cursor["seen"]:] if line.strip()]
        if not new:
            return dg.SkipReason(f"no new windows (seen {cursor['seen']})")
        reference = json.loads(reference_path.read_text())
        decisions, state = evaluate_windows(spec, reference, new, cursor.get("state", {}), time.time())
        context.update_cursor(json.dumps({"seen": len(lines), "state": state}))
        last = decisions[-1]
        summary = {k: last[k] for k in ("action", "max_score", "share", "drifted_columns", "streak", "n", "window")}
        (path.parent / "last_decision.json").write_text(json.dumps(summary | {"decided_at": time.time()}))
        context.log.info(f"{spec.name} drift decisions: {[(d['window'], d['action'], round(d['max_score'], 4)) for d in decisions]}")
        retrains = [d for d in decisions if d["action"] == "retrain"]
        if not retrains:
            return dg.SkipReason(f"{last['action']}: share {last['share']:.2f}, max score {last['max_score']:.3f}, streak {last['streak']}")
        d = retrains[-1]
        return dg.RunRequest(
            run_key=f"{spec.name}:drift:{d['window']}",
            tags={
                "kiln/trigger": "drift",
                "kiln/drift_window": str(d["window"]),
                "kiln/drifted_columns": ",".join(d["drifted_columns"])[:200],
            },
        )

    return drift
