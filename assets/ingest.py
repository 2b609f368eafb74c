"""`<p>/raw`: source files as they arrived, one partition per day."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from assets.keys import key
from platform_defs.spec import PipelineSpec

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


def read_source(path: UPath, spec: PipelineSpec) -> pl.DataFrame:
    """Read one source file; CSV text is typed by the spec where every value converts cleanly."""
    import polars as pl

    if not path.exists():
        raise FileNotFoundError(f"{spec.name}: source file {path} does not exist")
    with path.open("rb") as fh:
        data = fh.read()
    if not data:
        raise ValueError(f"{spec.name}: source file {path} is empty (0 bytes)")
    try:
        if spec.source.format == "parquet":
            return pl.read_parquet(data)
        frame = pl.read_csv(data, infer_schema=False)
    except Exception as exc:  # polars raises several error types for unreadable files
        raise ValueError(f"{spec.name}: cannot read {spec.source.format} file {path}: {exc}") from exc
    return _type_csv(frame, spec)


def _type_csv(frame: pl.DataFrame, spec: PipelineSpec) -> pl.DataFrame:
    import polars as pl

    casts: list[Any] = []
    for name, col in spec.schema_.items():
        if name not in frame.columns:
            continue
        text = pl.col(name)
        if col.dtype == "datetime":
            typed = text.str.to_datetime(strict=False)
        elif col.dtype == "bool":
            typed = text.str.to_lowercase().replace_strict({"true": True, "false": False, "1": True, "0": False}, default=None)
        else:
            typed = text.cast(getattr(pl, POLARS_DTYPES[col.dtype]), strict=False)
        casts.append((name, typed))
    checks = frame.select([(pl.col(n).is_not_null() & t.is_null()).sum().alias(n) for n, t in casts])
    clean = [t.alias(n) for n, t in casts if checks[n][0] == 0]
    # A column with values that do not convert stays text, so the schema check names it.
    return frame.with_columns(clean) if clean else frame


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/raw` asset."""
    import dagster as dg

    from resources.storage import KilnStorage

    @dg.asset(
        key=key(spec.name, "raw"),
        group_name=spec.name,
        partitions_def=partitions_def(spec),
        io_manager_key="parquet_io_manager",
        kinds={"polars", "parquet"},
        required_resource_keys={"storage"},
        description=f"{spec.name} source data as it arrived ({spec.source.format}, {spec.source.partitions}).",
        metadata={"source": spec.source.path, "format": spec.source.format},
    )
    def raw(context):
        storage: KilnStorage = context.resources.storage
        folder = storage.source_dir(spec.source.path)
        partition = context.partition_key if context.has_partition_key else None
        if partition is None:
            import polars as pl

            files = sorted(folder.glob(f"*.{spec.source.format}"))
            frame = pl.concat([read_source(f, spec) for f in files], how="diagonal_relaxed")
            path = str(folder)
        else:
            path_obj = source_file(folder, spec, partition)
            frame = read_source(path_obj, spec)
            path = str(path_obj)
        return dg.Output(
            frame,
            metadata={
                "dagster/row_count": frame.height,
                "source_file": path,
                "columns": ", ".join(frame.columns),
            },
        )

    return raw
