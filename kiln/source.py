"""Reading source files: one day's file by name, the bytes checked (present, non-empty, UTF-8, the declared format), CSV
text typed by the spec where every value converts.

polars is imported inside functions; paths are ``UPath`` (local or ``s3://``) or plain ``Path``. Whether an object
store answers at all is the caller's check (``resources.storage.check_reachable``): a missing file and an unreachable
bucket must not read alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.partitions import has_source_extension, ignored, partition_file
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl
    from upath import UPath

POLARS_DTYPES = {"float": "Float64", "int": "Int64", "str": "String", "bool": "Boolean", "datetime": "Datetime"}
SAMPLES = 5  # values kept per CSV column that does not convert
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"  # a timestamp text that carries its UTC offset


class SourceReadError(ValueError):
    """A source file cannot be read at all (missing, empty, truncated, not UTF-8, not the declared format)."""


def source_file(folder: UPath, spec: PipelineSpec, partition: str | None) -> UPath:
    """The file that holds one day: ``<folder>/<YYYY-MM-DD>.<ext>``, the extension in any case, ``.pq`` for parquet.

    When no file matches, the canonical ``<YYYY-MM-DD>.<format>`` (reading it says it does not exist); two files for
    the day raise :class:`SourceReadError` naming both."""
    if partition is None:
        raise ValueError(f"{spec.name}: an unpartitioned source has no file per day; read it with read_source_folder")
    canonical = folder / f"{partition}.{spec.source.format}"
    candidates = [p.name for p in folder.glob(f"{partition}.*")]
    found = partition_file(candidates, spec.source.format, partition)
    if len(found) > 1:
        raise SourceReadError(f"{spec.name}: two files for {partition} in {folder}: {', '.join(found)}; keep one")
    return folder / found[0] if found else canonical


def read_source(path: UPath, spec: PipelineSpec) -> pl.DataFrame:
    """Read one source file; CSV text is typed by the spec where every value converts cleanly, safe widenings applied."""
    return read_source_with_report(path, spec)[0]


def read_source_folder(folder: UPath, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]], dict[str, str]]:
    """Every ``*.<format>`` file of an unpartitioned source, in name order, as one frame (columns unioned), with the
    values that did not convert and the widenings applied (as :func:`read_source_with_report`)."""
    import polars as pl

    # The same files the new-data sensor accepts: any case of the extension, `.pq` for parquet; hidden/temp files skipped.
    names = folder.iterdir() if folder.exists() else []
    files = sorted(p for p in names if has_source_extension(p.name, spec.source.format) and not ignored(p.name))
    if not files:
        raise SourceReadError(f"{spec.name}: no *.{spec.source.format} files in {folder}")
    reads = [read_source_with_report(f, spec) for f in files]
    try:
        frame = pl.concat([r[0] for r in reads], how="diagonal_relaxed")
    except pl.exceptions.SchemaError:
        raise SourceReadError(_mixed_files_message(spec, folder, files, [r[0] for r in reads])) from None
    widened: dict[str, str] = {}
    for r in reads:
        for column, change in r[2].items():
            widened[column] = change if widened.get(column, change) == change else f"{widened[column]}; {change}"
    return frame, {k: v for r in reads for k, v in r[1].items()}, widened


def _mixed_files_message(spec: PipelineSpec, folder: UPath, files: list[UPath], frames: list[pl.DataFrame]) -> str:
    """Why the files of a folder do not stack: a column read with different dtypes (naive and aware timestamps...)."""
    for name in {c for f in frames for c in f.columns}:
        kinds = {f.schema[name] for f in frames if name in f.columns}
        if len(kinds) > 1:
            seen = ", ".join(f"{p.name}: {f.schema[name]}" for p, f in zip(files, frames, strict=True) if name in f.columns)
            hint = (f"; set `timezone: UTC` on schema.{name} to read every file's timestamps as UTC"
                    if name in spec.schema_ and spec.schema_[name].dtype == "datetime" else "")
            return f"{spec.name}: column '{name}' has different dtypes across the files of {folder} ({seen}){hint}"
    return f"{spec.name}: the files of {folder} do not stack into one table"


def read_source_with_report(path: UPath, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]], dict[str, str]]:
    """Read one source file, conformed to the spec's dtypes (:func:`conform_dtypes`): the frame, a few values per column
    that did not convert to the spec's dtype (CSV text left as text, coercions refused), and the widenings applied."""
    frame, unparsed = _read(path, spec)
    frame, widened, refused = conform_dtypes(frame, spec)
    return frame, unparsed | refused, widened


def _read(path: UPath, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """The file as read: parquet as stored, CSV typed by :func:`type_csv`."""
    import polars as pl

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
    return type_csv(frame, spec)


def type_csv(frame: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Cast CSV text columns to the spec's dtypes where every value converts; the others stay text, with samples.

    A column with values that do not convert stays text so the schema contract names it (dtype rule) with these
    samples, rather than the values silently becoming nulls."""
    import polars as pl

    casts: list[tuple[str, Any]] = []
    for name, col in spec.schema_.items():
        if name not in frame.columns:
            continue
        text = pl.col(name)
        if col.dtype == "datetime":
            typed = _parse_timestamps(frame, name, col.timezone)
        elif col.dtype == "bool":
            typed = text.str.to_lowercase().replace_strict(_BOOLS, default=None)
        else:
            typed = text.cast(getattr(pl, POLARS_DTYPES[col.dtype]), strict=False)
        casts.append((name, typed))
    if not casts:
        return frame, {}
    broken = frame.select([(pl.col(n).is_not_null() & t.is_null()).alias(n) for n, t in casts])
    counts = broken.sum().row(0, named=True)
    clean = [t.alias(n) for n, t in casts if counts[n] == 0]
    unparsed = {n: [str(v) for v in frame.filter(broken[n])[n].unique(maintain_order=True).head(SAMPLES).to_list()]
                for n, _ in casts if counts[n]}
    return (frame.with_columns(clean) if clean else frame), unparsed


def _parse_timestamps(frame: pl.DataFrame, name: str, timezone: str | None) -> pl.Expr:
    """Timestamp text to microseconds. With ``timezone: UTC``, text with an offset is converted to UTC and text without
    one is taken as UTC (naive values out). Without it, text where every value has an offset stays aware (UTC), which
    the contract refuses naming ``timezone``; where naive and aware text mix, the aware values do not convert."""
    import polars as pl

    text = pl.col(name)
    has_offset = text.str.contains(_OFFSET)
    aware = pl.when(has_offset).then(text).str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
    naive = pl.when(~has_offset).then(text).str.to_datetime(strict=False, time_unit="us")
    if timezone == "UTC":
        return pl.coalesce(aware.dt.replace_time_zone(None), naive)
    all_aware = frame.select(has_offset.any() & has_offset.all()).item()
    return aware if all_aware else naive




def conform_dtypes(frame: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, str], dict[str, list[str]]]:
    """Apply the widenings to the spec's dtypes that lose nothing a user would miss, and the coercions a column asks for.

    Always: dictionary text (polars Categorical/Enum, pandas ``category``) -> String for ``str``; integers and Float32
    -> Float64 for ``float``; narrower or unsigned integers -> Int64 for ``int``; Date and ns/ms timestamps -> us for
    ``datetime``, and with ``timezone: UTC`` aware timestamps converted to UTC. Only with ``coerce: true``: 0/1
    integers -> Boolean for ``bool``; floats that are all whole numbers -> Int64 for ``int``. Anything else is left
    as read, so the dtype rule names the column and the dtype found. Returns the frame, ``{column: "from -> to"}``
    for what was applied, and for a coercion refused by its values a few of those values."""
    import polars as pl

    casts: list[pl.Expr] = []
    widened: dict[str, str] = {}
    refused: dict[str, list[str]] = {}
    for name, col in spec.schema_.items():
        if name not in frame.columns:
            continue
        found = frame.schema[name]
        c = pl.col(name)
        expr: pl.Expr | None = None
        if col.dtype == "str" and isinstance(found, (pl.Categorical, pl.Enum)):
            expr = c.cast(pl.String)
        elif col.dtype == "float" and (found.is_integer() or found == pl.Float32):
            expr = c.cast(pl.Float64)
        elif col.dtype == "int" and found.is_integer() and found != pl.Int64:
            if found != pl.UInt64 or frame.select(c.max().fill_null(0) < 2**63).item():  # else the dtype rule names it
                expr = c.cast(pl.Int64)
        elif col.dtype == "int" and found.is_float() and col.coerce:
            values = frame[name].drop_nulls()
            bad = values.filter(~values.is_finite() | (values != values.round(0)) | (values.abs() >= 2.0**63))
            if bad.len():
                refused[name] = [str(v) for v in bad.unique(maintain_order=True).head(SAMPLES).to_list()]
            else:
                expr = c.cast(pl.Int64)
        elif col.dtype == "bool" and found.is_integer() and col.coerce:
            values = frame[name].drop_nulls()
            bad = values.filter(~values.is_in([0, 1]))
            if bad.len():
                refused[name] = [str(v) for v in bad.unique(maintain_order=True).head(SAMPLES).to_list()]
            else:
                expr = c == 1
        elif col.dtype == "datetime" and found == pl.Date:
            expr = c.cast(pl.Datetime("us"))
        elif col.dtype == "datetime" and isinstance(found, pl.Datetime):
            convert = found.time_zone is not None and col.timezone == "UTC"
            if convert or found.time_unit != "us":
                expr = (c.dt.convert_time_zone("UTC").dt.replace_time_zone(None) if convert else c).dt.cast_time_unit("us")
        if expr is not None:
            casts.append(expr.alias(name))
            widened[name] = f"{_dtype_name(found)} -> "  # completed below, from the dtype the cast gives
    if not casts:
        return frame, {}, refused
    conformed = frame.with_columns(casts)
    for name in widened:
        widened[name] += _dtype_name(conformed.schema[name]) + _notes(frame.schema[name], conformed.schema[name])
    return conformed, widened, refused


def _dtype_name(dtype: Any) -> str:
    """A dtype as a person reads it: ``Datetime(ns, Europe/Berlin)``, ``Categorical``, ``Int32``."""
    import polars as pl

    if isinstance(dtype, pl.Datetime):
        return f"Datetime({dtype.time_unit}{', ' + dtype.time_zone if dtype.time_zone else ''})"
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return type(dtype).__name__
    return str(dtype)


def _notes(found: Any, now: Any) -> str:
    """What a widening did beyond the dtype: a timezone conversion, a coercion."""
    import polars as pl

    if isinstance(found, pl.Datetime) and found.time_zone and not getattr(now, "time_zone", None):
        return " (converted to UTC)"
    if now == pl.Boolean:
        return " (coerce: 0/1)"
    if found.is_float() and now == pl.Int64:
        return " (coerce: whole numbers)"
    return ""


def timezone_problems(frame: pl.DataFrame, spec: PipelineSpec, unparsed: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Datetime columns whose timezones the spec does not settle, with what to do: aware values where the column sets no
    ``timezone``, or CSV text that mixes naive and aware timestamps (its aware ``unparsed`` samples)."""
    import re

    import polars as pl

    problems = {}
    for name, col in spec.schema_.items():
        if col.dtype != "datetime" or name not in frame.columns:
            continue
        found = frame.schema[name]
        if isinstance(found, pl.Datetime) and found.time_zone:
            problems[name] = (f"timestamps are timezone-aware ({found.time_zone}) and schema.{name} sets no timezone: set "
                              f"`timezone: UTC` on the column to convert them to UTC, or write naive timestamps")
        elif found == pl.String and col.timezone is None and any(re.search(_OFFSET, v) for v in (unparsed or {}).get(name, [])):
            problems[name] = (f"naive and timezone-aware timestamps are mixed; set `timezone: UTC` on schema.{name} to take "
                              f"naive values as UTC and convert the others, or write them all naive")
    return problems
