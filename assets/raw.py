"""`<p>/raw`: source files as they arrived, one partition per day."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import polars as pl
    from upath import UPath

POLARS_DTYPES = {"float": "Float64", "int": "Int64", "str": "String", "bool": "Boolean", "datetime": "Datetime"}


def partitions_def(spec: PipelineSpec) -> dg.PartitionsDefinition | None:
    """Daily partitions from the spec's start date, or none."""
    import dagster as dg

    if spec.source.partitions == "daily":
        return dg.DailyPartitionsDefinition(start_date=spec.source.start_date)
    return None


def source_file(folder: UPath, spec: PipelineSpec, partition: str | None) -> UPath:
    """The file that holds one day (``<folder>/<YYYY-MM-DD>.<format>``)."""
    if partition is None:
        raise ValueError(f"{spec.name}: unpartitioned sources are read with read_source_folder")
    return folder / f"{partition}.{spec.source.format}"


class SourceReadError(ValueError):
    """A source file cannot be read at all (empty, truncated, not UTF-8, not the declared format)."""


def read_source(path: UPath, spec: PipelineSpec) -> pl.DataFrame:
    """Read one source file; CSV text is typed by the spec where every value converts cleanly."""
    return read_source_with_report(path, spec)[0]


def read_source_with_report(path: UPath, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Read one source file, and for CSV columns left as text, a few values that did not convert to the spec's dtype."""
    import polars as pl

    from resources.storage import check_reachable

    check_reachable(path)  # an unreachable object store is not "file does not exist"
    if not path.exists():
        raise SourceReadError(f"{spec.name}: source file {path} does not exist")
    with path.open("rb") as fh:
        data = fh.read()
    if not data:
        raise SourceReadError(f"{spec.name}: source file {path} is empty (0 bytes)")
    try:
        if spec.source.format == "parquet":
            return pl.read_parquet(data), {}
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SourceReadError(f"{spec.name}: {path} is not UTF-8 text: byte {data[exc.start]:#04x} at offset {exc.start} "
                                  f"(line {line})") from None
        frame = pl.read_csv(data, infer_schema=False)
    except SourceReadError:
        raise
    except Exception as exc:  # polars raises several error types for unreadable files
        raise SourceReadError(f"{spec.name}: cannot read {spec.source.format} file {path}: {str(exc).splitlines()[0][:300]}") from exc
    return _type_csv(frame, spec)


def _type_csv(frame: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    import polars as pl

    casts: list[Any] = []
    for name, col in spec.schema_.items():
        if name not in frame.columns:
            continue
        text = pl.col(name)
        if col.dtype == "datetime":
            typed = text.str.to_datetime(strict=False, time_unit="us")
        elif col.dtype == "bool":
            typed = text.str.to_lowercase().replace_strict({"true": True, "false": False, "1": True, "0": False}, default=None)
        else:
            typed = text.cast(getattr(pl, POLARS_DTYPES[col.dtype]), strict=False)
        casts.append((name, typed))
    if not casts:
        return frame, {}
    broken = frame.select([(pl.col(n).is_not_null() & t.is_null()).alias(n) for n, t in casts])
    counts = broken.sum().row(0, named=True)
    clean = [t.alias(n) for n, t in casts if counts[n] == 0]
    unparsed = {n: [str(v) for v in frame.filter(broken[n])[n].unique(maintain_order=True).head(5).to_list()]
                for n, _ in casts if counts[n]}
    # A column with values that do not convert stays text, so the schema check names it (with these samples).
    return (frame.with_columns(clean) if clean else frame), unparsed


RAW_WARN_HOURS = 26  # a daily source lands once a day; a little slack before warning
RAW_FAIL_HOURS = 48


def raw_freshness_policy(spec: PipelineSpec) -> dg.FreshnessPolicy | None:
    """Daily sources are expected every day: the UI warns after 26 h without a new materialization of raw, fails after 48 h."""
    import dagster as dg

    if spec.source.partitions != "daily":
        return None
    return dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=RAW_FAIL_HOURS), warn_window=timedelta(hours=RAW_WARN_HOURS))


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/raw` asset, with its blocking GX schema check and a schema-change check run in the same step."""
    import dagster as dg

    from kiln import steps as k8s
    from resources.storage import KilnStorage

    raw_key = dg.AssetKey(key(spec.name, "raw"))

    @dg.asset(
        key=raw_key,
        group_name=spec.name,
        op_tags=k8s.op_tags(spec, "raw"),
        pool=k8s.pool(spec, "raw"),
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
        import polars as pl

        from assets.validated import check_result, column_schema, raw_schema_check, schema_change

        storage: KilnStorage = context.resources.storage
        folder = storage.source_dir(spec.source.path)
        partition = context.partition_key if context.has_partition_key else None
        try:
            if partition is None:
                files = sorted(folder.glob(f"*.{spec.source.format}"))
                if not files:
                    raise SourceReadError(f"{spec.name}: no *.{spec.source.format} files in {folder}")
                reads = [read_source_with_report(f, spec) for f in files]
                frame = pl.concat([r[0] for r in reads], how="diagonal_relaxed")
                unparsed = {k: v for r in reads for k, v in r[1].items()}
                path = str(folder)
            else:
                path = str(source_file(folder, spec, partition))
                frame, unparsed = read_source_with_report(source_file(folder, spec, partition), spec)
        except SourceReadError as exc:
            failure = {"rule": "readable", "column": "(file)", "severity": "error", "expectation": "the file reads as "
                       f"{spec.source.format}", "unexpected_count": None, "unexpected_percent": 0.0, "sample_values": [],
                       "observed": str(exc), "error": str(exc)}
            where = str(source_file(folder, spec, partition)) if partition else str(folder)
            yield check_result("schema_contract", raw_key, [failure], 0, partition, where)
            yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=True, metadata={"skipped": "unreadable"})
            return
        schema = column_schema(frame)
        unchanged, change = schema_change(context, raw_key, schema)
        yield dg.Output(
            frame,
            metadata={
                "dagster/row_count": frame.height,
                "dagster/column_schema": schema,
                "source_file": path,
                "partition": partition or "none",
            },
        )
        yield raw_schema_check(context, spec, frame, partition, path, unparsed)
        yield dg.AssetCheckResult(asset_key=raw_key, check_name="schema_change", passed=unchanged,
                                  severity=dg.AssetCheckSeverity.WARN, metadata=change)

    return raw
