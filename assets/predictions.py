"""`<p>/predictions`: the endpoint's prediction log, ingested for monitoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assets.drift_report import PREDICTION, reference_id
from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import polars as pl


def read_log(folder: Any) -> pl.DataFrame | None:
    """All logged prediction rows in a folder of JSON-lines files, or None when nothing was logged."""
    import polars as pl

    files = sorted(folder.glob("*.jsonl"))
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        return None
    return pl.concat([pl.read_ndjson(f) for f in files], how="diagonal_relaxed")


def window_counts(spec: PipelineSpec, rows: pl.DataFrame, reference: dict[str, Any]) -> dict[str, Any]:
    """Bin counts of logged request rows in the training reference's bins (features computed as in training)."""
    import polars as pl

    from assets.validated import cast_to_spec
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


def append_window(spec: PipelineSpec, log: pl.DataFrame, state_root: str) -> dict[str, Any] | None:
    """Store the bin counts of rows logged since the last window; the drift sensor reads only these records."""
    import polars as pl

    from sensors.drift import windows_file

    reference_path = Path(state_root) / "reference" / spec.name / "reference.json"
    if not reference_path.exists() or log.height == 0:
        return None
    path = windows_file(state_root, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    since = json.loads(lines[-1])["until"] if lines else 0.0
    new = log.filter(pl.col("_logged_at") > since)
    if new.height == 0:
        return None
    until = float(new["_logged_at"].max())  # type: ignore[arg-type]
    reference = json.loads(reference_path.read_text())
    record = {
        "window_id": f"{since:.6f}-{until:.6f}",
        "since": since,
        "until": until,
        "model_versions": sorted(new["_model_version"].cast(pl.String).unique().to_list()),
        "reference_id": reference_id(reference),
        "counts": window_counts(spec, new, reference),
    }
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/predictions` asset."""
    import dagster as dg

    from kiln import steps as k8s
    from resources.serving import ServingResource

    @dg.asset(
        key=key(spec.name, "predictions"),
        group_name=spec.name,
        op_tags=k8s.op_tags(spec, "predictions"),
        pool=k8s.pool(spec, "predictions"),
        deps=[dg.AssetDep(key(spec.name, "endpoint"))],
        io_manager_key="parquet_io_manager",
        kinds={"polars"},
        required_resource_keys={"serving", "mlflow"},
        description="Rows and predictions the endpoint served (its prediction log); new rows become a drift window.",
    )
    def predictions(context):
        import polars as pl

        serving: ServingResource = context.resources.serving
        log = read_log(serving.prediction_log_dir(spec.name))
        if log is None:
            log = pl.DataFrame(schema={"_logged_at": pl.Float64, "_model_version": pl.String, "_prediction": pl.Float64})
        window = append_window(spec, log, serving.state_root)
        versions = log["_model_version"].cast(pl.String).unique().sort().to_list() if log.height else []
        report_metadata = drift_report_metadata(context, spec, window, serving.state_root) if window else {}
        return dg.Output(
            log,
            metadata={
                "dagster/row_count": log.height,
                "model_versions": ", ".join(map(str, versions)) or "none",
                "mean_prediction": float(log["_prediction"].mean() or 0.0) if log.height else 0.0,  # type: ignore[arg-type]
                "new_window_rows": window["counts"]["n"] if window else 0,
                **report_metadata,
            },
        )

    return predictions


def drift_report_metadata(context: Any, spec: PipelineSpec, window: dict[str, Any], state_root: str) -> dict[str, Any]:
    """Draw the new window's drift report, log it to the champion's MLflow run, and return it as asset metadata."""
    import dagster as dg

    from assets.drift_report import log_report, psi_markdown, reference_path, write_report
    from assets.report import inline_png
    from sensors.drift import evaluate_windows

    reference = json.loads(reference_path(state_root, spec.name).read_text())
    decisions, _ = evaluate_windows(spec, reference, [window], {}, now=0.0)
    report = write_report(spec, reference, window, Path(state_root) / "drift" / spec.name / "reports", decisions[0])
    metadata: dict[str, Any] = {
        "drift_report": dg.MetadataValue.path(str(report["image"])),
        "drift_plot": dg.MetadataValue.md(inline_png("reference vs current", Path(report["image"]).read_bytes())),
        "drift_psi_table": dg.MetadataValue.md(psi_markdown(report["rows"])),
        "drift_max_psi": max((r["psi"] for r in report["rows"]), default=0.0),
        "drift_window": window["window_id"],
    }
    champion = context.resources.mlflow.champion(spec.name)
    if champion is not None:
        artifact_path = log_report(context.resources.mlflow.client(), champion.run_id, report, window["window_id"])
        metadata["drift_report_mlflow"] = f"runs:/{champion.run_id}/{artifact_path}"
    return metadata

