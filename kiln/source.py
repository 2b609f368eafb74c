"""Reading source files: one day's file by name, the bytes checked (present, non-empty, UTF-8, the declared format), CSV
text typed by the spec where every value converts.

polars is imported inside functions; paths are ``UPath`` (local or ``s3://``) or plain ``Path``. Whether an object
store answers at all is the caller's check (``resources.storage.check_reachable``): a missing file and an unreachable
bucket must not read alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl
    from upath import UPath

POLARS_DTYPES = {"float": "Float64", "int": "Int64", "str": "String", "bool": "Boolean", "datetime": "Datetime"}
SAMPLES = 5  # values kept per CSV column that does not convert
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


class SourceReadError(ValueError):
    """A source file cannot be read at all (missing, empty, truncated, not UTF-8, not the declared format)."""


def source_file(folder: UPath, spec: PipelineSpec, partition: str | None) -> UPath:
    """The file that holds one day (``<folder>/<YYYY-MM-DD>.<format>``)."""
    if partition is None:
        raise ValueError(f"{spec.name}: an unpartitioned source has no file per day; read it with read_source_folder")
    return folder / f"{partition}.{spec.source.format}"


def read_source(path: UPath, spec: PipelineSpec) -> pl.DataFrame:
    """Read one source file; CSV text is typed by the spec where every value converts cleanly."""
    return read_source_with_report(path, spec)[0]


def read_source_folder(folder: UPath, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Every ``*.<format>`` file of an unpartitioned source, in name order, as one frame (columns unioned)."""
    import polars as pl

    files = sorted(folder.glob(f"*.{spec.source.format}"))
    if not files:
        raise SourceReadError(f"{spec.name}: no *.{spec.source.format} files in {folder}")
    reads = [read_source_with_report(f, spec) for f in files]
    return pl.concat([r[0] for r in reads], how="diagonal_relaxed"), {k: v for r in reads for k, v in r[1].items()}


def read_source_with_report(path: UPath, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Read one source file, and for CSV columns left as text, a few values that did not convert to the spec's dtype."""
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
            typed = text.str.to_datetime(strict=False, time_unit="us")
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
