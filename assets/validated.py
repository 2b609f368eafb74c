"""`<p>/validated` and `<p>/quarantine`: raw rows that pass the data contract, and the rows set aside.

The contract (rules, great-expectations suites, row split) lives in `kiln.contracts`; this module holds the Dagster
wiring: a multi-asset with the blocking quality check and a schema-change check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def build(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    """`<p>/validated` and `<p>/quarantine` with the blocking GX quality check and a schema-change check."""
    import dagster as dg

    from assets.metadata import check_result, column_schema, schema_change
    from assets.raw import partitions_def
    from assets.stage import op_args
    from kiln.contracts import bad_row_limit
    from resources.storage import KilnStorage

    validated_key = dg.AssetKey(key(spec.name, "validated"))
    limit = bad_row_limit(spec)

    @dg.multi_asset(
        name=f"{spec.name}__validated",
        **op_args(spec, "validated"),
        partitions_def=partitions_def(spec),
        ins={"raw": dg.AssetIn(dg.AssetKey(key(spec.name, "raw")))},
        outs={
            "validated": dg.AssetOut(key=validated_key, io_manager_key="parquet_io_manager", is_required=False, kinds={"polars"},
                                     description="Rows of raw data that pass the data contract, typed as the spec says."),
            "quarantine": dg.AssetOut(key=dg.AssetKey(key(spec.name, "quarantine")), io_manager_key="parquet_io_manager",
                                      is_required=False, kinds={"polars"},
                                      description="Rejected rows with the rules they broke (`_reasons`)."),
        },
        check_specs=[
            dg.AssetCheckSpec("quality_contract", asset=validated_key, blocking=True,
                              description=f"great-expectations: ranges, allowed values, unique keys; bad rows "
                                          f"{'quarantined up to ' + format(limit, '.0%') if limit else 'fail the partition'}."),
            dg.AssetCheckSpec("schema_change", asset=validated_key, description="Columns or dtypes changed since the last run."),
        ],
        required_resource_keys={"storage"},
        can_subset=False,
    )
    def validated(context, raw: Any):
        from kiln.contracts import check_quality, rejected_by_column, rejected_by_rule
        from kiln.keyindex import repeated_keys, write_key_index
        from kiln.paths import key_index_dir
        from kiln.source import source_file
        from resources.storage import storage_path

        storage: KilnStorage = context.resources.storage
        partition = context.partition_key if context.has_partition_key else None
        file = str(source_file(storage.source_dir(spec.source.path), spec, partition)) if partition else spec.source.path
        index = storage_path(storage.state_root) / key_index_dir(spec.name)
        keys = spec.key_columns if partition else []
        report = check_quality(raw, spec, partition,
                               (lambda typed: repeated_keys(index, partition, typed, keys)) if keys and partition else None)
        checked = check_result("quality_contract", validated_key, report.failures, report.rows, partition, file)
        # The check says how many rows went to `<p>/quarantine`: the per-rule counts add up to it.
        counts: dict[str, Any] = {"rows_quarantined": report.bad.height,
                                  "quarantined_by_rule": dg.MetadataValue.json(rejected_by_rule(report.bad))}
        result = dg.AssetCheckResult(asset_key=validated_key, check_name="quality_contract", passed=checked.passed,
                                     severity=checked.severity, metadata={**checked.metadata, **counts})
        rejected = dg.MetadataValue.json(rejected_by_column(report.bad))
        yield dg.Output(report.bad, output_name="quarantine",
                        metadata={"dagster/row_count": report.bad.height, "partition": partition or "none", "file": file,
                                  "reasons": rejected})
        if report.blocking:
            context.log.error(f"{spec.name}/validated [{partition}] rejected: {result.metadata['summary'].value}")
            yield result
            yield dg.AssetCheckResult(asset_key=validated_key, check_name="schema_change", passed=True,
                                      metadata={"skipped": "partition rejected"})
            return
        schema = column_schema(report.good)
        unchanged, change = schema_change(context, validated_key, schema)
        yield dg.Output(report.good, output_name="validated", metadata={
            "dagster/row_count": report.good.height, "dagster/column_schema": schema, "rows_in": raw.height,
            "rows_quarantined": report.bad.height, "quarantined_by_column": rejected, "partition": partition or "none"})
        if keys and partition:  # `<p>/validated` is stored: its keys now count against every other partition
            write_key_index(index, partition, report.good, keys)
        yield result
        yield dg.AssetCheckResult(asset_key=validated_key, check_name="schema_change", passed=unchanged,
                                  severity=dg.AssetCheckSeverity.WARN, metadata=change)

    return [validated]
