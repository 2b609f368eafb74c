"""`<p>/raw`: source files as they arrived, one partition per day, with the blocking schema contract.

Reading lives in `kiln.source`, the contract in `kiln.contracts`; this module holds the Dagster wiring, and the
check-result and column-schema metadata that `<p>/validated` and `<p>/features` use too.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg

RAW_WARN_HOURS = 26  # a daily source lands once a day; a little slack before warning
RAW_FAIL_HOURS = 48


def partitions_def(spec: PipelineSpec) -> dg.PartitionsDefinition | None:
    """Daily partitions from the spec's start date, or none."""
    import dagster as dg

    if spec.source.partitions == "daily":
        return dg.DailyPartitionsDefinition(start_date=spec.source.start_date)
    return None


def raw_freshness_policy(spec: PipelineSpec) -> dg.FreshnessPolicy | None:
    """Daily sources are expected every day: the UI warns after 26 h without a new materialization of raw, fails after 48 h."""
    import dagster as dg

    if spec.source.partitions != "daily":
        return None
    return dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=RAW_FAIL_HOURS), warn_window=timedelta(hours=RAW_WARN_HOURS))


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/raw` asset, with its blocking GX schema check and a schema-change check run in the same step."""
    import dagster as dg

    from assets.stage import asset_args
    from resources.storage import KilnStorage

    raw_key = dg.AssetKey(key(spec.name, "raw"))

    @dg.asset(
        **asset_args(spec, "raw"),
        partitions_def=partitions_def(spec),
        io_manager_key="parquet_io_manager",
        kinds={"polars", "parquet"},
        required_resource_keys={"storage"},
        output_required=False,
        description=f"{spec.name} source data as it arrived ({spec.source.format}, {spec.source.partitions}).",
        metadata={"source": spec.source.path, "format": spec.source.format},
        freshness_policy=raw_freshness_policy(spec),
        check_specs=[
            dg.AssetCheckSpec("schema_contract", asset=raw_key, blocking=True,
                              description="great-expectations: column set, exact dtypes, required non-nulls, row count; "
                                          "unreadable files fail it too."),
            dg.AssetCheckSpec("schema_change", asset=raw_key, description="Columns or dtypes changed since the last file."),
        ],
    )
    def raw(context):
        from assets.metadata import check_result, column_schema, schema_change
        from kiln.contracts import schema_failures, unreadable_failure
        from kiln.source import SourceReadError, read_source_folder, read_source_with_report, source_file
        from resources.storage import check_reachable

        storage: KilnStorage = context.resources.storage
        folder = storage.source_dir(spec.source.path)
        partition = context.partition_key if context.has_partition_key else None
        # Before listing the folder: an unreachable object store is not "file does not exist", and the error names the key.
        check_reachable(folder / f"{partition}.{spec.source.format}" if partition else folder)
        path = source_file(folder, spec, partition) if partition else folder
        try:
            frame, unparsed, widened = read_source_with_report(path, spec) if partition else read_source_folder(folder, spec)
        except SourceReadError as exc:
            yield check_result("schema_contract", raw_key, [unreadable_failure(spec, str(exc))], 0, partition, str(path))
            yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=True, metadata={"skipped": "unreadable"})
            return
        schema = column_schema(frame)
        unchanged, change = schema_change(context, raw_key, schema)
        failures = schema_failures(frame, spec, unparsed)
        contract = check_result("schema_contract", raw_key, failures, frame.height, partition, str(path))
        if contract.passed or contract.severity != dg.AssetCheckSeverity.ERROR:
            yield dg.Output(frame, metadata={"dagster/row_count": frame.height, "dagster/column_schema": schema,
                                             "source_file": str(path), "partition": partition or "none"})
        else:
            # A file that breaks the contract is not stored: raw and validated both keep the last good file, never a mix.
            context.log.warning(f"{spec.name}/raw {partition or ''}: {path} breaks the schema contract; not stored")
        # Widenings applied on reading (kiln.source.conform_dtypes), so a person sees what was changed to pass.
        yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_contract", passed=contract.passed, severity=contract.severity,
                                  metadata={**contract.metadata, "widened": dg.MetadataValue.json(widened)})
        yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=unchanged,
                                  severity=dg.AssetCheckSeverity.WARN, metadata=change)

    return raw
