"""`<p>/validated` and the data contract: blocking great-expectations suites built from the spec.

great_expectations is imported inside check bodies only (it costs seconds to import).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from assets.raw import POLARS_DTYPES, partitions_def
from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    import polars as pl

@dataclass(frozen=True)
class Rule:
    """One expectation of the contract, named so a failure says which rule broke where."""

    name: str
    column: str | None
    expectation: str
    kwargs: dict[str, Any]


def schema_rules(spec: PipelineSpec, present: list[str]) -> list[Rule]:
    """The raw-data schema contract: column set (exact, or the spec's extra-column policy), row count, exact dtypes and
    required non-nulls. Timestamps that do not parse stay text, so the dtype rule names them."""
    policy = spec.validation
    rows: dict[str, Any] = {"min_value": policy.min_rows}
    if policy.max_rows is not None:
        rows["max_value"] = policy.max_rows
    columns = list(spec.schema_)
    if policy.extra_columns == "fail":
        rules = [Rule("columns_match", None, "ExpectTableColumnsToMatchSet", {"column_set": columns, "exact_match": True})]
    else:
        rules = [Rule("columns_match", None, "ExpectTableColumnsToMatchSet", {"column_set": columns, "exact_match": False})]
    rules.append(Rule("row_count", None, "ExpectTableRowCountToBeBetween", rows))
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
    rows: dict[str, Any] = {"min_value": spec.validation.min_rows}
    if spec.validation.max_rows is not None:
        rows["max_value"] = spec.validation.max_rows
    rules = [Rule("row_count", None, "ExpectTableRowCountToBeBetween", rows)]
    for name, col in spec.schema_.items():
        if col.nullable and col.max_null_fraction is not None:
            kwargs = {"column": name, "mostly": 1 - col.max_null_fraction}
            rules.append(Rule("null_fraction", name, "ExpectColumnValuesToNotBeNull", kwargs))
        if col.min is not None or col.max is not None:
            rules.append(
                Rule("range", name, "ExpectColumnValuesToBeBetween", {"column": name, "min_value": col.min, "max_value": col.max})
            )
        if col.allowed is not None:
            rules.append(Rule("allowed_values", name, "ExpectColumnValuesToBeInSet", {"column": name, "value_set": col.allowed}))
        if col.key:
            rules.append(Rule("unique_key", name, "ExpectColumnValuesToBeUnique", {"column": name}))
    return rules


AFTER_QUARANTINE = ("row_count", "null_fraction")  # judged on the rows that stay, not on the rows that arrived
SAMPLES = 5  # unexpected values kept per failed rule
# A failed rule is reported from GX's BASIC result: unexpected count and percent, the first SAMPLES values.
# SUMMARY/COMPLETE add value counts and row indices that Kiln does not report (for pandas each copies the batch again).
_RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": SAMPLES}
_PASS_FAIL = {"result_format": "BOOLEAN_ONLY"}
# Column rules GX runs on all rows of the batch (the dtype rule reads the column's dtype: Kiln never hands GX object
# columns); every other column rule first drops the rows where its column is null, which copies the whole batch, so
# those rules on columns that have nulls get one-column batches.
_KEEPS_NULL_ROWS = frozenset({"ExpectColumnValuesToNotBeNull", "ExpectColumnValuesToBeOfType"})
# Hashing every key (uniqueness) is the one long rule, and pandas/pyarrow release the GIL while doing it: it gets its
# own batch, validated beside the others (in the pass/fail round on 64-bit hashes of text keys: see _key_hashes).
# Each worker has its own GX data source, hence its own execution engine: an engine keeps one active batch, so two
# validations must never share one.
_GX_WORKERS = min(2, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else min(2, os.cpu_count() or 1)
_GX_LOCK = threading.Lock()
_GX_CONTEXT: Any = None
_GX_SOURCES: queue.SimpleQueue[Any] = queue.SimpleQueue()
_GX_SUITES: OrderedDict[tuple[str, ...], list[Any]] = OrderedDict()  # rule sets -> GX configurations, newest last
_GX_SUITES_KEPT = 256


def _gx_context() -> Any:
    """One ephemeral GX context per process (no GX project on disk), with a pandas data source per worker."""
    global _GX_CONTEXT
    with _GX_LOCK:
        if _GX_CONTEXT is None:
            import great_expectations as gx
            import great_expectations.execution_engine.pandas_execution_engine as pandas_engine
            from great_expectations.data_context.types.base import ProgressBarsConfig

            # GX fingerprints each in-memory batch with an md5 of every value; Kiln's partitions are already identified
            # by their Dagster partition and data version, and the hash costs more than all the expectations together.
            pandas_engine.HASH_THRESHOLD = 0
            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False)
            for i in range(_GX_WORKERS):
                source = context.data_sources.add_pandas(f"kiln-{i}").add_dataframe_asset("frame")
                _GX_SOURCES.put(source.add_batch_definition_whole_dataframe("all"))
            _memoize_configurations()
            _plain_metric_ids()
            _GX_CONTEXT = context
    return _GX_CONTEXT


_MEMO = threading.local()  # the GX memo of the validation running on this thread, if any


def _memoize_configurations() -> None:
    """Inside Kiln's validations only, compute each GX expectation's ``configuration`` once per expectation object, and
    each configuration's expectation (``to_domain_obj``) once per configuration.

    GX rebuilds the configuration (a pydantic ``dict()`` plus a regex on the class name) some 60 times per expectation
    while planning its metrics: about a third of the CPU time of the 40-rule schema suite on a million rows; and it
    builds a new pydantic expectation from its configuration for every metric it plans. The memo lives for one
    validation on one thread and holds the objects it describes (so an id is never reused within it). It forgets an
    expectation as soon as one of its attributes is assigned, and rebuilds a configuration's expectation when what it
    is built from (kwargs, meta, severity, ...) changed; outside Kiln's validations GX behaves exactly as shipped.
    """
    from great_expectations.expectations.expectation import Expectation
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    shipped: property = vars(Expectation)["configuration"]
    build: Callable[[Any], Any] = shipped.fget  # type: ignore[assignment]
    assign = Expectation.__setattr__
    to_domain_obj = ExpectationConfiguration.to_domain_obj

    def configuration(self: Any) -> Any:
        memo: dict[Any, Any] | None = getattr(_MEMO, "memo", None)
        if memo is None:
            return build(self)
        hit = memo.get(id(self))
        if hit is None or hit[0] is not self:
            hit = memo[id(self)] = (self, build(self))
        return hit[1]

    def domain_obj(self: Any) -> Any:
        memo: dict[Any, Any] | None = getattr(_MEMO, "memo", None)
        if memo is None:
            return to_domain_obj(self)
        made_of = (dict(self.kwargs), dict(self.meta or {}), self.id, self.notes, self.severity, self.description,
                   id(self.rendered_content))
        hit = memo.get(("domain", id(self)))
        if hit is None or hit[0] is not self or hit[1] != made_of:
            hit = memo[("domain", id(self))] = (self, made_of, to_domain_obj(self))
            memo[("of", id(hit[2]))] = ("domain", id(self))
        return hit[2]

    def setattr_forgetting(self: Any, name: str, value: Any) -> None:
        memo = getattr(_MEMO, "memo", None)
        if memo is not None:
            memo.pop(id(self), None)
            memo.pop(memo.pop(("of", id(self)), None), None)  # an expectation handed out by domain_obj
        assign(self, name, value)

    Expectation.configuration = property(configuration, doc=shipped.__doc__)  # type: ignore[method-assign,assignment]
    Expectation.__setattr__ = setattr_forgetting  # type: ignore[method-assign]
    ExpectationConfiguration.to_domain_obj = domain_obj  # type: ignore[method-assign]


_PLAIN = (str, int, bool, type(None))


def _plain(value: Any, id_dict: type) -> bool:
    """True for what ``convert_to_json_serializable`` returns unchanged: text, numbers (NaN excepted), booleans, None,
    and lists, tuples and plain dicts (string keys) of those."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is float:
        return value == value  # NaN becomes None there
    if kind is list or kind is tuple:
        return all(_plain(v, id_dict) for v in value)
    if kind is dict or kind is id_dict:
        return all(type(k) is str and _plain(v, id_dict) for k, v in value.items())
    return False


def _plain_metric_ids() -> None:
    """Inside Kiln's validations only, compute the id of a GX metric's kwargs without GX's generic JSON conversion
    when they hold only plain values (Kiln's always do).

    GX names every metric it plans by an md5 of its kwargs (``IDDict.to_id``), some 800 times for the two suites,
    each first walking the kwargs through ``convert_to_json_serializable``, a long isinstance ladder that returns plain
    values unchanged: the same JSON then hashes to the same id. Anything else (NumPy scalars, dates, NaN, nested GX
    objects, ids over chosen keys) takes GX's own path."""
    import hashlib
    import json

    from great_expectations.core.id_dict import IDDict

    shipped = IDDict.to_id

    def to_id(self: Any, id_keys: Any = None, id_ignore_keys: Any = None) -> Any:
        if (id_keys is None and id_ignore_keys is None and len(self) > 1 and not self._id_ignore_keys
                and getattr(_MEMO, "memo", None) is not None and _plain(self, IDDict)):
            return hashlib.md5(json.dumps(self, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest()
        return shipped(self, id_keys, id_ignore_keys)

    IDDict.to_id = to_id  # type: ignore[method-assign]


def _expectations(rules: list[Rule], suite_name: str) -> list[Any]:
    """GX expectation configurations of these rules, built once per rule set (GX's own suite building is quadratic);
    each carries its suite and its rule's position, so results are matched to rules, not to an order GX may change."""
    import great_expectations as gx

    cache_key = (suite_name, *(f"{r.expectation}{sorted(r.kwargs.items())!r}" for r in rules))
    with _GX_LOCK:
        if cache_key not in _GX_SUITES:
            _GX_SUITES[cache_key] = [
                getattr(gx.expectations, r.expectation)(**r.kwargs, meta={"kiln_suite": suite_name, "kiln_rule": i}).configuration
                for i, r in enumerate(rules)
            ]
            while len(_GX_SUITES) > _GX_SUITES_KEPT:
                _GX_SUITES.popitem(last=False)
        _GX_SUITES.move_to_end(cache_key)
        return _GX_SUITES[cache_key]


def run_rules(frame: pl.DataFrame, rules: list[Rule], suite_name: str, spec: PipelineSpec | None = None,
              arrow: bool = True) -> list[dict[str, Any]]:
    """Validate a frame with great-expectations 1.x; one dict per failed rule, with its severity from the spec.

    ``arrow=True`` hands GX Arrow-backed columns, so dtype rules see the spec's own type names (exact dtypes);
    value rules (ranges, sets, uniqueness) run much faster on NumPy-backed columns (``arrow=False``).
    """
    _gx_context()
    if not rules:
        return []
    # One pandas block per column (polars' Arrow path does this already): consolidating the NumPy columns into 2-D
    # blocks copies every value once more, and GX reads the columns one by one anyway.
    pdf = frame.to_pandas(use_pyarrow_extension_array=arrow) if arrow else frame.to_pandas(split_blocks=True)
    # Pass/fail first (GX's BOOLEAN_ONLY plans fewer metrics); the rules that failed run again for their counts and
    # samples, which only the failure path pays for.
    outcome = _run_batches(pdf, _batches(frame, rules), suite_name, _PASS_FAIL, _key_hashes(frame, rules))
    failed = [rule for rule in rules if not outcome[id(rule)].success]
    if failed:
        outcome |= _run_batches(pdf, _batches(frame, failed), f"{suite_name}:failed", _RESULT_FORMAT)
    failures = []
    for rule in rules:
        res = outcome[id(rule)]
        if res.success:
            continue
        detail = res.result or {}
        column = rule.column
        observed = str(detail.get("observed_value", ""))[:200]
        if rule.expectation == "ExpectTableColumnsToMatchSet":
            have = set(detail.get("observed_value") or frame.columns)
            missing = sorted(set(rule.kwargs["column_set"]) - have)
            extra = sorted(have - set(rule.kwargs["column_set"])) if rule.kwargs["exact_match"] else []
            column = ", ".join(missing + extra)
            observed = f"missing {missing}, unexpected {extra}"
        elif rule.name == "dtype" and spec is not None and rule.column is not None:
            observed = f"{frame.schema[rule.column]} (expected {spec.schema_[rule.column].dtype})"
        failures.append(
            {
                "rule": rule.name,
                "column": column,
                "severity": spec.validation.severity_of(rule.name, rule.column) if spec is not None else "error",
                "expectation": rule.expectation,
                "unexpected_count": detail.get("unexpected_count"),
                "unexpected_percent": round(float(detail.get("unexpected_percent") or 0.0), 3),
                "sample_values": [str(v) for v in (detail.get("partial_unexpected_list") or [])[:SAMPLES]],
                "observed": observed,
                "error": (res.exception_info or {}).get("exception_message"),
            }
        )
    return failures


def _key_hashes(frame: pl.DataFrame, rules: list[Rule]) -> dict[str, pd.DataFrame]:
    """For the pass/fail round: each text key column under a uniqueness rule as one column of 64-bit hashes.

    Equal strings have equal hashes, so keys whose hashes are all distinct are distinct: GX's uniqueness rule passes
    on the hashes exactly when it would pass on the strings, and hashing 8-byte integers costs pandas a fraction of
    hashing the strings (the one long rule of the quality suite). Hashes that repeat (a duplicate key, or two keys
    colliding) fail the rule, and a failed rule always runs again on the real values, which decide it and give its
    count and sample keys. Columns with nulls keep their strings (GX skips nulls; hashes of nulls would repeat)."""
    import polars as pl

    out = {}
    for rule in rules:
        name = rule.column
        if (rule.expectation == "ExpectColumnValuesToBeUnique" and name in frame.columns
                and frame.schema[name] == pl.String and frame[name].null_count() == 0):
            out[name] = frame.select(pl.col(name).hash(seed=0)).to_pandas()
    return out


def _run_batches(pdf: pd.DataFrame, batches: list[tuple[str | None, list[Rule]]], suite_name: str,
                 result_format: dict[str, Any], substitutes: dict[str, pd.DataFrame] | None = None) -> dict[int, Any]:
    """Validate each batch (on worker threads when there are several); the GX result of each rule, by ``id(rule)``.

    ``substitutes``: a column's stand-in frame for a batch of that column's uniqueness rules only (:func:`_key_hashes`)."""

    def validate(batch: tuple[str | None, list[Rule]]) -> list[Any]:
        column, group = batch
        if column is None:
            data = pdf
        elif substitutes and column in substitutes and all(r.expectation == "ExpectColumnValuesToBeUnique" for r in group):
            data = substitutes[column]
        else:
            data = pdf[[column]]
        return _validate(data, group, f"{suite_name}:{column or 'table'}", result_format)

    if len(batches) == 1 or _GX_WORKERS == 1:
        results = [validate(b) for b in batches]
    else:
        with ThreadPoolExecutor(max_workers=_GX_WORKERS, thread_name_prefix="kiln-gx") as pool:
            results = list(pool.map(validate, batches))
    return {id(rule): res for (_, group), group_results in zip(batches, results, strict=True)
            for rule, res in zip(group, group_results, strict=True)}


def _batches(frame: pl.DataFrame, rules: list[Rule]) -> list[tuple[str | None, list[Rule]]]:
    """Split the rules into GX batches: (None, rules on the whole frame) and (column, rules on that column alone).

    A uniqueness rule gets its column alone, and so does every null-dropping rule on a column that has nulls; the
    batch holding a uniqueness rule comes first, so the other batches run beside it."""
    null_counts = frame.null_count().row(0, named=True) if frame.width else {}
    groups: dict[str | None, list[Rule]] = {}
    for rule in rules:
        column = rule.column if rule.column in null_counts else None
        alone = column is not None and (rule.expectation == "ExpectColumnValuesToBeUnique"
                                         or (null_counts[column] > 0 and rule.expectation not in _KEEPS_NULL_ROWS))
        groups.setdefault(column if alone else None, []).append(rule)
    return sorted(groups.items(), key=lambda g: not any(r.expectation == "ExpectColumnValuesToBeUnique" for r in g[1]))


def _validate(pdf: pd.DataFrame, rules: list[Rule], suite_name: str, result_format: dict[str, Any]) -> list[Any]:
    """These rules over one pandas batch, on a worker's own data source; the expectation results in rule order."""
    configurations = _expectations(rules, suite_name)
    batch_definition = _GX_SOURCES.get()
    try:
        batch = batch_definition.get_batch(batch_parameters={"dataframe": pdf})
        # One validator on the loaded batch (Batch.validate would load the frame a second time).
        validator = _GX_CONTEXT.get_validator(batch=batch)
        _MEMO.memo = {}
        results = validator.graph_validate(configurations=configurations, runtime_configuration={"result_format": result_format})
    finally:
        _MEMO.memo = None
        _GX_SOURCES.put(batch_definition)
    by_rule = {res.expectation_config.meta["kiln_rule"]: res for res in results}
    return [by_rule[i] for i in range(len(rules))]


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
    return good, _counts(bad)


def split_rows(typed: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Good rows, and bad rows with a ``_reasons`` column ("amount.range; country.allowed_values") for `<p>/quarantine`.

    Only rules of severity ``error`` reject rows; ``warn`` rules are reported by the checks and rows stay."""
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
    if not reasons:
        return typed, typed.clear().with_columns(pl.lit("").alias("_reasons"))
    labelled_frame = typed.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("_reasons"))
    bad_mask = pl.col("_reasons").is_not_null() & (pl.col("_reasons") != "")
    good = labelled_frame.filter(~bad_mask.fill_null(False)).drop("_reasons")
    bad = labelled_frame.filter(bad_mask.fill_null(False))
    return good, bad


def _counts(bad: pl.DataFrame) -> dict[str, int]:
    """Rejected rows per column (a row breaking two columns counts for both)."""
    if bad.height == 0:
        return {}
    import polars as pl

    exploded = bad.select(pl.col("_reasons").str.split("; ")).explode("_reasons")
    per_column = exploded.select(pl.col("_reasons").str.split(".").list.first().alias("column")).group_by("column").len()
    return {r["column"]: int(r["len"]) for r in per_column.to_dicts()}


def column_schema(frame: pl.DataFrame) -> Any:
    """A Dagster ``TableSchema`` of a frame's columns and dtypes (shown in the UI, compared between materializations)."""
    import dagster as dg

    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])


def schema_change(context: Any, asset_key: Any, schema: Any) -> tuple[bool, dict[str, Any]]:
    """Compare a column schema with the asset's previous materialization: (unchanged, metadata naming what changed)."""
    event = context.instance.get_latest_materialization_event(asset_key)
    previous = None
    if event is not None and event.asset_materialization is not None:
        value = event.asset_materialization.metadata.get("dagster/column_schema")
        previous = getattr(value, "schema", None)
    if previous is None:
        return True, {"previous": "none (first materialization)"}
    before = {c.name: c.type for c in previous.columns}
    now = {c.name: c.type for c in schema.columns}
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    retyped = sorted(f"{n}: {before[n]} -> {now[n]}" for n in set(now) & set(before) if now[n] != before[n])
    changed = bool(added or removed or retyped)
    return not changed, {"added": ", ".join(added) or "none", "removed": ", ".join(removed) or "none",
                         "retyped": ", ".join(retyped) or "none"}


def check_result(check_name: str, asset_key: Any, failures: list[dict[str, Any]], rows: int, partition: str | None,
                 file: str | None) -> Any:
    """An asset-check result a person can act on: every failed rule with column, counts, samples, file and partition.

    It fails with ERROR severity (blocking) when an ``error`` rule failed, with WARN when only ``warn`` rules did."""
    import dagster as dg

    errors = [f for f in failures if f.get("severity", "error") == "error"]
    metadata: dict[str, Any] = {"rows": rows, "failed_rules": len(failures), "partition": partition or "none",
                                "file": file or "none"}
    if failures:
        metadata["summary"] = describe(failures)
        metadata["failures"] = dg.MetadataValue.json(failures)
        metadata["failed_rule_table"] = dg.MetadataValue.md(_failure_table(failures))
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=check_name,
        passed=not failures,
        severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


def _failure_table(failures: list[dict[str, Any]]) -> str:
    lines = ["| rule | column | severity | unexpected | % | samples |", "|---|---|---|---|---|---|"]
    for f in failures:
        samples = ", ".join(f["sample_values"]) or f["observed"]
        lines.append(f"| {f['rule']} | {f['column'] or '(table)'} | {f.get('severity', 'error')} | "
                     f"{f['unexpected_count'] if f['unexpected_count'] is not None else ''} | {f['unexpected_percent']} | "
                     f"{samples.replace('|', '/')} |")
    return "\n".join(lines)


def build(spec: PipelineSpec) -> list[Any]:
    """`<p>/validated` and `<p>/quarantine` with the blocking GX quality check and a schema-change check."""
    import dagster as dg

    from kiln import steps as k8s
    from resources.storage import KilnStorage

    raw_key = dg.AssetKey(key(spec.name, "raw"))
    validated_key = dg.AssetKey(key(spec.name, "validated"))
    quarantine_key = dg.AssetKey(key(spec.name, "quarantine"))
    parts = partitions_def(spec)
    policy = spec.validation
    limit = policy.max_bad_row_share if policy.on_bad_rows == "quarantine" else 0.0

    @dg.multi_asset(
        name=f"{spec.name}__validated",
        group_name=spec.name,
        op_tags=k8s.op_tags(spec, "validated"),
        pool=k8s.pool(spec, "validated"),
        partitions_def=parts,
        ins={"raw": dg.AssetIn(raw_key)},
        outs={
            "validated": dg.AssetOut(key=validated_key, io_manager_key="parquet_io_manager", is_required=False, kinds={"polars"},
                                     description="Rows of raw data that pass the data contract, typed as the spec says."),
            "quarantine": dg.AssetOut(key=quarantine_key, io_manager_key="parquet_io_manager", is_required=False,
                                      kinds={"polars"}, description="Rejected rows with the rules they broke (`_reasons`)."),
        },
        check_specs=[
            dg.AssetCheckSpec("quality_contract", asset=validated_key, blocking=True,
                              description=f"great-expectations: ranges, allowed values, unique keys; bad rows "
                                          f"{'quarantined up to ' + format(limit, '.0%') if limit else 'fail the partition'}."),
            dg.AssetCheckSpec("schema_change", asset=validated_key, description="Columns or dtypes changed since the last run."),
        ],
        required_resource_keys={"storage"},
        can_subset=False,
    )
    def validated(context, raw: Any):
        from assets.raw import source_file

        storage: KilnStorage = context.resources.storage
        partition = context.partition_key if context.has_partition_key else None
        file = str(source_file(storage.source_dir(spec.source.path), spec, partition)) if partition else spec.source.path
        typed = cast_to_spec(raw, spec)
        rules = quality_rules(spec)
        after = [r for r in rules if r.name in AFTER_QUARANTINE]
        rows_rules = [r for r in rules if r.name not in AFTER_QUARANTINE]
        failures = run_rules(typed, rows_rules, f"{spec.name}_validated_quality", spec, arrow=False)
        good, bad = split_rows(typed, spec)
        failures += run_rules(good, after, f"{spec.name}_validated_table", spec, arrow=False)
        share = bad.height / typed.height if typed.height else 0.0
        if bad.height and share > limit:
            failures.append({
                "rule": "bad_row_share", "column": None, "severity": policy.severity_of("bad_row_share", None),
                "expectation": f"at most {limit:.1%} of rows break the contract ({policy.on_bad_rows})",
                "unexpected_count": bad.height, "unexpected_percent": round(100 * share, 3),
                "sample_values": bad["_reasons"].head(5).to_list(), "observed": "", "error": None,
            })
        elif bad.height:
            # Within the limit the rows are quarantined; the rules they broke are reported, not blocking.
            failures = [f | {"severity": "warn"} if f["rule"] in ("range", "allowed_values", "unique_key", "not_null") else f
                        for f in failures]
        result = check_result("quality_contract", validated_key, failures, typed.height, partition, file)
        quarantine_meta = {"dagster/row_count": bad.height, "partition": partition or "none", "file": file,
                           "reasons": dg.MetadataValue.json(_counts(bad))}
        yield dg.Output(bad, output_name="quarantine", metadata=quarantine_meta)
        schema = column_schema(good)
        unchanged, change = schema_change(context, validated_key, schema)
        if result.severity == dg.AssetCheckSeverity.ERROR and not result.passed:
            context.log.error(f"{spec.name}/validated [{partition}] rejected: {result.metadata['summary'].value}")
            yield result
            yield dg.AssetCheckResult(asset_key=validated_key, check_name="schema_change", passed=True,
                                      metadata={"skipped": "partition rejected"})
            return
        yield dg.Output(
            good,
            output_name="validated",
            metadata={
                "dagster/row_count": good.height,
                "dagster/column_schema": schema,
                "rows_in": raw.height,
                "rows_quarantined": bad.height,
                "quarantined_by_column": dg.MetadataValue.json(_counts(bad)),
                "partition": partition or "none",
            },
        )
        yield result
        yield dg.AssetCheckResult(asset_key=validated_key, check_name="schema_change", passed=unchanged,
                                  severity=dg.AssetCheckSeverity.WARN, metadata=change)

    return [validated]


def raw_schema_check(context: Any, spec: PipelineSpec, frame: pl.DataFrame, partition: str | None, file: str,
                     unparsed: dict[str, list[str]]) -> Any:
    """The blocking GX schema check on `<p>/raw`, run inside the raw step (one step per partition, no re-read)."""
    import dagster as dg

    failures = run_rules(frame, schema_rules(spec, frame.columns), f"{spec.name}_raw_schema", spec, arrow=True)
    for f in failures:
        if f["rule"] == "dtype" and f["column"] in unparsed and not f["sample_values"]:
            f["sample_values"] = unparsed[f["column"]]
    return check_result("schema_contract", dg.AssetKey(key(spec.name, "raw")), failures, frame.height, partition, file)
