"""Turn a `/predict` request body into typed rows, or a client error that names the field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from platform_defs.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl


class RequestError(ValueError):
    """A bad request: the message names the offending field and why (answered with 400)."""


def parse_rows(rows: Any, spec: PipelineSpec, max_rows: int) -> pl.DataFrame:
    """Validate request rows against the spec's input columns and return them as a typed frame."""
    import polars as pl

    from assets.ingest import POLARS_DTYPES
    from assets.validate import violations

    if not isinstance(rows, list) or not rows:
        raise RequestError("rows: must be a non-empty list of objects")
    if len(rows) > max_rows:
        raise RequestError(f"rows: {len(rows)} rows exceed the limit of {max_rows}")
    if not all(isinstance(r, dict) for r in rows):
        raise RequestError("rows: every row must be an object of column: value")
    expected = spec.input_columns
    seen = set().union(*rows)
    extra = sorted(seen.difference(expected))
    if extra:
        raise RequestError(f"rows: unknown column(s) {extra}; expected {expected}")
    width = len(expected)
    if any(len(r) != width for r in rows):
        missing = sorted(c for c in expected if any(c not in r for r in rows))
        raise RequestError(f"rows: missing column(s) {missing}")
    columns: dict[str, Any] = {}
    for name in expected:
        col = spec.schema_[name]
        values = [r[name] for r in rows]
        try:
            if col.dtype == "datetime":
                series = pl.Series(name, values, dtype=pl.String, strict=True).str.to_datetime(strict=True, time_unit="us")
            elif col.dtype == "float":
                series = pl.Series(name, values, dtype=pl.Float64, strict=False)
                if series.null_count() != sum(v is None for v in values) or any(isinstance(v, (bool, str)) for v in values):
                    raise TypeError("not a number")
            else:
                series = pl.Series(name, values, dtype=getattr(pl, POLARS_DTYPES[col.dtype]), strict=True)
                if col.dtype == "int" and any(isinstance(v, bool) for v in values):
                    raise TypeError("a boolean is not an integer")
        except (TypeError, ValueError, pl.exceptions.PolarsError) as exc:
            raise RequestError(f"{name}: expected {col.dtype}: {str(exc).splitlines()[0][:200]}") from None
        columns[name] = series
    frame = pl.DataFrame(columns)
    flags = violations(frame, spec)
    counts = flags.sum().row(0, named=True)
    for name, bad in counts.items():
        if bad:
            col = spec.schema_[name]
            first = frame.filter(flags[name])[name][0]
            rule = (
                "must not be null" if first is None
                else f"must be one of {col.allowed}" if col.allowed is not None
                else f"must be within [{col.min}, {col.max}]"
            )
            raise RequestError(f"{name}: {bad} row(s) break the contract: {first!r} {rule}")
    return frame
