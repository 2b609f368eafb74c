"""Service-level indicators of one pipeline, read from the platform itself (`kiln slo <p>`).

Endpoint requests, availability, latency percentiles and rows come from the telemetry objects every endpoint worker
stores (:mod:`kiln.telemetry`), summed over a window (the last 24 h by default), so a roll, a restart or several replicas
neither reset nor split them; the live endpoint's ``/metrics`` (Kiln's ``kiln_requests_*`` series; BentoML's built-in
``bentoml_service_request_*`` ones for an endpoint without them), which count only what the running processes saw, are
reported next to them under ``endpoint.live`` for comparison and stay what Prometheus scrapes. Data freshness
from the source files, the drift trend from the windows ``<p>/predictions`` stored, training success from the
Dagster runs of ``<p>_retrain``, and the serving cost from the endpoint process tree's CPU time in ``/proc``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from kiln import paths as kiln_paths
from kiln.process import pid_alive
from kiln.spec import PipelineSpec

REQUESTS = "bentoml_service_request"  # counter; prometheus_client's parser strips the _total suffix
DURATION = "bentoml_service_request_duration_seconds"
KILN_REQUESTS = "kiln_requests"  # serving.metrics: /predict answers by status, whichever route they came by
KILN_DURATION = "kiln_request_duration_seconds"
PREDICT_PATH = "/predict"
TREND_WINDOWS = 10
SLI_WINDOW_S = 24 * 3600.0  # the endpoint SLIs cover the telemetry of the last day


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    """Prometheus text to {family: [(labels, value, sample name)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, list[tuple[dict[str, str], float, str]]] = {}
    for family in text_string_to_metric_families(text):
        families.setdefault(family.name, []).extend((dict(s.labels), float(s.value), s.name) for s in family.samples)
    return families


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile from cumulative histogram buckets [(upper bound, count)], interpolated within a bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def endpoint_sli(text: str, path: str = PREDICT_PATH) -> dict[str, Any]:
    """Requests, availability (share of non-5xx answers) and p95 latency of ``path`` from a ``/metrics`` answer.

    Kiln's ``kiln_requests_total{status}`` and ``kiln_request_duration_seconds`` count every ``/predict`` answer once
    (serving.service); BentoML's ``bentoml_service_request_*`` series are read for an endpoint that has no Kiln series.
    """
    families = parse_metrics(text)
    total = errors = 0.0
    merged: dict[float, float] = {}
    if path == PREDICT_PATH and KILN_REQUESTS in families:  # Kiln's series are /predict's alone: no endpoint label
        requests, duration, status_label, endpoint = KILN_REQUESTS, KILN_DURATION, "status", None
    else:
        requests, duration, status_label, endpoint = REQUESTS, DURATION, "http_response_code", path
    for labels, value, name in families.get(requests, []):
        if name.endswith("_total") and (endpoint is None or labels.get("endpoint") == endpoint):
            total += value
            errors += value if str(labels.get(status_label, "")).startswith("5") else 0.0
    for labels, value, name in families.get(duration, []):
        if name.endswith("_bucket") and (endpoint is None or labels.get("endpoint") == endpoint):
            bound = float(labels["le"])
            merged[bound] = merged.get(bound, 0.0) + value
    p95 = quantile(list(merged.items()), 0.95)
    return {"requests": int(total), "errors_5xx": int(errors), "availability": (total - errors) / total if total else None,
            "p95_latency_s": p95}


def process_tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and all its live descendants (plus their reaped children), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = sum(int(v) for v in fields[11:15]) / ticks  # utime stime cutime cstime
    tree, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(p, 0.0) for p in tree)


def freshness(spec: PipelineSpec, source_root: Path, now: float | None = None) -> dict[str, Any]:
    """Newest source file and partition of a local source, and its age."""
    now = now or time.time()
    folder = source_root / spec.source.path
    files = sorted(folder.glob(f"*.{spec.source.format}")) if folder.exists() else []
    if not files:
        return {"source": str(folder), "files": 0, "newest_partition": None, "age_hours": None}
    newest = max(files, key=lambda f: f.stat().st_mtime)
    return {"source": str(folder), "files": len(files), "newest_partition": max(f.stem for f in files),
            "age_hours": round((now - newest.stat().st_mtime) / 3600, 3)}


def drift_trend(spec: PipelineSpec, state_root: Path, windows: int = TREND_WINDOWS) -> dict[str, Any]:
    """Max drift score of the last ``windows`` observed prediction windows (from stored bin counts) and the last decision."""
    from kiln.drift import column_scores
    from kiln.reference import load_reference
    from kiln.windows import last_decision, load_windows

    root = str(state_root)
    trend: list[dict[str, Any]] = []
    reference = load_reference(root, spec.name)
    if reference is not None:
        for window in load_windows(root, spec.name, windows):
            scores = column_scores(reference, window["counts"], spec.drift.method)
            trend.append({"window": window.get("window_id"), "n": int(window["counts"]["n"]),
                          "max_score": round(max(scores.values()), 5) if scores else None})
    return {"method": spec.drift.method, "threshold": spec.drift.threshold, "windows": trend,
            "last_decision": last_decision(root, spec.name)}


def performance_trend(spec: PipelineSpec, state_root: Path, windows: int = TREND_WINDOWS) -> dict[str, Any]:
    """Estimated (label-free, with band) and realized (from labels) ``retrain.metric`` of the last windows, the
    reference it is compared with, the label counts and the last retrain decision."""
    from kiln.reference import load_reference
    from kiln.windows import last_retrain_decision, load_realized, load_windows

    metric = spec.retrain.metric
    reference = load_reference(str(state_root), spec.name) or {}
    calibration = reference.get("performance")
    if spec.task != "classification" or calibration is None:
        return {"metric": metric, "estimated": "not estimated" + (" (regression)" if spec.task != "classification" else
                                                                  " (the champion has no score calibration)")}
    realized = load_realized(str(state_root), spec.name)
    trend = []
    for w in load_windows(str(state_root), spec.name, windows):
        estimate = ((w.get("estimated") or {}).get("metrics") or {}).get(metric) or {}
        got = ((realized.get("windows") or {}).get(w["window_id"]) or {}).get("metrics", {}).get(metric)
        trend.append({"window": w["window_id"], "n": int(w["counts"]["n"]), "estimated": estimate.get("value"),
                      "lower": estimate.get("lower"), "upper": estimate.get("upper"), "realized": got})
    return {"metric": metric, "reference": (calibration.get("reference") or {}).get(metric), "windows": trend,
            "labels": {k: realized.get(k) for k in ("labels", "matched", "unmatched", "relabelled")} if realized else None,
            "last_retrain_decision": last_retrain_decision(str(state_root), spec.name)}


def training_success(pipeline: str, instance: Any) -> dict[str, Any]:
    """Finished runs of ``<p>_retrain`` and the share that succeeded."""
    import dagster as dg

    runs = instance.get_runs(filters=dg.RunsFilter(job_name=f"{pipeline}_retrain"))
    finished = [r for r in runs if r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)]
    ok = sum(r.status == dg.DagsterRunStatus.SUCCESS for r in finished)
    return {"runs": len(finished), "succeeded": ok, "success_rate": ok / len(finished) if finished else None}


PROMOTED_TAG = kiln_paths.PROMOTED_TAG  # set by the champion gate (assets/champion.py)
ROLLED_BACK_TAG = kiln_paths.ROLLED_BACK_BY_TAG  # set by `kiln rollback` (platform_defs/rollback.py)


def last_drift_retrain(pipeline: str, state_root: Path) -> float | None:
    """When the drift sensor last decided to retrain (its decisions in the state store), as a Unix time."""
    from kiln.windows import last_drift_retrain_at

    return last_drift_retrain_at(str(state_root), pipeline)


def registry_indicators(client: Any, pipeline: str, drift_retrain_at: float | None) -> dict[str, Any]:
    """Promotions, rollbacks and their rate (MLflow version tags), and seconds from the last drift retrain decision
    to the first champion promoted after it."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{pipeline}'")
    except MlflowException:
        versions = []
    promoted = [v for v in versions if PROMOTED_TAG in (v.tags or {})]
    rollbacks = [v for v in versions if ROLLED_BACK_TAG in (v.tags or {})]
    drift_to_champion = None
    if drift_retrain_at is not None:
        later = sorted(v.creation_timestamp / 1000 for v in promoted if v.creation_timestamp / 1000 >= drift_retrain_at)
        drift_to_champion = later[0] - drift_retrain_at if later else None
    return {"model_versions": len(versions), "promotions": len(promoted), "rollbacks": len(rollbacks),
            "rollback_rate": len(rollbacks) / len(promoted) if promoted else 0.0, "drift_to_new_champion_s": drift_to_champion}


def stored_endpoint_sli(state_root: Path, pipeline: str, window_s: float | None = SLI_WINDOW_S,
                        now: float | None = None) -> dict[str, Any]:
    """Requests, availability, p50/p95/p99 latency, rows and 4xx/5xx answers of ``/predict`` from the stored telemetry
    of the last ``window_s`` seconds (None: all of it), with the window and how many objects and replicas it summed."""
    from kiln.telemetry import load_telemetry, slis

    now = time.time() if now is None else now
    since = None if window_s is None else now - window_s
    summary = load_telemetry(str(state_root), pipeline, since, None)
    got = slis(summary)
    return {**got, "p95_latency_s": None if got["p95_ms"] is None else got["p95_ms"] / 1000,
            "window": {"since": since, "until": now, "seconds": window_s, "objects": summary["objects"],
                       "replicas": len(summary["replicas"]), "unreadable": summary["unreadable"]}}


def slo_report(spec: PipelineSpec, paths: dict[str, Path], serving: Any, instance: Any | None,
               mlflow_client: Any | None = None, window_s: float | None = SLI_WINDOW_S) -> dict[str, Any]:
    """Every SLI of one pipeline (local profile): endpoint (stored telemetry of the last ``window_s`` seconds, None: all;
    the live ``/metrics`` under ``endpoint.live``), freshness, drift, training, cost."""
    import httpx

    state = serving.state(spec.name)
    endpoint: dict[str, Any] = {"url": None, "reachable": False, "source": "telemetry",
                                **stored_endpoint_sli(paths["state"], spec.name, window_s), "live": None}
    cost: dict[str, Any] = {"cpu_seconds": None, "predictions": None, "cpu_seconds_per_1k_predictions": None}
    if state:
        endpoint["url"] = state["url"]
        try:
            text = httpx.get(f"{state['url']}/metrics", timeout=10).text
            endpoint.update(reachable=True, live=endpoint_sli(text))
            rows = sum(v for labels, v, name in parse_metrics(text).get("kiln_predicted_rows", []) if name.endswith("_total"))
            predictions = int(rows) if rows else endpoint["live"]["requests"]
            pid = state.get("backend_pid") or state.get("pid")
            cpu = process_tree_cpu_seconds(int(pid)) if pid and pid_alive(int(pid)) else None
            cost = {"cpu_seconds": cpu, "predictions": predictions,
                    "cpu_seconds_per_1k_predictions": cpu / predictions * 1000 if cpu is not None and predictions else None}
        except httpx.HTTPError as exc:
            endpoint["error"] = str(exc)
    return {
        "pipeline": spec.name,
        "endpoint": endpoint,
        "freshness": freshness(spec, paths["sources"]),
        "drift": drift_trend(spec, paths["state"]),
        "performance": performance_trend(spec, paths["state"]),
        "training": training_success(spec.name, instance) if instance is not None else None,
        "registry": (registry_indicators(mlflow_client, spec.name, last_drift_retrain(spec.name, paths["state"]))
                     if mlflow_client is not None else None),
        "cost": cost,
    }


def record_observation(report: dict[str, Any], instance: Any) -> None:
    """Record the SLIs as an observation on ``<p>/endpoint`` so the UI shows their history next to the endpoint."""
    import dagster as dg

    from kiln.keys import key

    endpoint, registry = report["endpoint"], report.get("registry") or {}
    metadata = {
        "sli/availability": endpoint.get("availability"),
        "sli/p95_latency_s": endpoint.get("p95_latency_s"),
        "sli/requests": endpoint.get("requests"),
        "sli/freshness_age_hours": report["freshness"].get("age_hours"),
        "sli/last_drift_score": (report["drift"].get("windows") or [{}])[-1].get("max_score"),
        "sli/training_success_rate": (report.get("training") or {}).get("success_rate"),
        "sli/rollback_rate": registry.get("rollback_rate"),
        "sli/drift_to_new_champion_s": registry.get("drift_to_new_champion_s"),
        "sli/cpu_seconds_per_1k_predictions": report["cost"].get("cpu_seconds_per_1k_predictions"),
    }
    clean = {k: float(v) for k, v in metadata.items() if isinstance(v, int | float)}
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=key(report["pipeline"], "endpoint"), metadata={**clean, "sli/report": dg.MetadataValue.json(report)})
    )
