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
        backfill_policy=dg.BackfillPolicy.single_run() if partitions_def(spec) else None,
    )
    def validated(context, raw: Any):
        from assets.metadata import run_partitions
        from kiln.contracts import check_quality, rejected_by_column, rejected_by_rule
        from kiln.keyindex import repeated_keys, write_key_index
        from kiln.paths import key_index_dir
        from kiln.source import source_file
        from resources.storage import storage_path

        storage: KilnStorage = context.resources.storage
        partitions = run_partitions(context)
        index = storage_path(storage.state_root) / key_index_dir(spec.name)

        def check(partition: str | None, frame: Any, pending: dict[str, Any]) -> tuple[Any, str]:
            """The quality report of one partition's raw rows (keys checked against stored and ``pending`` partitions)."""
            file = str(source_file(storage.source_dir(spec.source.path), spec, partition)) if partition else spec.source.path
            keys = spec.key_columns if partition else []
            lookup = (lambda typed: repeated_keys(index, partition, typed, keys, pending)) if keys and partition else None
            return check_quality(frame, spec, partition, lookup), file

        if len(partitions) > 1:  # a single-run backfill: every partition passes, or none is stored
            yield from validated_batch(context, [p for p in partitions if p is not None], raw, check, index)
            return
        partition = partitions[0]
        keys = spec.key_columns if partition else []
        report, file = check(partition, raw, {})
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

    def validated_batch(context: Any, partitions: list[str], raw: dict[str, Any], check: Any, index: Any) -> Any:
        """validated + quarantine over several partitions in one run, in partition order (a key seen in an earlier day of
        the run counts as stored). Stored only when no partition is rejected; the check names every failing one."""
        from assets.metadata import batch_check_result
        from kiln.contracts import rejected_by_column, rejected_by_rule
        from kiln.keyindex import write_key_index

        reports: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        files: dict[str, str] = {}
        for partition in partitions:
            report, files[partition] = check(partition, raw[partition], pending)
            reports[partition] = report
            if not report.blocking:
                pending[partition] = report.good
        checked = batch_check_result("quality_contract", validated_key,
                                     {p: (r.failures, r.rows, files[p]) for p, r in reports.items()})
        by_rule: dict[str, int] = {}
        for r in reports.values():
            for rule, n in rejected_by_rule(r.bad).items():
                by_rule[rule] = by_rule.get(rule, 0) + n
        quarantined = sum(r.bad.height for r in reports.values())
        result = dg.AssetCheckResult(asset_key=validated_key, check_name="quality_contract", passed=checked.passed,
                                     severity=checked.severity,
                                     metadata={**checked.metadata, "rows_quarantined": quarantined,
                                               "quarantined_by_rule": dg.MetadataValue.json(by_rule)})
        rejected = [p for p, r in reports.items() if r.blocking]
        if rejected:
            context.log.error(f"{spec.name}/validated: {', '.join(rejected)} rejected, so none of the {len(partitions)} "
                              f"partitions of this run is stored: {result.metadata['summary'].value}")
            yield result
            yield dg.AssetCheckResult(asset_key=validated_key, check_name="schema_change", passed=True,
                                      metadata={"skipped": "partitions rejected"})
            return
        yield dg.Output({p: r.bad for p, r in reports.items()}, output_name="quarantine",
                        metadata={"dagster/row_count": quarantined, "partitions": len(partitions),
                                  "reasons": dg.MetadataValue.json(by_rule)})
        good = {p: r.good for p, r in reports.items()}
        schema = column_schema(good[partitions[-1]])
        unchanged, change = schema_change(context, validated_key, schema)
        yield dg.Output(good, output_name="validated", metadata={
            "dagster/row_count": sum(f.height for f in good.values()), "dagster/column_schema": schema,
            "rows_in": sum(f.height for f in raw.values()), "rows_quarantined": quarantined, "partitions": len(partitions),
            # every day's materialization carries the run's metadata: each day's own row count is here
            "rows_by_partition": dg.MetadataValue.json({p: f.height for p, f in good.items()}),
            "quarantined_by_column": dg.MetadataValue.json(
                {p: rejected_by_column(r.bad) for p, r in reports.items() if r.bad.height})})
        if spec.key_columns:  # stored: the run's keys now count against every other partition
            for partition, frame in good.items():
                write_key_index(index, partition, frame, spec.key_columns)
        yield result
        yield dg.AssetCheckResult(asset_key=validated_key, check_name="schema_change", passed=unchanged,
                                  severity=dg.AssetCheckSeverity.WARN, metadata=change)

    return [validated]
