"""Preflight: what a valid spec can still get wrong, found before any data is read (``kiln validate``).

The spec model checks each file on its own; these rules need more than the YAML: feature expressions compiled and
evaluated by polars against an empty frame of the schema (unknown columns, type errors), Python functions imported,
ports compared across pipelines, dates parsed as the partitions definition will. Each error reads
``<file>: <field>: <reason>``. polars is imported only for specs with expressions or pass-through columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl

_POLARS_DTYPES = {"float": "Float64", "int": "Int64", "str": "String", "bool": "Boolean"}


def check_specs(specs_with_paths: Iterable[tuple[PipelineSpec, Path]]) -> list[str]:
    """Every preflight error of the specs, each ``"<file>: <field>: <reason>"``; empty when all would materialize."""
    pairs = list(specs_with_paths)
    errors: list[str] = []
    for spec, path in pairs:
        errors += [f"{path}: {field}: {reason}" for field, reason in spec_problems(spec)]
    errors += _port_clashes(pairs)
    return errors


def spec_problems(spec: PipelineSpec) -> list[tuple[str, str]]:
    """``(field, reason)`` for each problem of one spec."""
    problems = _column_problems(spec)
    problems += _function_problem("features.function", spec.features.function, "feature function")
    problems += _function_problem("source.simulator", spec.source.simulator, "simulator")
    problems += _date_problem(spec)
    if not problems and (spec.features.expressions or spec.features.passthrough):
        problems += _expression_problems(spec)
    return problems


def _column_problems(spec: PipelineSpec) -> list[tuple[str, str]]:
    columns = spec.schema_
    problems: list[tuple[str, str]] = []
    if spec.target not in columns:
        problems.append(("target", f"'{spec.target}' is not a schema column"))
    for group in ("passthrough", "categorical"):
        for name in getattr(spec.features, group):
            if name not in columns:
                problems.append((f"features.{group}", f"'{name}' is not a schema column"))
    # The feature table joins key, timestamp and target beside the features: a feature of the same name is a
    # duplicate column there, and the run fails.
    reserved: dict[str, str] = {spec.target: "the target", **{k: "a key column" for k in spec.key_columns}}
    if spec.source.timestamp_column:
        reserved[spec.source.timestamp_column] = "source.timestamp_column"
    for group, names in (("passthrough", spec.features.passthrough), ("categorical", spec.features.categorical),
                         ("expressions", list(spec.features.expressions))):
        for name in names:
            if name in reserved:
                field = f"features.{group}" + (f".{name}" if group == "expressions" else "")
                problems.append((field, f"'{name}' is {reserved[name]}; it is kept beside the features, so it cannot be one "
                                        "(remove it, or rename the expression)"))
    for name in spec.features.passthrough:
        if name in columns and columns[name].dtype == "str":
            problems.append(("features.passthrough", f"'{name}' is a str column; pass-through features are numbers "
                                                      f"(list it under features.categorical with schema.{name}.allowed)"))
    return problems


def _function_problem(field: str, dotted: str | None, what: str) -> list[tuple[str, str]]:
    if not dotted:
        return []
    from kiln.features import load_function

    try:
        function = load_function(dotted)
    except Exception as exc:  # an import can raise anything the module raises at import time
        return [(field, f"{what} {exc}; write 'package.module:function' importable from this environment")]
    if not callable(function):
        return [(field, f"'{dotted}' is a {type(function).__name__}, not a function")]
    return []


def _date_problem(spec: PipelineSpec) -> list[tuple[str, str]]:
    try:
        date.fromisoformat(spec.source.start_date)
    except ValueError as exc:
        return [("source.start_date", f"'{spec.source.start_date}' is not a calendar date ({exc})")]
    return []


def empty_frame(spec: PipelineSpec) -> pl.DataFrame:
    """A frame with no rows and the schema's columns, typed as the validated data is."""
    import polars as pl

    types: dict[str, Any] = {n: pl.Datetime("us") if c.dtype == "datetime" else getattr(pl, _POLARS_DTYPES[c.dtype])
                             for n, c in spec.schema_.items()}
    return pl.DataFrame(schema=types)


def _expression_problems(spec: PipelineSpec) -> list[tuple[str, str]]:
    import polars as pl

    frame = empty_frame(spec)
    problems: list[tuple[str, str]] = []
    for name, sql in spec.features.expressions.items():
        field = f"features.expressions.{name}"
        try:
            result = frame.select(pl.sql_expr(sql).alias(name))
        except Exception as exc:  # polars raises SQL, column-not-found, schema and invalid-operation errors
            reason = str(exc).splitlines()[0][:300]
            problems.append((field, f"'{sql}' does not compute on the schema's columns: {reason}"))
            continue
        dtype = result.schema[name]
        if not (dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null):
            problems.append((field, f"'{sql}' gives {dtype}, not a number; features are numbers (cast it, or compare it)"))
    return problems


def _port_clashes(pairs: list[tuple[PipelineSpec, Path]]) -> list[str]:
    by_port: dict[int, list[tuple[PipelineSpec, Path]]] = {}
    for spec, path in pairs:
        by_port.setdefault(spec.serving.port, []).append((spec, path))
    errors = []
    for port, users in sorted(by_port.items()):
        if len(users) > 1:
            names = ", ".join(f"{s.name} ({p})" for s, p in users)
            for _, path in users:
                errors.append(f"{path}: serving.port: {port} is used by {len(users)} pipelines: {names}; each endpoint needs "
                              "its own port (a missing serving block means 3000)")
    return errors
