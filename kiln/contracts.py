"""The data contract: rules built from the spec, the schema and quality checks they make up, and the row split behind
`<p>/validated` and `<p>/quarantine`.

The rules run as great-expectations suites (:mod:`kiln.gx`); the row split is plain polars. No Dagster here: the
asset modules turn these results into asset-check results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from kiln.gx import SAMPLES, Rule, run_rules
from kiln.source import POLARS_DTYPES, timezone_problems
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import polars as pl

__all__ = ["AFTER_QUARANTINE", "KeyLookup", "QualityReport", "ROW_RULES", "Rule", "SAMPLES", "bad_row_limit", "calendar_violations",
           "cast_to_spec", "check_quality", "conform", "describe", "failure_table", "quality_rules", "rejected_by_column",
           "rejected_by_rule", "run_rules", "schema_failures", "schema_rules", "split_rows", "target_rate_failure",
           "unreadable_failure", "violations"]

AFTER_QUARANTINE = ("row_count", "null_fraction")  # judged on the rows that stay, not on the rows that arrived
# rules whose breaking rows `<p>/validated` sets aside
ROW_RULES = ("not_null", "range", "allowed_values", "unique_key", "partition_day", "key_in_other_partition")
# Per key column, True where a row's key is stored for another partition (see kiln.keyindex.repeated_keys).
KeyLookup = Callable[["pl.DataFrame"], dict[str, "pl.Series"]]


def _row_count_rule(spec: PipelineSpec) -> Rule:
    rows: dict[str, Any] = {"min_value": spec.validation.min_rows}
    if spec.validation.max_rows is not None:
        rows["max_value"] = spec.validation.max_rows
    return Rule("row_count", None, "ExpectTableRowCountToBeBetween", rows)


def schema_rules(spec: PipelineSpec, present: list[str]) -> list[Rule]:
    """The raw-data schema contract: column set (exact, or the spec's extra-column policy), row count, exact dtypes and
    required non-nulls. Timestamps that do not parse stay text, so the dtype rule names them."""
    policy = spec.validation
    columns = {"column_set": list(spec.schema_), "exact_match": policy.extra_columns == "fail"}
    rules = [Rule("columns_match", None, "ExpectTableColumnsToMatchSet", columns), _row_count_rule(spec)]
    for name, col in spec.schema_.items():
        if name not in present:
            continue
        rules.append(Rule("dtype", name, "ExpectColumnValuesToBeOfType", {"column": name, "type_": col.dtype}))
        if not col.nullable:
            # Under quarantine a few null rows are set aside by `<p>/validated`; more than the limit fails here.
            mostly = {"mostly": 1 - policy.max_bad_row_share} if policy.on_bad_rows == "quarantine" and policy.max_bad_row_share else {}
            rules.append(Rule("not_null", name, "ExpectColumnValuesToNotBeNull", {"column": name, **mostly}))
    return rules


def quality_rules(spec: PipelineSpec) -> list[Rule]:
    """The validated-data quality contract: row-count bounds, null fractions, ranges, allowed values, unique keys."""
    rules = [_row_count_rule(spec)]
    for name, col in spec.schema_.items():
        if col.nullable and col.max_null_fraction is not None:
            kwargs = {"column": name, "mostly": 1 - col.max_null_fraction}
            rules.append(Rule("null_fraction", name, "ExpectColumnValuesToNotBeNull", kwargs))
        if col.min is not None or col.max is not None:
            rules.append(Rule("range", name, "ExpectColumnValuesToBeBetween", {"column": name, "min_value": col.min, "max_value": col.max}))
        if col.allowed is not None:
            rules.append(Rule("allowed_values", name, "ExpectColumnValuesToBeInSet", {"column": name, "value_set": col.allowed}))
        if col.key:
            rules.append(Rule("unique_key", name, "ExpectColumnValuesToBeUnique", {"column": name}))
    return rules


def violations(frame: pl.DataFrame, spec: PipelineSpec, keys: bool = False) -> pl.DataFrame:
    """One boolean column per spec column present in the frame: True where a row breaks its null, range or allowed rule
    (and, with ``keys``, repeats a key seen in an earlier row)."""
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
        if keys and col.key:
            bad = bad | ~c.is_first_distinct()
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
    """Cast to the spec's dtypes and drop rows that break a null, range, allowed-value or key rule."""
    good, bad = split_rows(cast_to_spec(frame, spec), spec)
    return good, rejected_by_column(bad)


def split_rows(typed: pl.DataFrame, spec: PipelineSpec, extra: dict[str, pl.Series] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Good rows, and bad rows with a ``_reasons`` column ("amount.range; country.allowed_values") for `<p>/quarantine`.

    ``extra`` adds row rules judged outside the frame ("ts.partition_day": a boolean per row). Only rules of severity
    ``error`` reject rows; ``warn`` rules are reported by the checks and rows stay."""
    import polars as pl

    flags = violations(typed, spec, keys=True)
    reasons = []
    for name in flags.columns:
        col = spec.schema_[name]
        c = pl.col(name)
        labelled = [
            (c.is_null(), "not_null", not col.nullable),
            ((c < col.min).fill_null(False) if col.min is not None else pl.lit(False), "range", col.min is not None),
            ((c > col.max).fill_null(False) if col.max is not None else pl.lit(False), "range", col.max is not None),
            ((~c.is_in(col.allowed)).fill_null(False) if col.allowed is not None else pl.lit(False), "allowed_values",
             col.allowed is not None),
            (~c.is_first_distinct(), "unique_key", col.key),
        ]
        for condition, rule, applies in labelled:
            if applies and spec.validation.severity_of(rule, name) == "error":
                reasons.append(pl.when(condition).then(pl.lit(f"{name}.{rule}")))
    for label, mask in (extra or {}).items():
        name, rule = label.rsplit(".", 1)
        if spec.validation.severity_of(rule, name) == "error":
            reasons.append(pl.when(pl.lit(mask)).then(pl.lit(label)))
    if not reasons:
        return typed, typed.clear().with_columns(pl.lit("").alias("_reasons"))
    labelled_frame = typed.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("_reasons"))
    bad_mask = pl.col("_reasons").is_not_null() & (pl.col("_reasons") != "")
    good = labelled_frame.filter(~bad_mask.fill_null(False)).drop("_reasons")
    bad = labelled_frame.filter(bad_mask.fill_null(False))
    return good, bad


def rejected_by_rule(bad: pl.DataFrame) -> dict[str, int]:
    """Rejected rows per reason ("amount.range"); a row breaking two rules counts for both."""
    if bad.height == 0:
        return {}
    import polars as pl

    counts = bad.select(pl.col("_reasons").str.split("; ")).explode("_reasons").group_by("_reasons").len()
    return {r["_reasons"]: int(r["len"]) for r in counts.to_dicts()}


def rejected_by_column(bad: pl.DataFrame) -> dict[str, int]:
    """Rejected rows per column (a row breaking two columns counts for both)."""
    if bad.height == 0:
        return {}
    import polars as pl

    exploded = bad.select(pl.col("_reasons").str.split("; ")).explode("_reasons")
    per_column = exploded.select(pl.col("_reasons").str.split(".").list.first().alias("column")).group_by("column").len()
    return {r["column"]: int(r["len"]) for r in per_column.to_dicts()}


def schema_failures(frame: pl.DataFrame, spec: PipelineSpec, unparsed: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """The raw schema contract on a frame as read; a dtype failure of a CSV column left as text shows the values that
    did not convert (``unparsed``, from :func:`kiln.source.read_source_with_report`)."""
    failures = run_rules(frame, schema_rules(spec, frame.columns), f"{spec.name}_raw_schema", spec, arrow=True)
    for f in failures:
        if f["rule"] == "dtype" and unparsed and f["column"] in unparsed and not f["sample_values"]:
            f["sample_values"] = unparsed[f["column"]]
    # GX's type check takes any timestamp for a datetime; whether aware values may pass is the spec's `timezone`.
    dtype_failed = {f["column"]: f for f in failures if f["rule"] == "dtype"}
    for name, problem in timezone_problems(frame, spec, unparsed).items():
        if name in dtype_failed:
            dtype_failed[name]["observed"] = f"{dtype_failed[name]['observed']}: {problem}"
        else:
            failures.append({"rule": "dtype", "column": name, "severity": spec.validation.severity_of("dtype", name),
                             "expectation": "ExpectColumnValuesToBeOfType", "unexpected_count": None, "unexpected_percent": 0.0,
                             "sample_values": [], "observed": f"{frame.schema[name]}: {problem}", "error": None})
    return failures


def unreadable_failure(spec: PipelineSpec, message: str) -> dict[str, Any]:
    """The schema-contract failure of a source file that cannot be read at all."""
    return {"rule": "readable", "column": "(file)", "severity": "error", "expectation": f"the file reads as {spec.source.format}",
            "unexpected_count": None, "unexpected_percent": 0.0, "sample_values": [], "observed": message, "error": message}


def bad_row_limit(spec: PipelineSpec) -> float:
    """The share of rows that may be quarantined before the partition fails (0 unless ``on_bad_rows: quarantine``)."""
    policy = spec.validation
    return policy.max_bad_row_share if policy.on_bad_rows == "quarantine" else 0.0


@dataclass(frozen=True)
class QualityReport:
    """The quality contract on one batch of raw rows: rows kept, rows set aside (with ``_reasons``), failed rules."""

    good: pl.DataFrame
    bad: pl.DataFrame
    failures: list[dict[str, Any]]
    rows: int  # typed rows checked

    @property
    def blocking(self) -> bool:
        """True when a rule of severity ``error`` failed: nothing downstream may use these rows."""
        return any(f.get("severity", "error") == "error" for f in self.failures)


def calendar_violations(typed: pl.DataFrame, spec: PipelineSpec, partition: str | None) -> pl.Series | None:
    """Rule ``partition_day``: True where a row's ``source.timestamp_column`` falls outside the daily partition's day
    widened by ``validation.partition_tolerance_hours`` on both sides; None when the rule does not apply."""
    import polars as pl

    ts = spec.source.timestamp_column
    if spec.source.partitions != "daily" or not ts or ts not in typed.columns or not partition:
        return None
    try:
        day = datetime.strptime(partition, "%Y-%m-%d")
    except ValueError:
        return None
    tolerance = timedelta(hours=spec.validation.partition_tolerance_hours)
    c = pl.col(ts)
    if getattr(typed.schema[ts], "time_zone", None):
        c = c.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    outside = (c < day - tolerance) | (c >= day + timedelta(days=1) + tolerance)
    return typed.select(outside.fill_null(False).alias(ts)).to_series()


def _row_failure(rule: str, column: str, mask: pl.Series, values: pl.Series, spec: PipelineSpec, expectation: str) -> dict[str, Any]:
    """A failed row rule judged in polars, in the shape of a GX failure."""
    count = int(mask.sum())
    return {"rule": rule, "column": column, "severity": spec.validation.severity_of(rule, column), "expectation": expectation,
            "unexpected_count": count, "unexpected_percent": round(100 * count / len(mask), 3) if len(mask) else 0.0,
            "sample_values": [str(v) for v in values.filter(mask).head(SAMPLES).to_list()], "observed": "", "error": None}


def target_rate_failure(good: pl.DataFrame, spec: PipelineSpec) -> dict[str, Any] | None:
    """Rule ``target_rate``: the share of rows labelled 1 (true) must lie within ``validation.target``'s bounds.
    Judged on the rows that stay; a partition-level rule (it fails the partition, it sets no row aside)."""
    import polars as pl

    bounds = spec.validation.target
    if bounds is None or spec.target not in good.columns or good.height == 0:
        return None
    positives = int(good.select((pl.col(spec.target).cast(pl.Int64) == 1).fill_null(False).sum()).item())
    rate = positives / good.height
    low, high = bounds.min_positive_rate, bounds.max_positive_rate
    if (low is None or rate >= low) and (high is None or rate <= high):
        return None
    wanted = " and ".join(p for p in (f">= {low:.2%}" if low is not None else "", f"<= {high:.2%}" if high is not None else "") if p)
    return {"rule": "target_rate", "column": spec.target, "severity": spec.validation.severity_of("target_rate", spec.target),
            "expectation": f"positive rate of '{spec.target}' {wanted} (validation.target)", "unexpected_count": None,
            "unexpected_percent": round(100 * rate, 3), "sample_values": [],
            "observed": f"positive rate {rate:.2%} ({positives} of {good.height} rows), wanted {wanted}", "error": None}


def check_quality(raw: pl.DataFrame, spec: PipelineSpec, partition: str | None = None,
                  repeated_keys: KeyLookup | None = None) -> QualityReport:
    """Type raw rows, run the quality suite, and split off the rows that break a row rule.

    Row rules are judged on the rows that arrived; row count, null fractions and the target rate on the rows that
    stay. With a daily ``partition`` the timestamps must fall in its day (``partition_day``); ``repeated_keys`` marks
    keys already stored for another partition (``key_in_other_partition``). Every row rule reports the rows it set
    aside, so the counts add up to `<p>/quarantine`. Bad rows within the spec's quarantine limit only demote the row
    rules they broke to ``warn``; beyond it a ``bad_row_share`` failure blocks."""
    typed = cast_to_spec(raw, spec)
    rules = quality_rules(spec)
    failures = run_rules(typed, [r for r in rules if r.name not in AFTER_QUARANTINE], f"{spec.name}_validated_quality", spec,
                         arrow=False)
    flags: dict[str, pl.Series] = {}
    for name, col in spec.schema_.items():  # nulls in a required column: the raw check tolerates a few, they go here
        if not col.nullable and name in typed.columns and typed[name].null_count():
            mask = typed[name].is_null()
            failures.append(_row_failure("not_null", name, mask, typed[name], spec, "ExpectColumnValuesToNotBeNull"))
    outside = calendar_violations(typed, spec, partition)
    if outside is not None and outside.any():
        ts = outside.name
        flags[f"{ts}.partition_day"] = outside
        tolerance = spec.validation.partition_tolerance_hours
        failures.append(_row_failure("partition_day", ts, outside, typed[ts], spec,
                                     f"within partition {partition} (+/- {tolerance:g} h, validation.partition_tolerance_hours)"))
    for name, mask in (repeated_keys(typed) if repeated_keys is not None else {}).items():
        if mask.any():
            flags[f"{name}.key_in_other_partition"] = mask
            failures.append(_row_failure("key_in_other_partition", name, mask, typed[name], spec,
                                         "a key not already stored for another partition"))
    good, bad = split_rows(typed, spec, flags)
    quarantined = rejected_by_rule(bad)
    for f in failures:  # report the rows set aside (GX counts every copy of a repeated key; the first one stays)
        label = f"{f['column']}.{f['rule']}"
        if f["rule"] in ROW_RULES and label in quarantined:
            f["unexpected_count"] = quarantined[label]
            f["unexpected_percent"] = round(100 * quarantined[label] / typed.height, 3)
    failures += run_rules(good, [r for r in rules if r.name in AFTER_QUARANTINE], f"{spec.name}_validated_table", spec,
                          arrow=False)
    target = target_rate_failure(good, spec)
    if target is not None:
        failures.append(target)
    limit = bad_row_limit(spec)
    share = bad.height / typed.height if typed.height else 0.0
    if bad.height and share > limit:
        failures.append({
            "rule": "bad_row_share", "column": None, "severity": spec.validation.severity_of("bad_row_share", None),
            "expectation": f"at most {limit:.1%} of rows break the contract ({spec.validation.on_bad_rows})",
            "unexpected_count": bad.height, "unexpected_percent": round(100 * share, 3),
            "sample_values": bad["_reasons"].head(SAMPLES).to_list(), "observed": "", "error": None,
        })
    elif bad.height:
        failures = [f | {"severity": "warn"} if f["rule"] in ROW_RULES else f for f in failures]
    return QualityReport(good, bad, failures, typed.height)


def describe(failures: list[dict[str, Any]]) -> str:
    """One line per failed rule: column, rule, severity and how many rows."""
    parts = []
    for f in failures:
        where = f"column '{f['column']}'" if f["column"] else "table"
        count = f" ({f['unexpected_count']} rows, {f['unexpected_percent']}%)" if f["unexpected_count"] else ""
        observed = f" observed {f['observed']}" if f["observed"] and not f["unexpected_count"] else ""
        samples = f" e.g. {f['sample_values']}" if f["sample_values"] else ""
        level = "" if f.get("severity", "error") == "error" else " [warn]"
        parts.append(f"{where}: rule {f['rule']} failed{level}{count}{observed}{samples}")
    return "; ".join(parts)


def failure_table(failures: list[dict[str, Any]]) -> str:
    """The failed rules as a Markdown table (rule, column, severity, unexpected rows, percent, samples)."""
    lines = ["| rule | column | severity | unexpected | % | samples |", "|---|---|---|---|---|---|"]
    for f in failures:
        samples = ", ".join(f["sample_values"]) or f["observed"]
        lines.append(f"| {f['rule']} | {f['column'] or '(table)'} | {f.get('severity', 'error')} | "
                     f"{f['unexpected_count'] if f['unexpected_count'] is not None else ''} | {f['unexpected_percent']} | "
                     f"{samples.replace('|', '/')} |")
    return "\n".join(lines)
