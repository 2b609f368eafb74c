"""`<p>/predictions`: the endpoint's prediction log, ingested for monitoring."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from assets.keys import key
from platform_defs.spec import PipelineSpec

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


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/predictions` asset."""
    import dagster as dg

    from resources.serving import ServingResource

    @dg.asset(
        key=key(spec.name, "predictions"),
        group_name=spec.name,
        deps=[dg.AssetDep(key(spec.name, "endpoint"))],
        io_manager_key="parquet_io_manager",
        kinds={"polars"},
        required_resource_keys={"serving"},
        description="Rows and predictions the endpoint served (its prediction log), for drift monitoring.",
    )
    def predictions(context):
        serving: ServingResource = context.resources.serving
        import polars as pl

        log = read_log(serving.prediction_log_dir(spec.name))
        if log is None:
            log = pl.DataFrame(schema={"_logged_at": pl.Float64, "_model_version": pl.String, "_prediction": pl.Float64})
        versions = log["_model_version"].unique().sort().to_list() if log.height else []
        return dg.Output(
            log,
            metadata={
                "dagster/row_count": log.height,
                "model_versions": ", ".join(map(str, versions)) or "none",
                "mean_prediction": float(log["_prediction"].mean() or 0.0) if log.height else 0.0,
            },
        )

    return predictions
