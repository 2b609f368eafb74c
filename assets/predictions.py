"""`<p>/predictions`: the endpoint's prediction log (Parquet objects, :mod:`kiln.predlog`) read since the last drift window;
the new rows become the next window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from assets.stage import asset_args
from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/predictions` asset."""
    import dagster as dg

    @dg.asset(
        **asset_args(spec, "predictions"),
        deps=[dg.AssetDep(key(spec.name, "endpoint"))],
        io_manager_key="parquet_io_manager",
        kinds={"polars"},
        required_resource_keys={"serving", "mlflow"},
        description="Rows and predictions the endpoint served since the last drift window (from its prediction log); they "
                    "become the next drift window.",
    )
    def predictions(context):
        import polars as pl

        from kiln.windows import append_window, last_window_until, read_log_since

        state_root = context.resources.serving.state_root
        # Only the objects of the hours around the last window are read (the log itself grows without bound); the
        # asset's value is the rows logged since that window, the ones the new window is made of.
        since = last_window_until(state_root, spec.name)
        log = read_log_since(state_root, spec.name, since)
        if log is None:
            log = pl.DataFrame(schema={"_logged_at": pl.Float64, "_model_version": pl.String, "_prediction": pl.Float64})
        log = log.filter(pl.col("_logged_at").cast(pl.Float64) > since)
        window = append_window(spec, log, state_root)
        versions = log["_model_version"].cast(pl.String).unique().sort().to_list() if log.height else []
        return dg.Output(
            log,
            metadata={
                "dagster/row_count": log.height,
                "model_versions": ", ".join(map(str, versions)) or "none",
                "mean_prediction": float(log["_prediction"].mean() or 0.0) if log.height else 0.0,  # type: ignore[arg-type]
                "new_window_rows": window["counts"]["n"] if window else 0,
                **(drift_report_metadata(context, spec, window, state_root) if window else {}),
                **(performance_metadata(spec, state_root) if window and window.get("estimated") else {}),
                **({"performance_estimate": "not estimated: label-free estimation covers classification only"}
                   if spec.task != "classification" else {}),
            },
        )

    return predictions


TREND_WINDOWS = 30  # windows in the estimated-performance plot


def performance_metadata(spec: PipelineSpec, state_root: str) -> dict[str, Any]:
    """The label-free performance estimate of the last windows against the training reference (and realized values
    where labels arrived): a plot and the newest window's estimate with its band, so the UI shows the trend."""
    import dagster as dg

    from assets.labels import per_window_frame, performance_plot
    from assets.metadata import inline_png
    from kiln.reference import load_reference
    from kiln.windows import load_realized, load_windows

    metric = spec.retrain.metric
    windows = load_windows(state_root, spec.name, TREND_WINDOWS)
    frame = per_window_frame(windows, load_realized(state_root, spec.name).get("windows", {}))
    reference = ((load_reference(state_root, spec.name) or {}).get("performance") or {}).get("reference", {}).get(metric)
    newest = (windows[-1].get("estimated") or {}).get("metrics", {}).get(metric) or {}
    found = {f"estimated_{metric}": newest.get("value"), f"reference_{metric}": reference}
    return {
        **{k: v for k, v in found.items() if v is not None},
        f"estimated_{metric}_band": f"{newest.get('lower')}..{newest.get('upper')}",
        "performance_plot": dg.MetadataValue.md(inline_png("estimated vs reference", performance_plot(frame, metric, reference))),
    }


def drift_report_metadata(context: Any, spec: PipelineSpec, window: dict[str, Any], state_root: str) -> dict[str, Any]:
    """Draw the new window's drift report, log it to the champion's MLflow run, and return it as asset metadata."""
    from pathlib import Path

    import dagster as dg

    from assets.metadata import inline_png
    from kiln import paths
    from kiln.drift_report import log_report, psi_markdown, write_report
    from kiln.reference import load_reference
    from kiln.state import is_remote, state_path, write_atomic
    from kiln.windows import evaluate_windows

    reference = load_reference(state_root, spec.name) or {}
    decisions, _ = evaluate_windows(spec, reference, [window], {}, now=0.0)
    folder = state_path(state_root, paths.drift_reports_dir(spec.name))
    if isinstance(folder, Path) and not is_remote(folder):
        report = write_report(spec, reference, window, folder, decisions[0])
    else:  # drawn on local disk (matplotlib writes files), then one PUT per file into the state store
        import tempfile

        local = Path(tempfile.mkdtemp(prefix=f"kiln-drift-report-{spec.name}-"))
        report = write_report(spec, reference, window, local, decisions[0])
        for produced in (report["image"], report["table"]):
            write_atomic(folder / produced.name, produced.read_bytes())
    metadata: dict[str, Any] = {
        "drift_report": dg.MetadataValue.path(str(folder / report["image"].name)),
        "drift_plot": dg.MetadataValue.md(inline_png("reference vs current", report["image"].read_bytes())),
        "drift_psi_table": dg.MetadataValue.md(psi_markdown(report["rows"])),
        "drift_max_psi": max((r["psi"] for r in report["rows"]), default=0.0),
        "drift_window": window["window_id"],
    }
    champion = context.resources.mlflow.champion(spec.name)
    if champion is not None:
        artifact_path = log_report(context.resources.mlflow.client(), champion.run_id, report, window["window_id"])
        metadata["drift_report_mlflow"] = f"runs:/{champion.run_id}/{artifact_path}"
    return metadata
