"""`<p>/labels`: ground truth that arrived after the prediction, joined to the prediction log by key.

Only for a spec with a ``labels:`` section. Each window's realized performance (from its labeled rows) is stored next
to the label-free estimate (:mod:`kiln.labels`, :mod:`kiln.performance`); the drift sensor reads it for the
``realized_performance`` retrain signal and `kiln slo` reports both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from assets.stage import asset_args
from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/labels` asset."""
    import dagster as dg

    assert spec.labels is not None

    @dg.asset(
        **asset_args(spec, "labels"),
        deps=[dg.AssetDep(key(spec.name, "predictions"))],
        io_manager_key="parquet_io_manager",
        kinds={"polars"},
        required_resource_keys={"storage"},
        description=(f"Delayed labels from {spec.labels.path} joined to logged predictions by {spec.labels.key}: realized "
                     f"performance per window next to the estimate; labels that match no prediction are counted."),
    )
    def labels(context):
        import time

        import polars as pl

        from assets.metadata import inline_png
        from kiln import paths
        from kiln.labels import read_labels, realized_in_lookback
        from kiln.reference import load_reference
        from kiln.state import read_json, state_path, write_json
        from kiln.windows import load_windows, read_log_since

        assert spec.labels is not None
        state_root = context.resources.storage.state_root
        folder = context.resources.storage.source_dir(spec.labels.path)
        since = time.time() - spec.labels.lookback_days * 86400.0
        arrived = read_labels(folder, spec)
        calibration = (load_reference(state_root, spec.name) or {}).get("performance")
        # Only the log objects of the lookback are read (listed from its hour on), so the cost follows the lookback,
        # not the log's age; windows that ended before it keep the realized numbers they had.
        log = read_log_since(state_root, spec.name, since, settle_s=0.0)
        windows = load_windows(state_root, spec.name)
        if arrived is None or calibration is None:
            why = "no label file yet" if arrived is None else "the champion has no score calibration (no estimate to compare)"
            context.log.info(f"{spec.name}/labels: {why}")
            return dg.Output(per_window_frame([], {}), metadata={"labels": 0 if arrived is None else arrived.height, "skipped": why})
        if log is None:
            log = pl.DataFrame(schema={spec.labels.key: pl.String, "_prediction": pl.Float64, "_logged_at": pl.Float64})
        realized_path = state_path(state_root, paths.realized_file(spec.name))
        result = realized_in_lookback(spec, log, arrived, windows, calibration, since, read_json(realized_path))
        result["lookback_days"] = spec.labels.lookback_days
        result["updated_at"] = time.time()
        write_json(realized_path, result)
        frame = per_window_frame(windows, result["windows"])
        metric = spec.retrain.metric
        metadata: dict[str, Any] = {
            "dagster/row_count": frame.height,
            "labels": result["labels"], "labels_matched": result["matched"], "labels_unmatched": result["unmatched"],
            "labels_relabelled": result["relabelled"], "windows_with_labels": len(result["windows"]),
            f"reference_{metric}": (calibration.get("reference") or {}).get(metric),
        }
        if result["unmatched"]:
            context.log.warning(f"{spec.name}/labels: {result['unmatched']} label(s) match no logged prediction "
                                f"(by {spec.labels.key}); counted, not used")
        if frame.height:
            metadata["performance_plot"] = dg.MetadataValue.md(inline_png(
                "estimated vs realized", performance_plot(frame, metric, (calibration.get("reference") or {}).get(metric))))
            metadata["performance_table"] = dg.MetadataValue.md(performance_table(frame, metric))
        return dg.Output(frame, metadata=metadata)

    return labels


def per_window_frame(windows: list[dict[str, Any]], realized: dict[str, Any]) -> Any:
    """One row per window: rows, estimated metrics with band, realized metrics (null until labels arrive)."""
    import polars as pl

    from kiln.performance import METRICS

    records = []
    for w in windows:
        estimated = (w.get("estimated") or {}).get("metrics", {})
        got = (realized.get(w["window_id"]) or {}).get("metrics", {})
        row: dict[str, Any] = {"window": w["window_id"], "until": w["until"], "rows": int(w["counts"]["n"]),
                               "labeled_rows": int((realized.get(w["window_id"]) or {}).get("rows", 0))}
        for m in METRICS:
            row[f"estimated_{m}"] = (estimated.get(m) or {}).get("value")
            row[f"estimated_{m}_lower"] = (estimated.get(m) or {}).get("lower")
            row[f"estimated_{m}_upper"] = (estimated.get(m) or {}).get("upper")
            row[f"realized_{m}"] = got.get(m)
        records.append(row)
    schema = {"window": pl.String, "until": pl.Float64, "rows": pl.Int64, "labeled_rows": pl.Int64,
              **{f"{kind}_{m}{suffix}": pl.Float64 for m in METRICS for kind, suffix in
                 (("estimated", ""), ("estimated", "_lower"), ("estimated", "_upper"), ("realized", ""))}}
    return pl.DataFrame(records, schema=schema)


def performance_table(frame: Any, metric: str) -> str:
    """Markdown: per window, rows, labeled rows, the estimate with its band and the realized value of ``metric``."""
    def num(v: Any) -> str:
        return "" if v is None else f"{v:.4f}"

    lines = [f"| window | rows | labeled | estimated {metric} | band | realized {metric} |", "|---|---|---|---|---|---|"]
    for r in frame.iter_rows(named=True):
        band = f"{num(r[f'estimated_{metric}_lower'])}..{num(r[f'estimated_{metric}_upper'])}"
        lines.append(f"| {r['window']} | {r['rows']} | {r['labeled_rows']} | {num(r[f'estimated_{metric}'])} | {band} | "
                     f"{num(r[f'realized_{metric}'])} |")
    return "\n".join(lines)


def performance_plot(frame: Any, metric: str, reference: float | None) -> bytes:
    """A PNG: estimated metric with its band, realized metric and the reference line, per window."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(column: str) -> list[float]:  # a metric a window could not give (no labels yet, one class) is a gap
        return [float("nan") if v is None else float(v) for v in frame[column].to_list()]

    x = list(range(frame.height))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.fill_between(x, values(f"estimated_{metric}_lower"), values(f"estimated_{metric}_upper"), alpha=0.2, label="estimate band")
    ax.plot(x, values(f"estimated_{metric}"), marker="o", label=f"estimated {metric}")
    ax.plot(x, values(f"realized_{metric}"), marker="s", label=f"realized {metric} (labels)")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label="reference (training holdout)")
    ax.set_xlabel("window")
    ax.set_ylabel(metric)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
