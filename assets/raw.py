"""`<p>/raw`: source files as they arrived, one partition per day, with the blocking schema contract.

Reading lives in `kiln.source`, the contract in `kiln.contracts`; this module holds the Dagster wiring, and the
check-result and column-schema metadata that `<p>/validated` and `<p>/features` use too.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

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
        # A backfill of many days is one run (one process, one GX context), not one run per day.
        backfill_policy=dg.BackfillPolicy.single_run() if partitions_def(spec) else None,
        check_specs=[
            dg.AssetCheckSpec("schema_contract", asset=raw_key, blocking=True,
                              description="great-expectations: column set, exact dtypes, required non-nulls, row count; "
                                          "unreadable files fail it too."),
            dg.AssetCheckSpec("schema_change", asset=raw_key, description="Columns or dtypes changed since the last file."),
            dg.AssetCheckSpec("replacement_contract", asset=raw_key, blocking=True,
                              description="A file that replaces an already validated day must also pass the quality "
                                          "contract before it replaces raw: raw and validated both move, or both stay."),
        ],
    )
    def raw(context):
        from assets.metadata import check_result, column_schema, run_partitions, schema_change
        from kiln.contracts import schema_failures, unreadable_failure
        from kiln.source import SourceReadError, read_source_folder, read_source_with_report, source_file
        from resources.storage import check_reachable

        storage: KilnStorage = context.resources.storage
        folder = storage.source_dir(spec.source.path)
        partitions = run_partitions(context)
        # Before listing the folder: an unreachable object store is not "file does not exist", and the error names the key.
        first = partitions[0]
        check_reachable(folder / f"{first}.{spec.source.format}" if first else folder)

        def read(partition: str | None) -> tuple[Any, list[dict[str, Any]], str, dict[str, str]]:
            """(frame or None when unreadable, schema failures, file, widenings) of one partition's source file."""
            path = source_file(folder, spec, partition) if partition else folder
            try:
                frame, unparsed, widened = read_source_with_report(path, spec) if partition else read_source_folder(folder, spec)
            except SourceReadError as exc:
                return None, [unreadable_failure(spec, str(exc))], str(path), {}
            return frame, schema_failures(frame, spec, unparsed), str(path), widened

        if len(partitions) > 1:  # a single-run backfill: every file passes the contract, or none is stored
            yield from raw_batch(context, [p for p in partitions if p is not None], read)
            return
        partition = partitions[0]
        frame, failures, path, widened = read(partition)
        if frame is None:
            yield check_result("schema_contract", raw_key, failures, 0, partition, path)
            yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=True, metadata={"skipped": "unreadable"})
            yield dg.AssetCheckResult(asset_key=raw_key, check_name="replacement_contract", passed=True,
                                      metadata={"skipped": "unreadable"})
            return
        schema = column_schema(frame)
        unchanged, change = schema_change(context, raw_key, schema)
        contract = check_result("schema_contract", raw_key, failures, frame.height, partition, path)
        schema_ok = contract.passed or contract.severity != dg.AssetCheckSeverity.ERROR
        replacement = replacement_check(context, {partition: frame} if schema_ok and partition else {}, {partition: path})
        if schema_ok and replacement.passed:
            yield dg.Output(frame, metadata={"dagster/row_count": frame.height, "dagster/column_schema": schema,
                                             "source_file": path, "partition": partition or "none"})
        else:
            # A file that breaks the contract is not stored: raw and validated both keep the last good file, never a mix.
            context.log.warning(f"{spec.name}/raw {partition or ''}: {path} breaks the "
                                f"{'schema' if not schema_ok else 'quality'} contract; not stored")
        # Widenings applied on reading (kiln.source.conform_dtypes), so a person sees what was changed to pass.
        yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_contract", passed=contract.passed, severity=contract.severity,
                                  metadata={**contract.metadata, "widened": dg.MetadataValue.json(widened)})
        yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=unchanged,
                                  severity=dg.AssetCheckSeverity.WARN, metadata=change)
        yield replacement

    def replacement_check(context: Any, frames: dict[str, Any], files: dict[str, str]) -> Any:
        """``replacement_contract``: the days among ``frames`` that `<p>/validated` already holds are run through the
        quality contract (keys against the other stored days) before raw replaces them. Blocking when one fails."""
        from assets.metadata import batch_check_result, check_result
        from kiln.contracts import check_quality
        from kiln.keyindex import repeated_keys
        from kiln.paths import key_index_dir
        from resources.storage import storage_path

        validated_key = dg.AssetKey(key(spec.name, "validated"))
        replaced = [p for p in frames if context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=validated_key, asset_partitions=[p]), limit=1).records]
        if not replaced:
            return dg.AssetCheckResult(asset_key=raw_key, check_name="replacement_contract", passed=True,
                                       metadata={"replaced_partitions": "none"})
        index = storage_path(context.resources.storage.state_root) / key_index_dir(spec.name)
        keys = spec.key_columns
        reports = {}
        for p in replaced:
            lookup = (lambda typed, p=p: repeated_keys(index, p, typed, keys)) if keys else None
            reports[p] = check_quality(frames[p], spec, p, lookup)
        # Only blocking failures count here: rows within the quarantine limit are the validated step's to set aside.
        per = {p: ([f for f in r.failures if f.get("severity", "error") == "error"] if r.blocking else [], r.rows, files[p])
               for p, r in reports.items()}
        result = (check_result("replacement_contract", raw_key, per[replaced[0]][0], per[replaced[0]][1], replaced[0], files[replaced[0]])
                  if len(replaced) == 1 else batch_check_result("replacement_contract", raw_key, per))
        return dg.AssetCheckResult(asset_key=raw_key, check_name="replacement_contract", passed=result.passed,
                                   severity=result.severity, metadata={**result.metadata, "replaced_partitions": ", ".join(replaced)})

    def raw_batch(context: Any, partitions: list[str], read: Any) -> Any:
        """raw over several partitions in one run: one frame per partition, stored only when no file breaks the contract
        (the run's check names every failing partition, and `kiln demo`/ingest then retries those runs one by one)."""
        from assets.metadata import batch_check_result, column_schema, schema_change

        frames: dict[str, Any] = {}
        report: dict[str, tuple[list[dict[str, Any]], int, str]] = {}
        widenings: dict[str, Any] = {}
        for partition in partitions:
            frame, failures, path, widened = read(partition)
            report[partition] = (failures, 0 if frame is None else frame.height, path)
            if frame is not None:
                frames[partition] = frame
            if widened:
                widenings[partition] = widened
        contract = batch_check_result("schema_contract", raw_key, report)
        schema_ok = contract.passed or contract.severity != dg.AssetCheckSeverity.ERROR
        replacement = replacement_check(context, frames if schema_ok else {}, {p: r[2] for p, r in report.items()})
        stored = schema_ok and replacement.passed
        if stored:
            schema = column_schema(frames[partitions[-1]])
            unchanged, change = schema_change(context, raw_key, schema)
            yield dg.Output(frames, metadata={"dagster/row_count": sum(f.height for f in frames.values()),
                                              "dagster/column_schema": schema, "partitions": len(frames),
                                              # every day's materialization carries the run's metadata: each day's rows here
                                              "rows_by_partition": dg.MetadataValue.json({p: f.height for p, f in frames.items()}),
                                              "source_files": dg.MetadataValue.json({p: r[2] for p, r in report.items()})})
        else:
            failing = (contract if not schema_ok else replacement).metadata["failing_partitions"]
            context.log.warning(f"{spec.name}/raw: {failing} break the {'schema' if not schema_ok else 'quality'} contract; "
                                f"none of the {len(partitions)} partitions of this run is stored")
        yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_contract", passed=contract.passed, severity=contract.severity,
                                  metadata={**contract.metadata, "widened": dg.MetadataValue.json(widenings)})
        if stored:
            yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=unchanged,
                                      severity=dg.AssetCheckSeverity.WARN, metadata=change)
        else:
            yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=True, metadata={"skipped": "not stored"})
        yield replacement

    return raw
