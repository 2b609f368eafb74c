"""kiln.contracts without Dagster: the rules a spec makes, the rows the contract keeps and sets aside, and the failures
a person reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from kiln.contracts import (
    SAMPLES,
    cast_to_spec,
    check_quality,
    conform,
    describe,
    failure_table,
    quality_rules,
    schema_failures,
    schema_rules,
    split_rows,
    unreadable_failure,
)
from kiln.spec import RULES, PipelineSpec

REPO = Path(__file__).resolve().parents[2]


def make_spec(**validation: Any) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "orders", "source": {"path": "orders"}, "target": "label", "task": "classification",
        "features": {"passthrough": ["amount"]}, "validation": validation,
        "schema": {
            "order_id": {"dtype": "str", "key": True},
            "amount": {"dtype": "float", "min": 0, "max": 100},
            "country": {"dtype": "str", "allowed": ["DE", "FR"]},
            "note": {"dtype": "str", "nullable": True, "max_null_fraction": 0.5},
            "label": {"dtype": "int", "min": 0, "max": 1},
        },
    })


def orders(rows: int = 100, **replace: Any) -> pl.DataFrame:
    frame = pl.DataFrame({
        "order_id": [f"o{i}" for i in range(rows)],
        "amount": [float(i % 100) for i in range(rows)],
        "country": ["DE" if i % 2 else "FR" for i in range(rows)],
        "note": ["x" if i % 3 else None for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    })
    return frame.with_columns(**{k: pl.Series(k, v, dtype=frame.schema[k]) for k, v in replace.items()})


def test_rules_cover_the_spec_and_use_known_rule_names() -> None:
    spec = make_spec(max_rows=1000)
    quality = {(r.name, r.column) for r in quality_rules(spec)}
    assert quality == {("row_count", None), ("unique_key", "order_id"), ("range", "amount"), ("allowed_values", "country"),
                       ("null_fraction", "note"), ("range", "label")}
    schema = schema_rules(spec, ["order_id", "amount"])
    assert {(r.name, r.column) for r in schema} == {("columns_match", None), ("row_count", None), ("dtype", "order_id"),
                                                    ("not_null", "order_id"), ("dtype", "amount"), ("not_null", "amount")}
    assert {r.name for r in schema_rules(spec, list(spec.schema_)) + quality_rules(spec)} <= set(RULES)


def test_extra_columns_policy_and_quarantine_tolerance_shape_the_schema_rules() -> None:
    strict = make_spec(extra_columns="fail", on_bad_rows="fail")
    lenient = make_spec(extra_columns="ignore", on_bad_rows="quarantine", max_bad_row_share=0.1)
    [columns] = [r for r in schema_rules(strict, []) if r.name == "columns_match"]
    assert columns.kwargs["exact_match"] is True
    assert [r for r in schema_rules(lenient, []) if r.name == "columns_match"][0].kwargs["exact_match"] is False
    assert "mostly" not in [r for r in schema_rules(strict, ["amount"]) if r.name == "not_null"][0].kwargs
    assert [r for r in schema_rules(lenient, ["amount"]) if r.name == "not_null"][0].kwargs["mostly"] == pytest.approx(0.9)


def test_cast_to_spec_types_columns_and_treats_nan_as_missing() -> None:
    spec = make_spec()
    frame = orders(3, amount=[1.0, float("nan"), 3.0]).with_columns(pl.col("label").cast(pl.String))
    typed = cast_to_spec(frame, spec)
    assert typed.schema["label"] == pl.Int64 and typed["amount"].to_list() == [1.0, None, 3.0]
    with pytest.raises(pl.exceptions.InvalidOperationError):
        cast_to_spec(frame.with_columns(pl.lit("many").alias("label")), spec)


def test_split_rows_sets_aside_each_broken_row_with_its_reasons() -> None:
    spec = make_spec()
    frame = orders(10, amount=[1.0, 500.0, None, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, -1.0],
                   country=["DE", "DE", "DE", "XX", "FR", "FR", "FR", "FR", "FR", "XX"],
                   order_id=["a", "b", "c", "d", "e", "a", "g", "h", "i", "j"])
    good, bad = split_rows(cast_to_spec(frame, spec), spec)
    assert good.height == 5 and "_reasons" not in good.columns
    assert dict(zip(bad["order_id"], bad["_reasons"], strict=True)) == {
        "b": "amount.range", "c": "amount.not_null", "d": "country.allowed_values", "a": "order_id.unique_key",
        "j": "amount.range; country.allowed_values"}
    assert conform(frame, spec)[1] == {"amount": 3, "country": 2, "order_id": 1}


def test_a_warn_rule_keeps_its_rows() -> None:
    spec = make_spec(severity={"amount.range": "warn"})
    good, bad = split_rows(cast_to_spec(orders(10, amount=[500.0] + [1.0] * 9), spec), spec)
    assert (good.height, bad.height) == (10, 0)


def test_check_quality_passes_clean_rows() -> None:
    report = check_quality(orders(), make_spec())
    assert (report.good.height, report.bad.height, report.failures, report.blocking) == (100, 0, [], False)


def test_bad_rows_within_the_quarantine_limit_warn_and_are_set_aside() -> None:
    spec = make_spec(on_bad_rows="quarantine", max_bad_row_share=0.05)
    report = check_quality(orders(amount=[500.0, 700.0] + [1.0] * 98), spec)
    assert (report.good.height, report.bad.height, report.blocking) == (98, 2, False)
    [failure] = report.failures
    assert (failure["column"], failure["rule"], failure["severity"], failure["unexpected_count"]) == ("amount", "range", "warn", 2)
    assert failure["sample_values"] == ["500.0", "700.0"]


def test_bad_rows_beyond_the_limit_block_naming_column_rule_and_count() -> None:
    spec = make_spec(on_bad_rows="quarantine", max_bad_row_share=0.05)
    report = check_quality(orders(country=["XX"] * 10 + ["DE"] * 90), spec)
    assert report.blocking
    failures = {f["rule"]: f for f in report.failures}
    assert set(failures) == {"allowed_values", "bad_row_share"}
    assert (failures["allowed_values"]["column"], failures["allowed_values"]["unexpected_count"]) == ("country", 10)
    assert failures["allowed_values"]["sample_values"] == ["XX"] * SAMPLES
    assert failures["bad_row_share"]["unexpected_percent"] == 10.0
    assert "column 'country': rule allowed_values failed (10 rows, 10.0%) e.g. ['XX'" in describe(report.failures)


def test_row_count_and_null_fraction_are_judged_on_the_rows_that_stay() -> None:
    spec = make_spec(on_bad_rows="quarantine", max_bad_row_share=0.5, min_rows=60)
    # 45 rows broken: 55 stay, fewer than the 60 required; the notes of the staying rows are mostly missing
    frame = orders(amount=[500.0] * 45 + [1.0] * 55, note=["x"] * 45 + [None] * 55)
    failures = {f["rule"]: f for f in check_quality(frame, spec).failures}
    assert set(failures) == {"range", "row_count", "null_fraction"}
    assert failures["row_count"]["severity"] == "error" and failures["row_count"]["observed"] == "55"
    assert failures["null_fraction"]["unexpected_count"] == 55


def test_schema_failures_show_values_that_did_not_convert() -> None:
    spec = make_spec()
    frame = orders().with_columns(pl.col("amount").cast(pl.String)).drop("label")
    failures = {(f["column"], f["rule"]): f for f in schema_failures(frame, spec, {"amount": ["12,5", "n/a"]})}
    assert set(failures) == {("label", "columns_match"), ("amount", "dtype")}
    assert failures[("amount", "dtype")]["sample_values"] == ["12,5", "n/a"]
    assert failures[("amount", "dtype")]["observed"] == "String (expected float)"


def test_failures_read_as_one_line_each_and_as_a_table() -> None:
    unreadable = unreadable_failure(make_spec(), "orders: source file x.csv is empty (0 bytes)")
    warned = {"rule": "range", "column": "amount", "severity": "warn", "unexpected_count": 3, "unexpected_percent": 1.5,
              "sample_values": ["500.0"], "observed": ""}
    assert describe([unreadable, warned]) == ("column '(file)': rule readable failed observed orders: source file x.csv is empty "
                                              "(0 bytes); column 'amount': rule range failed [warn] (3 rows, 1.5%) e.g. ['500.0']")
    table = failure_table([warned]).splitlines()
    assert table[2] == "| range | amount | warn | 3 | 1.5 | 500.0 |"


def test_importing_the_contract_core_loads_neither_dagster_nor_gx_nor_dataframes() -> None:
    code = ("import sys, kiln.contracts, kiln.source; "
            "print(sorted(m for m in ('dagster', 'great_expectations', 'polars', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def timed_spec(**validation: Any) -> PipelineSpec:
    """The orders spec with a timestamp column and daily partitions."""
    data = make_spec(**validation).model_dump(by_alias=True, exclude_none=True)
    data["schema"]["ts"] = {"dtype": "datetime"}
    data["source"].update(partitions="daily", timestamp_column="ts")
    return PipelineSpec.model_validate(data)


def timed_orders(day: str, rows: int = 100) -> pl.DataFrame:
    from datetime import datetime, timedelta

    start = datetime.fromisoformat(day)
    return orders(rows).with_columns(pl.Series("ts", [start + timedelta(minutes=14 * i) for i in range(rows)]))


def test_timestamps_outside_the_partition_day_are_quarantined_as_partition_day() -> None:
    from datetime import timedelta

    spec = timed_spec(on_bad_rows="quarantine", max_bad_row_share=0.1, partition_tolerance_hours=2)
    frame = timed_orders("2026-01-05")
    shifted = frame.with_columns(  # 3 rows 30 years off, 1 row 1 h before midnight (within the tolerance), 1 row 3 h after the day
        pl.when(pl.int_range(pl.len()) < 3).then(pl.col("ts").dt.offset_by("30y"))
        .when(pl.int_range(pl.len()) == 3).then(pl.col("ts") - timedelta(hours=1))
        .when(pl.int_range(pl.len()) == 99).then(pl.col("ts") + timedelta(hours=8)).otherwise(pl.col("ts")).alias("ts"))
    report = check_quality(shifted, spec, "2026-01-05")
    assert (report.good.height, report.bad.height, report.blocking) == (96, 4, False)
    assert set(report.bad["_reasons"]) == {"ts.partition_day"}
    [failure] = report.failures
    assert (failure["rule"], failure["column"], failure["unexpected_count"], failure["severity"]) == ("partition_day", "ts", 4, "warn")
    assert failure["sample_values"][0].startswith("2056-01-05")
    # no partition (or a spec without daily partitions): the rule does not apply
    assert check_quality(shifted, spec).bad.height == 0
    # the same file under its own day passes; beyond the quarantine limit the partition fails
    assert check_quality(frame, spec, "2026-01-05").failures == []
    moved = check_quality(frame, spec, "2026-01-09")
    assert moved.blocking and moved.bad.height == 100
    assert {f["rule"] for f in moved.failures} == {"partition_day", "bad_row_share", "row_count"}  # no row stays


def test_keys_stored_for_another_partition_are_quarantined_and_counted(tmp_path: Path) -> None:
    from kiln.keyindex import HASH_META, key_hashes, repeated_keys, write_key_index

    spec = make_spec(on_bad_rows="quarantine", max_bad_row_share=0.5)
    index = tmp_path / "keys"
    yesterday = cast_to_spec(orders(100), spec)
    write_key_index(index, "2026-01-01", yesterday, ["order_id"])
    today = orders(100).with_columns(pl.Series("order_id", [f"o{i}" for i in range(70, 170)]))  # o70..o99 were stored yesterday

    def lookup(partition: str) -> Any:
        return lambda typed: repeated_keys(index, partition, typed, ["order_id"])

    report = check_quality(today, spec, None, lookup("2026-01-02"))
    assert (report.good.height, report.bad.height) == (70, 30)
    assert set(report.bad["_reasons"]) == {"order_id.key_in_other_partition"}
    [failure] = report.failures
    assert (failure["rule"], failure["unexpected_count"], failure["sample_values"][0]) == ("key_in_other_partition", 30, "o70")
    # re-validating yesterday itself replaces its own index: no duplicates
    assert check_quality(orders(100), spec, None, lookup("2026-01-01")).bad.height == 0
    # a stored hash equal to a new key's hash but for another key is a collision, not a duplicate
    fake = key_hashes(pl.DataFrame({"order_id": ["o150"]}), ["order_id"]).with_columns(pl.lit("zz").alias("order_id"))
    scheme = pl.read_parquet_metadata(index / "2026-01-01.parquet")[HASH_META]  # the hashes of this polars version
    fake.write_parquet(index / "2026-01-03.parquet", metadata={HASH_META: scheme})
    found = repeated_keys(index, "2026-01-02", pl.DataFrame({"order_id": ["o150", "o80"]}), ["order_id"])
    assert found["order_id"].to_list() == [False, True]
    # an index hashed by another polars version (no or other scheme) is hashed again from its keys
    stale = pl.DataFrame({"order_id": ["o160"], "_hash_order_id": pl.Series([12345], dtype=pl.UInt64)})
    stale.write_parquet(index / "2026-01-04.parquet", metadata={"kiln.key_hash": "polars-0.0.0"})
    assert repeated_keys(index, "2026-01-02", pl.DataFrame({"order_id": ["o160"]}), ["order_id"])["order_id"].to_list() == [True]


def test_target_rate_bounds_fail_the_partition_without_quarantining_rows() -> None:
    spec = make_spec(target={"max_positive_rate": 0.6})
    report = check_quality(orders(label=[1] * 100), spec)
    assert report.blocking and report.bad.height == 0 and report.good.height == 100
    [failure] = report.failures
    assert (failure["rule"], failure["column"], failure["severity"]) == ("target_rate", "label", "error")
    assert "positive rate 100.00% (100 of 100 rows)" in describe(report.failures)
    assert check_quality(orders(), spec).failures == []  # 50% positive
    low = make_spec(target={"min_positive_rate": 0.6}, severity={"target_rate": "warn"})
    warned = check_quality(orders(), low)
    assert not warned.blocking and [f["severity"] for f in warned.failures] == ["warn"]
    with pytest.raises(ValueError, match="min_positive_rate"):
        make_spec(target={"min_positive_rate": 0.7, "max_positive_rate": 0.2})


def test_quarantined_rows_and_the_reported_counts_add_up() -> None:
    spec = make_spec(on_bad_rows="quarantine", max_bad_row_share=0.2)
    # 2% nulls in a required column: set aside, and the check says so (not "all checks passed")
    nulls = check_quality(orders(amount=[None, None] + [1.0] * 98), spec)
    assert nulls.bad.height == 2 and not nulls.blocking
    assert [(f["rule"], f["column"], f["unexpected_count"], f["severity"]) for f in nulls.failures] == [("not_null", "amount", 2, "warn")]
    # NaN and +-inf amounts: NaN is missing (not_null), +-inf out of range; 15 rows set aside, 15 reported
    odd = [float("nan")] * 5 + [float("inf")] * 5 + [float("-inf")] * 5 + [1.0] * 85
    report = check_quality(orders(amount=odd), spec)
    counts = {f["rule"]: f["unexpected_count"] for f in report.failures}
    assert report.bad.height == 15 and counts == {"not_null": 5, "range": 10}
    assert sum(counts.values()) == report.bad.height
    # a repeated key: GX counts every copy, the quarantine holds the repeats; the check reports the repeats
    dup = check_quality(orders(order_id=["a", "a", "a", "b", "b"] + [f"o{i}" for i in range(95)]), spec)
    assert dup.bad.height == 3 and [(f["rule"], f["unexpected_count"]) for f in dup.failures] == [("unique_key", 3)]
