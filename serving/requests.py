"""Turn a `/predict` request body into typed rows, or a client error that names the field.

The checks are generated from the spec's schema and run per column, never per row in Python:
keys are checked with set unions and ``map(len, ...)``, value types with ``set(map(type, ...))``,
and null, range and category rules with polars expressions over the whole batch.
"""

from __future__ import annotations

import json
import math
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from platform_defs.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl

NONE = type(None)
# Python types a JSON value may have for each spec dtype (bool is not an int here, an int is a float).
ACCEPTED_TYPES: dict[str, frozenset[type]] = {
    "float": frozenset({float, int, NONE}),
    "int": frozenset({int, NONE}),
    "bool": frozenset({bool, NONE}),
    "str": frozenset({str, NONE}),
    "datetime": frozenset({str, NONE}),
}
TYPE_NAMES = {float: "number", int: "integer", bool: "boolean", str: "string", NONE: "null", dict: "object", list: "array"}
MAX_BODY_BYTES = 32 * 1024 * 1024


class RequestError(ValueError):
    """A bad request: the message names the offending field and why (answered with 400, or ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _reject_constant(token: str) -> float:
    raise RequestError(f"body: {token} is not valid JSON (numbers must be finite)")


def parse_body(body: bytes, spec: PipelineSpec, max_rows: int, unknown_category: str = "reject") -> pl.DataFrame:
    """Validate a raw ``{"rows": [...]}`` body and return the rows as a typed frame."""
    if not body:
        raise RequestError('body: empty; expected a JSON object {"rows": [...]}')
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"body: {len(body)} bytes exceed the limit of {MAX_BODY_BYTES}", status=413)
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"body: not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise RequestError(f'body: expected a JSON object {{"rows": [...]}}, got {TYPE_NAMES.get(type(payload), "a value")}')
    extra = sorted(str(k) for k in payload if k != "rows")
    if extra:
        raise RequestError(f"body: unknown field(s) {extra[:10]}; expected only 'rows'")
    if "rows" not in payload:
        raise RequestError("rows: missing; expected a non-empty list of objects")
    return parse_rows(payload["rows"], spec, max_rows, unknown_category)


def parse_rows(rows: Any, spec: PipelineSpec, max_rows: int, unknown_category: str = "reject") -> pl.DataFrame:
    """Validate request rows against the spec's input columns and return them as a typed frame."""
    import polars as pl

    from assets.ingest import POLARS_DTYPES

    if not isinstance(rows, list):
        raise RequestError(f"rows: must be a list of objects, got {TYPE_NAMES.get(type(rows), 'a value')}")
    if not rows:
        raise RequestError("rows: empty; send at least one row")
    if len(rows) > max_rows:
        raise RequestError(f"rows: {len(rows)} rows exceed the limit of {max_rows}", status=413)
    if set(map(type, rows)) != {dict}:
        raise RequestError("rows: every row must be an object of column: value")
    expected = spec.input_columns
    seen = set().union(*rows)
    extra = sorted(map(str, seen.difference(expected)))
    if extra:
        raise RequestError(f"rows: unknown column(s) {extra[:10]}; expected {expected}")
    width = len(expected)
    if min(map(len, rows)) != width:
        missing = sorted(c for c in expected if c not in seen) or [c for c in expected if not all(map(dict.__contains__, rows, repeat(c)))]
        raise RequestError(f"rows: missing column(s) {missing}")
    columns: dict[str, Any] = {}
    for name in expected:
        col = spec.schema_[name]
        values = list(map(itemgetter(name), rows))
        types = set(map(type, values))
        wrong = types - ACCEPTED_TYPES[col.dtype]
        if wrong:
            got = ", ".join(sorted(TYPE_NAMES.get(t, t.__name__) for t in wrong))
            raise RequestError(f"{name}: expected {col.dtype}, got {got}")
        nulls = values.count(None)
        try:
            if col.dtype == "datetime":
                series = pl.Series(name, values, dtype=pl.String).str.to_datetime(strict=True, time_unit="us")
            elif col.dtype == "float":
                series = pl.Series(name, values, dtype=pl.Float64, strict=False)
            else:
                series = pl.Series(name, values, dtype=getattr(pl, POLARS_DTYPES[col.dtype]), strict=True)
        except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise RequestError(f"{name}: expected {col.dtype}: {reason}") from None
        if series.null_count() != nulls:
            raise RequestError(f"{name}: expected {col.dtype}: a value does not convert")
        columns[name] = series
    frame = pl.DataFrame(columns)
    _check_rules(frame, spec, unknown_category)
    return frame


_RULES: dict[tuple[int, str], tuple[PipelineSpec, list[Any], list[Any]]] = {}


def _rules(spec: PipelineSpec, unknown_category: str) -> tuple[list[Any], list[Any]]:
    """Per input column, a polars expression flagging rows that break its rule, and one counting them (built once per spec)."""
    import polars as pl

    cached = _RULES.get((id(spec), unknown_category))
    if cached is not None and cached[0] is spec:
        return cached[1], cached[2]
    flags = []
    for name in spec.input_columns:
        col = spec.schema_[name]
        c = pl.col(name)
        bad = c.is_null() if not col.nullable else pl.lit(False)
        if col.dtype == "float":
            bad = bad | (c.is_nan() | c.is_infinite()).fill_null(False)
        if col.min is not None:
            bad = bad | (c < col.min).fill_null(False)
        if col.max is not None:
            bad = bad | (c > col.max).fill_null(False)
        if col.allowed is not None and unknown_category == "reject":
            bad = bad | (~c.is_in(col.allowed)).fill_null(False)
        flags.append(bad.alias(name))
    counts = [f.sum() for f in flags]
    if len(_RULES) > 64:
        _RULES.clear()
    _RULES[(id(spec), unknown_category)] = (spec, flags, counts)
    return flags, counts


def _check_rules(frame: pl.DataFrame, spec: PipelineSpec, unknown_category: str) -> None:
    """Null, finiteness, range and allowed-value rules over the whole batch in one pass; the first broken one is raised."""
    flags, counts = _rules(spec, unknown_category)
    found = frame.select(counts).row(0, named=True)
    for (name, bad), flag in zip(found.items(), flags, strict=True):
        if bad:
            col = spec.schema_[name]
            first = frame.filter(flag)[name][0]
            rule = (
                "must not be null" if first is None
                else "must be a finite number" if isinstance(first, float) and not math.isfinite(first)
                else f"is not an allowed category (one of {col.allowed})" if col.allowed is not None
                else f"must be within [{_num(col.min, '-inf')}, {_num(col.max, 'inf')}]"
            )
            raise RequestError(f"{name}: {bad} row(s) break the contract: {first!r} {rule}")


def _num(value: float | None, unbounded: str) -> str:
    if value is None:
        return unbounded
    return str(int(value)) if math.isfinite(value) and value == int(value) else str(value)
