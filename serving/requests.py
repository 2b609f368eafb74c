"""Turn a `/predict` request body into typed rows, or a client error that names the field and the row.

Two paths, one contract. Most requests are small (a few rows), and for them building polars series per column
costs more than the checks themselves, so :func:`parse_request` first tries the *fast path*: orjson decodes the
body and a checker generated once per spec validates the values of each column in plain Python, keeping them as
typed lists that the batcher (:mod:`serving.batching`) turns into one frame per batch (:func:`frame_of`). Anything
the fast path does not accept outright (a large request, any broken rule, any odd value) goes to the *full path*,
which decides: keys are checked with set unions and ``map(len, ...)``, value types with ``set(map(type, ...))``, and
null, range and category rules with polars expressions over the whole request, and its error names the row, the field
and the reason (``rows[3].amount: ...``). So the fast path can only ever say yes; every no, and its message, comes
from the full path.

:func:`row_model` is the same contract as a pydantic model (types, ranges, allowed values, string lengths): the typed
``@bentoml.api`` of :mod:`serving.service` takes it, so ``/docs.json`` lists every input column with its limits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from kiln.spec import ColumnSpec, PipelineSpec

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
FAST_ROWS = 64  # requests up to this many rows try the plain-Python fast path; larger ones are cheaper column-wise
INT64 = (-(2**63), 2**63 - 1)
# Timestamps a request may carry: inside Python's datetime range with a day to spare for any UTC offset (an offset
# that pushes 9999-12-31 or 0001-01-01 past the range is a 400 naming the value, not an OverflowError).
MIN_TIMESTAMP = datetime(1, 1, 2)
MAX_TIMESTAMP = datetime(9999, 12, 30, 23, 59, 59, 999999)


class RequestError(ValueError):
    """A bad request: the message names the offending field and why (answered with 400, or ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _NonFinite:
    """A ``NaN``/``Infinity``/``-Infinity`` token the standard parser met: kept in place, so the error can name where."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


def _reject_non_finite(payload: Any) -> None:
    """Raise for the first non-finite token, naming ``rows[i].column`` when it is a row's value (else the body)."""
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if isinstance(rows, list):
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                for column, value in row.items():
                    if isinstance(value, _NonFinite):
                        raise RequestError(f"rows[{i}].{column}: {value.token} is not valid JSON (numbers must be finite)")
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, _NonFinite):
            raise RequestError(f"body: {value.token} is not valid JSON (numbers must be finite)")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


@dataclass(frozen=True, slots=True)
class Rows:
    """One request's valid rows: typed column lists (fast path) or a typed frame (full path)."""

    count: int
    columns: dict[str, list[Any]] | None = None
    frame: pl.DataFrame | None = None


def parse_request(body: bytes, spec: PipelineSpec, max_rows: int, unknown_category: str = "reject") -> Rows:
    """Validate a raw ``{"rows": [...]}`` body: the fast path when it accepts, else the full path (which may raise)."""
    payload = _decode(body)
    if type(payload) is dict and len(payload) == 1:
        rows = payload.get("rows")
        if type(rows) is list and 0 < len(rows) <= min(max_rows, FAST_ROWS):
            columns = _fast_rows(rows, spec, unknown_category)
            if columns is not None:
                return Rows(len(rows), columns=columns)
    frame = _parse_payload(payload, spec, max_rows, unknown_category)
    return Rows(frame.height, frame=frame)


def _decode(body: bytes) -> Any:
    """The body's JSON value; orjson first, the standard library for anything orjson refuses (and for the message)."""
    if not body:
        raise RequestError('body: empty; expected a JSON object {"rows": [...]}')
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"body: {len(body)} bytes exceed the limit of {MAX_BODY_BYTES}", status=413)
    import orjson

    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # big integers, 1e400, lone surrogates, deep nesting...: the standard parser decides and words the error
    try:
        payload = json.loads(body, parse_constant=_NonFinite)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"body: not valid JSON: {str(exc)[:200]}") from None
    _reject_non_finite(payload)  # orjson refused the body: a NaN/Infinity token may be why
    return payload


def parse_body(body: bytes, spec: PipelineSpec, max_rows: int, unknown_category: str = "reject") -> pl.DataFrame:
    """Validate a raw ``{"rows": [...]}`` body and return the rows as a typed frame (the full path)."""
    return _parse_payload(_decode(body), spec, max_rows, unknown_category)


def _parse_payload(payload: Any, spec: PipelineSpec, max_rows: int, unknown_category: str) -> pl.DataFrame:
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

    from kiln.source import POLARS_DTYPES

    if not isinstance(rows, list):
        raise RequestError(f"rows: must be a list of objects, got {TYPE_NAMES.get(type(rows), 'a value')}")
    if not rows:
        raise RequestError("rows: empty; send at least one row")
    if len(rows) > max_rows:
        raise RequestError(f"rows: {len(rows)} rows exceed the limit of {max_rows} (serving.max_batch_rows)", status=413)
    if set(map(type, rows)) != {dict}:
        i = next(i for i, row in enumerate(rows) if type(row) is not dict)
        raise RequestError(f"rows[{i}]: every row must be an object of column: value, got {TYPE_NAMES.get(type(rows[i]), 'a value')}")
    expected = spec.input_columns
    seen = set().union(*rows)
    extra = sorted(map(str, seen.difference(expected)))
    if extra:
        i = next(i for i, row in enumerate(rows) if not row.keys() <= set(expected))
        raise RequestError(f"rows[{i}]: unknown column(s) {extra[:10]}; expected {expected}")
    width = len(expected)
    if min(map(len, rows)) != width:
        missing = sorted(c for c in expected if c not in seen) or [c for c in expected if not all(map(dict.__contains__, rows, repeat(c)))]
        i = next(i for i, row in enumerate(rows) if len(row) != width)
        raise RequestError(f"rows[{i}]: missing column(s) {missing}")
    columns: dict[str, Any] = {}
    for name in expected:
        col = spec.schema_[name]
        values = list(map(itemgetter(name), rows))
        types = set(map(type, values))
        wrong = types - ACCEPTED_TYPES[col.dtype]
        if wrong:
            i = next(i for i, v in enumerate(values) if type(v) in wrong)
            got = TYPE_NAMES.get(type(values[i]), type(values[i]).__name__)
            raise RequestError(f"rows[{i}].{name}: expected {col.dtype}, got {got}")
        nulls = values.count(None)
        if col.dtype in ("str", "datetime"):
            _text_errors(name, values, spec.serving.max_string_chars)
        try:
            if col.dtype == "datetime":
                series = _datetimes(name, values)
            elif col.dtype == "float":
                series = pl.Series(name, values, dtype=pl.Float64, strict=False)
            else:
                series = pl.Series(name, values, dtype=getattr(pl, POLARS_DTYPES[col.dtype]), strict=True)
        except RequestError:
            raise
        except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise RequestError(f"rows[{_unconvertible(values, col.dtype)}].{name}: expected {col.dtype}: {reason}") from None
        if series.null_count() != nulls:
            i = next((i for i, (v, s) in enumerate(zip(values, series.to_list())) if v is not None and s is None), 0)
            raise RequestError(f"rows[{i}].{name}: expected {col.dtype}: {values[i]!r} does not convert")
        columns[name] = series
    frame = pl.DataFrame(columns)
    _check_rules(frame, spec, unknown_category)
    return frame


def _unconvertible(values: list[Any], dtype: str) -> int:
    """The index of the first value of a column that does not convert to ``dtype`` (0 when none is found alone)."""
    for i, v in enumerate(values):
        if v is None:
            continue
        if dtype == "int" and not INT64[0] <= v <= INT64[1]:
            return i
        if dtype == "float":
            try:
                float(v)
            except (OverflowError, TypeError, ValueError):
                return i
        if dtype == "datetime":
            try:
                iso_datetime(v)
            except (TypeError, ValueError):
                return i
    return 0


def iso_datetime(text: str) -> datetime:
    """An ISO 8601 timestamp as naive UTC: an offset is converted, a timestamp without one is taken as UTC.

    Raises ValueError for text that is not one, or a moment outside [MIN_TIMESTAMP, MAX_TIMESTAMP]."""
    when = datetime.fromisoformat(text)
    try:
        naive = when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo is not None else when
    except OverflowError:
        raise ValueError(f"{text!r} is outside the supported range of timestamps") from None
    if not MIN_TIMESTAMP <= naive <= MAX_TIMESTAMP:
        raise ValueError(f"{text!r} is outside the supported range of timestamps")
    return naive


def _datetimes(name: str, values: list[Any]) -> pl.Series:
    """A datetime column of request values (strings or nulls), naive UTC.

    polars parses the column in one format, guessed from its first value; a column that mixes formats (a timestamp
    without an offset next to one with ``Z``) is parsed value by value with :func:`iso_datetime`, the fast path's
    rule, so a request is accepted or refused the same way whatever its size. A value neither accepts raises
    polars' error, which names the column and the values that failed."""
    import polars as pl

    try:
        series = pl.Series(name, values, dtype=pl.String).str.to_datetime(strict=True, time_unit="us")
    except pl.exceptions.PolarsError as polars_error:
        parsed = []
        for i, v in enumerate(values):
            try:
                parsed.append(None if v is None else iso_datetime(v))
            except ValueError as exc:
                if "outside the supported range" in str(exc):
                    raise RequestError(f"rows[{i}].{name}: {exc}") from None
                raise polars_error from None
        return pl.Series(name, parsed, dtype=pl.Datetime("us"))
    if getattr(series.dtype, "time_zone", None):  # offsets become naive UTC, as on the fast path
        series = series.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    outside = ~series.is_between(MIN_TIMESTAMP, MAX_TIMESTAMP) & series.is_not_null()
    if outside.any():
        i = int(outside.arg_true()[0])
        raise RequestError(f"rows[{i}].{name}: {values[i]!r} is outside the supported range of timestamps")
    return series


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
            i = int(frame.select(flag.arg_true().first()).item())
            first = frame[name][i]
            rule = (
                "must not be null" if first is None
                else "must be a finite number" if isinstance(first, float) and not math.isfinite(first)
                else f"is not an allowed category (one of {col.allowed})" if col.allowed is not None
                else f"must be within [{_num(col.min, '-inf')}, {_num(col.max, 'inf')}]"
            )
            raise RequestError(f"rows[{i}].{name}: {first!r} {rule} ({bad} row(s) break the contract)")


def _num(value: float | None, unbounded: str) -> str:
    if value is None:
        return unbounded
    return str(int(value)) if math.isfinite(value) and value == int(value) else str(value)


# ---------------------------------------------------------------------------------------------------- the fast path
_FAST: dict[tuple[int, str], tuple[PipelineSpec, frozenset[str], list[tuple[str, Callable[[list[Any]], list[Any] | None]]]]] = {}


def _fast_rows(rows: list[Any], spec: PipelineSpec, unknown_category: str) -> dict[str, list[Any]] | None:
    """Typed column lists when every row and value obviously keeps the contract, else None (the full path decides)."""
    cached = _FAST.get((id(spec), unknown_category))
    if cached is None or cached[0] is not spec:
        if len(_FAST) > 64:
            _FAST.clear()
        checkers = [(name, _checker(spec.schema_[name], unknown_category == "reject", spec.serving.max_string_chars))
                    for name in spec.input_columns]
        cached = _FAST[(id(spec), unknown_category)] = (spec, frozenset(spec.input_columns), checkers)
    _, expected, checkers = cached
    for row in rows:
        if type(row) is not dict or row.keys() != expected:
            return None
    columns: dict[str, list[Any]] = {}
    for name, check in checkers:
        values = check([row[name] for row in rows])
        if values is None:
            return None
        columns[name] = values
    return columns


def _encodable(text: str) -> bool:
    """False for text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``): it cannot be stored or logged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_errors(name: str, values: list[Any], max_chars: int) -> None:
    """400 for a text value that is longer than ``serving.max_string_chars`` or not valid Unicode, naming the row."""
    for i, v in enumerate(values):
        if type(v) is str and (len(v) > max_chars or not (v.isascii() or _encodable(v))):
            if len(v) > max_chars:
                raise RequestError(f"rows[{i}].{name}: text of {len(v)} characters exceeds the limit of {max_chars} "
                                   f"(serving.max_string_chars)")
            raise RequestError(f"rows[{i}].{name}: not valid Unicode text (a lone surrogate)")


def _checker(col: ColumnSpec, reject_unknown: bool, max_chars: int) -> Callable[[list[Any]], list[Any] | None]:
    """A function from one column's JSON values to typed values, or None at the first value it does not accept."""
    nullable, lo, hi = col.nullable, col.min, col.max
    if col.dtype in ("float", "int"):
        want_float = col.dtype == "float"
        low = -math.inf if lo is None else lo
        high = math.inf if hi is None else hi
        if not want_float:
            low, high = max(low, INT64[0]), min(high, INT64[1])

        def numbers(values: list[Any]) -> list[Any] | None:
            out: list[Any] = []
            for v in values:
                t = type(v)
                if v is None:
                    if not nullable:
                        return None
                elif t is int:
                    if not low <= v <= high:
                        return None
                    if want_float:
                        try:
                            v = float(v)
                        except OverflowError:  # an integer beyond any float: the full path words the error
                            return None
                elif t is float and want_float:
                    if not low <= v <= high or v != v:  # NaN compares false, infinities fall outside any range
                        return None
                else:
                    return None
                out.append(v)
            return out

        return numbers
    if col.dtype == "datetime":
        def datetimes(values: list[Any]) -> list[Any] | None:
            out: list[Any] = []
            for v in values:
                if v is None:
                    if not nullable:
                        return None
                    out.append(None)
                    continue
                if type(v) is not str:
                    return None
                try:
                    out.append(iso_datetime(v))
                except ValueError:
                    return None
            return out

        return datetimes
    kind = bool if col.dtype == "bool" else str
    allowed = frozenset(col.allowed) if col.allowed is not None and reject_unknown else None
    longest = max_chars if kind is str else None

    def scalars(values: list[Any]) -> list[Any] | None:
        for v in values:
            if v is None:
                if not nullable:
                    return None
            elif type(v) is not kind or (allowed is not None and v not in allowed):
                return None
            elif longest is not None and isinstance(v, str) and (len(v) > longest or not (v.isascii() or _encodable(v))):
                return None  # too long, or a lone surrogate: the full path words the error
        return values

    return scalars


def frame_of(parts: Sequence[Rows], spec: PipelineSpec) -> pl.DataFrame:
    """One typed frame of several requests' rows, in order (what a batch scores)."""
    import polars as pl

    schema = _schema(spec)
    segments: list[pl.DataFrame] = []
    pending: list[tuple[Any, ...]] = []
    for part in parts:
        if part.columns is not None:
            pending.extend(zip(*part.columns.values(), strict=True))
            continue
        if pending:
            # Row tuples: polars builds a small frame from them several times faster than from column lists.
            segments.append(pl.DataFrame(pending, schema=schema, orient="row"))
            pending = []
        assert part.frame is not None
        segments.append(part.frame)
    if pending:
        segments.append(pl.DataFrame(pending, schema=schema, orient="row"))
    return segments[0] if len(segments) == 1 else pl.concat(segments, how="vertical")


_SCHEMAS: dict[int, tuple[PipelineSpec, dict[str, Any]]] = {}


def _schema(spec: PipelineSpec) -> dict[str, Any]:
    """The polars schema of validated request rows (the full path's dtypes)."""
    import polars as pl

    from kiln.source import POLARS_DTYPES

    cached = _SCHEMAS.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    schema = {name: pl.Datetime("us") if spec.schema_[name].dtype == "datetime" else getattr(pl, POLARS_DTYPES[spec.schema_[name].dtype])
              for name in spec.input_columns}
    if len(_SCHEMAS) > 64:
        _SCHEMAS.clear()
    _SCHEMAS[id(spec)] = (spec, schema)
    return schema


# ------------------------------------------------------------------------------------- the contract as a pydantic model
def _model_name(spec: PipelineSpec) -> str:
    return "".join(part[:1].upper() + part[1:] for part in spec.name.replace("-", "_").split("_") if part) + "Row"


def row_model(spec: PipelineSpec) -> type[Any]:
    """A pydantic model of one request row: every input column (by its name), typed, with its limits.

    Numbers carry the spec's ``min``/``max``, categories their ``allowed`` values (``unknown_category: reject``), text
    ``serving.max_string_chars``; datetimes are ISO 8601 text. It describes the contract (OpenAPI, typed clients);
    :func:`parse_request` enforces it first, with the error messages a client gets."""
    from pydantic import ConfigDict, Field, create_model

    reject = spec.serving.unknown_category == "reject"
    longest = spec.serving.max_string_chars
    fields: dict[str, Any] = {}
    for i, name in enumerate(spec.input_columns):
        col = spec.schema_[name]
        limits: dict[str, Any] = {}
        kind: Any
        if col.dtype in ("float", "int"):
            kind = float if col.dtype == "float" else int
            low, high = col.min, col.max
            if col.dtype == "int":
                low = INT64[0] if low is None else max(int(math.ceil(low)), INT64[0])
                high = INT64[1] if high is None else min(int(math.floor(high)), INT64[1])
            else:
                limits["allow_inf_nan"] = False
            if low is not None:
                limits["ge"] = low
            if high is not None:
                limits["le"] = high
        elif col.dtype == "bool":
            kind = bool
        elif col.allowed is not None and reject:
            kind = Literal[tuple(col.allowed)]  # type: ignore[valid-type]
        else:
            kind = str
            limits["max_length"] = longest
            if col.dtype == "datetime":
                limits["json_schema_extra"] = {"format": "date-time"}
        if col.nullable:
            kind = kind | None
        described = f"{col.dtype}{', nullable' if col.nullable else ''}{', key' if col.key else ''}"
        fields[f"c{i}"] = (kind, Field(alias=name, description=described, **limits))
    return create_model(_model_name(spec), __config__=ConfigDict(extra="forbid", populate_by_name=False), **fields)  # type: ignore[call-overload,no-any-return]


def example_row(spec: PipelineSpec) -> dict[str, Any]:
    """One valid request row for the spec (a value inside every column's limits): what a worker scores once at start,
    so that its first client does not pay for lazy initialisation."""
    row: dict[str, Any] = {}
    for name in spec.input_columns:
        col = spec.schema_[name]
        if col.dtype in ("float", "int"):
            low = col.min if col.min is not None else (min(0.0, col.max) if col.max is not None else 0.0)
            value = math.ceil(low) if col.dtype == "int" else float(low)
            row[name] = value if col.max is None or value <= col.max else col.max
        elif col.dtype == "bool":
            row[name] = False
        elif col.dtype == "datetime":
            row[name] = "2000-01-01T00:00:00"
        else:
            row[name] = col.allowed[0] if col.allowed else "example"
    return row
