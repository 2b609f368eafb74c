"""`<p>/features`: model-ready columns (`kiln.features.compute_features`) and the drift reference profile."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/features` asset: all validated partitions, featurized, plus the drift reference profile."""
    import dagster as dg

    from assets.stage import asset_args
    from kiln.features import data_version, feature_columns, feature_reference, feature_table, sample_rows
    from kiln.reference import publish_features_reference
    from resources.storage import KilnStorage

    @dg.asset(
        **asset_args(spec, "features"),
        ins={"validated": dg.AssetIn(key(spec.name, "validated"), metadata={"allow_missing_partitions": True})},
        io_manager_key="parquet_io_manager",
        kinds={"polars"},
        required_resource_keys={"storage"},
        description="Model-ready features of every validated partition, and the drift reference profile.",
        check_specs=[dg.AssetCheckSpec("schema_change", asset=key(spec.name, "features"),
                                       description="Feature columns or dtypes changed since the last training set.")],
    )
    def features(context, validated: Any):
        storage: KilnStorage = context.resources.storage

        frames = list(validated.values()) if isinstance(validated, dict) else [validated]
        if not frames:
            raise ValueError(f"{spec.name}: no validated partitions yet; materialize {spec.name}/validated first")
        source, frame = feature_table(frames, spec)
        from assets.metadata import column_schema, reference_table, schema_change

        schema = column_schema(frame)
        unchanged, change = schema_change(context, dg.AssetKey(key(spec.name, "features")), schema)
        version = data_version(frame)
        reference = feature_reference(spec, source, frame)
        ref_path = publish_features_reference(storage.state_root, spec.name, version, reference, sample_rows(source, spec))
        yield dg.Output(
            frame,
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": frame.height,
                "dagster/column_schema": schema,
                "dagster/column_lineage": column_lineage(spec, dg.AssetKey(key(spec.name, "validated"))),
                "partitions": len(frames),
                "feature_names": ", ".join(feature_columns(spec, frame)),
                "positive_rate": float(frame[spec.target].mean() or 0.0) if spec.task == "classification" else 0.0,  # type: ignore[arg-type]
                "data_version": version,
                "reference_profile": dg.MetadataValue.path(str(ref_path)),
                "reference_bins": reference_table(reference),
            },
        )
        yield dg.AssetCheckResult(check_name="schema_change", passed=unchanged, severity=dg.AssetCheckSeverity.WARN, metadata=change)

    return features


def column_lineage(spec: PipelineSpec, validated_key: Any) -> Any:
    """`kiln.features.feature_sources` as Dagster column lineage (shown in the UI)."""
    import dagster as dg

    from kiln.features import feature_sources

    return dg.TableColumnLineage(deps_by_column={
        name: [dg.TableColumnDep(asset_key=validated_key, column_name=c) for c in cols]
        for name, cols in feature_sources(spec).items() if cols
    })
