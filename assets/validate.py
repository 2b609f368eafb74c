"""`<p>/validated` and the data contract: blocking great-expectations suites built from the spec.

great_expectations is imported inside check bodies only (it costs seconds to import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from assets.ingest import POLARS_DTYPES, partitions_def
from assets.keys import key
from platform_defs.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl

MAX_DROPPED_SHARE = 0.05


@dataclass(frozen=True)
class Rule:
    """One expectation of the contract, named so a failure says which rule broke where."""

    name: str
    column: str | None
    expectation: str
    kwargs: dict[str, Any]


def schema_rules(spec: PipelineSpec, present: list[str]) -> list[Rule]:
    """The raw-data schema contract: exact column set, exact dtypes, required non-nulls, at least one row."""
    rules = [
        Rule("columns_match", None, "ExpectTableColumnsToMatchSet", {"column_set": list(spec.schema_), "exact_match": True}),
        Rule("not_empty", None, "ExpectTableRowCountToBeBetween", {"min_value": 1}),
    ]
    for name, col in spec.schema_.items():
        if name not in present:
            continue
        rules.append(Rule("dtype", name, "ExpectColumnValuesToBeOfType", {"column": name, "type_": col.dtype}))
        if not col.nullable:
            rules.append(Rule("not_null", name, "ExpectColumnValuesToNotBeNull", {"column": name}))
    return rules


def quality_rules(spec: PipelineSpec) -> list[Rule]:
    """The validated-data quality contract: ranges, allowed values, unique keys, at least one row."""
    rules = [Rule("not_empty", None, "ExpectTableRowCountToBeBetween", {"min_value": 1})]
    for name, col in spec.schema_.items():
        if col.min is not None or col.max is not None:
            rules.append(
                Rule("range", name, "ExpectColumnValuesToBeBetween", {"column": name, "min_value": col.min, "max_value": col.max})
            )
        if col.allowed is not None:
            rules.append(Rule("allowed_values", name, "ExpectColumnValuesToBeInSet", {"column": name, "value_set": col.allowed}))
        if col.key:
            rules.append(Rule("unique_key", name, "ExpectColumnValuesToBeUnique", {"column": name}))
    return rules


_GX_CONTEXT: Any = None


def run_rules(frame: pl.DataFrame, rules: list[Rule], suite_name: str) -> list[dict[str, Any]]:
    """Validate a frame with great-expectations 1.x (ephemeral context); one dict per failed rule."""
    global _GX_CONTEXT
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if _GX_CONTEXT is None:
        _GX_CONTEXT = gx.get_context(mode="ephemeral")
        _GX_CONTEXT.variables.progress_bars = ProgressBarsConfig(globally=False)
        _GX_CONTEXT.data_sources.add_pandas("kiln").add_dataframe_asset("frame").add_batch_definition_whole_dataframe("all")
    batch_def = _GX_CONTEXT.data_sources.get("kiln").get_asset("frame").get_batch_definition("all")
    suite = gx.ExpectationSuite(name=suite_name)
    for rule in rules:
        suite.add_expectation(getattr(gx.expectations, rule.expectation)(**rule.kwargs))
    # Arrow-backed columns let GX report the spec's own dtype names (int, float, str, bool, datetime).
    pdf = frame.to_pandas(use_pyarrow_extension_array=True)
    result = batch_def.get_batch(batch_parameters={"dataframe": pdf}).validate(suite, result_format="SUMMARY")
    failures = []
    for rule, res in zip(rules, result.results, strict=True):
        if res.success:
            continue
        detail = res.result or {}
        column = rule.column
        observed = str(detail.get("observed_value", ""))[:200]
        if rule.expectation == "ExpectTableColumnsToMatchSet":
            have = set(detail.get("observed_value") or frame.columns)
            missing = sorted(set(rule.kwargs["column_set"]) - have)
            extra = sorted(have - set(rule.kwargs["column_set"]))
            column = ", ".join(missing + extra)
            observed = f"missing {missing}, unexpected {extra}"
        failures.append(
            {
                "rule": rule.name,
                "column": column,
                "expectation": rule.expectation,
                "unexpected_count": detail.get("unexpected_count"),
                "unexpected_percent": round(float(detail.get("unexpected_percent") or 0.0), 3),
                "sample_values": [str(v) for v in (detail.get("partial_unexpected_list") or [])[:5]],
                "observed": observed,
                "error": (res.exception_info or {}).get("exception_message"),
            }
        )
    return failures


def describe(failures: list[dict[str, Any]]) -> str:
    """One line per failed rule: column, rule and how many rows."""
    parts = []
    for f in failures:
        where = f"column '{f['column']}'" if f["column"] else "table"
        count = f" ({f['unexpected_count']} rows, {f['unexpected_percent']}%)" if f["unexpected_count"] else ""
        observed = f" observed {f['observed']}" if f["observed"] and not f["unexpected_count"] else ""
        samples = f" e.g. {f['sample_values']}" if f["sample_values"] else ""
        parts.append(f"{where}: rule {f['rule']} failed{count}{observed}{samples}")
    return "; ".join(parts)


def violations(frame: pl.DataFrame, spec: PipelineSpec) -> pl.DataFrame:
    """One boolean column per spec column present in the frame: True where a row breaks its null, range or allowed rule."""
    import polars as pl

    conditions = []
    for name, col in spec.schema_.items():
        if name not in frame.columns:
            continue
        c = pl.col(name)
        bad = c.is_null() if not col.nullable else pl.lit(False)
        if col.min is not None:
            bad = bad | (c < col.min).fill_null(False)
        if col.max is not None:
            bad = bad | (c > col.max).fill_null(False)
        if col.allowed is not None:
            bad = bad | (~c.is_in(col.allowed)).fill_null(False)
        conditions.append(bad.alias(name))
    return frame.select(conditions)


def cast_to_spec(frame: pl.DataFrame, spec: PipelineSpec, columns: list[str] | None = None) -> pl.DataFrame:
    """Select the spec's columns (or the given subset) cast to the spec's dtypes; raises on values that do not convert."""
    import polars as pl

    names = columns if columns is not None else list(spec.schema_)
    exprs = []
    for n in names:
        dtype = spec.schema_[n].dtype
        typed = pl.col(n).cast(pl.Datetime("us") if dtype == "datetime" else getattr(pl, POLARS_DTYPES[dtype]))
        # NaN is a missing value for the contract, not a number greater than every bound.
        exprs.append((typed.fill_nan(None) if dtype == "float" else typed).alias(n))
    return frame.select(exprs)


def conform(frame: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, dict[str, int]]:
    """Cast to the spec's dtypes and drop rows that break a null, range or allowed-value rule."""
    import polars as pl

    typed = cast_to_spec(frame, spec)
    flags = violations(typed, spec)
    counts = flags.sum().row(0, named=True)
    dropped = {n: int(v) for n, v in counts.items() if v}
    if not dropped:
        return typed, {}
    bad_rows = flags.select(pl.any_horizontal(pl.all())).to_series()
    return typed.filter(~bad_rows), dropped


def build(spec: PipelineSpec) -> list[Any]:
    """`<p>/validated` plus the blocking schema check on `<p>/raw` and quality check on `<p>/validated`."""
    import dagster as dg

    raw_key = dg.AssetKey(key(spec.name, "raw"))
    validated_key = dg.AssetKey(key(spec.name, "validated"))
    parts = partitions_def(spec)

    @dg.asset(
        key=validated_key,
        group_name=spec.name,
        partitions_def=parts,
        ins={"raw": dg.AssetIn(raw_key)},
        io_manager_key="parquet_io_manager",
        kinds={"polars"},
        description="Rows of raw data that pass the data contract, typed as the spec says.",
    )
    def validated(context, raw: Any):
        frame, dropped = conform(raw, spec)
        return dg.Output(
            frame,
            metadata={
                "dagster/row_count": frame.height,
                "rows_in": raw.height,
                "rows_dropped": raw.height - frame.height,
                "dropped_by_column": dg.MetadataValue.json(dropped),
            },
        )

    @dg.asset_check(
        asset=raw_key,
        name="schema_contract",
        blocking=True,
        partitions_def=parts,
        description="great-expectations: exact column set, dtypes, required non-nulls, non-empty.",
    )
    def raw_schema(context, raw: Any):
        failures = run_rules(raw, schema_rules(spec, raw.columns), f"{spec.name}_raw_schema")
        return _result(context, failures, raw.height)

    @dg.asset_check(
        asset=validated_key,
        name="quality_contract",
        blocking=True,
        partitions_def=parts,
        additional_ins={"raw": dg.AssetIn(raw_key)},
        description=f"great-expectations: ranges, allowed values, unique keys; at most {MAX_DROPPED_SHARE:.0%} rows dropped.",
    )
    def validated_quality(context, validated: Any, raw: Any):
        failures = run_rules(validated, quality_rules(spec), f"{spec.name}_validated_quality")
        dropped = raw.height - validated.height
        if raw.height and dropped / raw.height > MAX_DROPPED_SHARE:
            failures.append(
                {
                    "rule": "dropped_share",
                    "column": None,
                    "expectation": f"at most {MAX_DROPPED_SHARE:.0%} of rows break the contract",
                    "unexpected_count": dropped,
                    "unexpected_percent": round(100 * dropped / raw.height, 3),
                    "sample_values": [],
                    "observed": "",
                    "error": None,
                }
            )
        return _result(context, failures, validated.height)

    return [validated, raw_schema, validated_quality]


def _result(context: Any, failures: list[dict[str, Any]], rows: int) -> Any:
    import dagster as dg

    partition = context.partition_key if getattr(context, "has_partition_key", False) else None
    metadata: dict[str, Any] = {"rows": rows, "failed_rules": len(failures), "partition": partition or "none"}
    if failures:
        metadata["summary"] = describe(failures)
        metadata["failures"] = dg.MetadataValue.json(failures)
    return dg.AssetCheckResult(passed=not failures, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)
