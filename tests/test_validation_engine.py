"""The GX engine behind every data-contract check: what `run_rules` reports must be what the rows hold.

The rules run on several GX batches (zero-row for column-set and dtype rules, one-column for null-dropping rules and
key uniqueness, the other columns shared between workers), some on worker threads with their own data sources, and
the pass/fail round reads integer stand-ins for text; these tests pin the counts, percentages and samples of each
failed rule against a direct computation, also when two validations run at once, and pin that great-expectations
itself is left as shipped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest

from kiln.contracts import SAMPLES, cast_to_spec, quality_rules, run_rules, schema_rules
from kiln.spec import PipelineSpec

ROWS = 3000
COLORS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "engine", "source": {"path": "engine"}, "target": "label", "task": "classification",
        "features": {"passthrough": ["amount", "score", "qty"]},
        "schema": {
            "row_id": {"dtype": "str", "key": True},
            "ts": {"dtype": "datetime"},
            "amount": {"dtype": "float", "min": 0, "max": 100, "nullable": True},
            "score": {"dtype": "float", "min": -1, "max": 1},
            "qty": {"dtype": "int", "min": 0, "max": 10},
            "color": {"dtype": "str", "allowed": COLORS},
            "flag": {"dtype": "bool"},
            "label": {"dtype": "int", "min": 0, "max": 1},
        },
    })


def _frame(shift: int) -> pl.DataFrame:
    """Known breakage: nulls and out-of-range amounts, out-of-range scores, unknown colours, repeated keys."""
    i = pl.col("i")
    first_repeat = ROWS - 5 - shift  # the last 5 rows repeat the keys of rows 5..9
    return pl.DataFrame({"i": pl.int_range(0, ROWS, eager=True)}).select(
        pl.when(i >= first_repeat).then(i - first_repeat + 5).otherwise(i).cast(pl.String).alias("row_id"),
        pl.datetime_range(datetime(2026, 1, 1), datetime(2026, 1, 1) + timedelta(minutes=ROWS - 1), "1m").alias("ts"),
        pl.when(i % 50 == shift).then(None).when(i % 97 == 1 + shift).then(500.0 + i).otherwise((i % 90).cast(pl.Float64))
        .alias("amount"),
        pl.when(i % 200 == 3 + shift).then(-2.0 - i).otherwise(0.5).alias("score"),
        (i % 11).alias("qty"),
        pl.when(i % 300 == 7 + shift).then(pl.lit("purple")).otherwise(pl.lit(COLORS[shift % 3])).alias("color"),
        (i % 2 == 0).alias("flag"),
        (i % 2).alias("label"),
    )


def _expected(frame: pl.DataFrame) -> dict[tuple[str, str], tuple[int, float, list[str]]]:
    """(column, rule) -> (unexpected count, percent of non-null rows, first samples), computed with polars."""
    breaks = {
        ("amount", "range"): pl.col("amount") > 100,
        ("score", "range"): pl.col("score") < -1,
        ("color", "allowed_values"): ~pl.col("color").is_in(COLORS),
        ("row_id", "unique_key"): pl.col("row_id").is_duplicated(),
    }
    out = {}
    for (column, rule), condition in breaks.items():
        bad = frame.filter(condition.fill_null(False))[column]
        nonnull = frame[column].drop_nulls().len()
        out[(column, rule)] = (bad.len(), round(100 * bad.len() / nonnull, 3), [str(v) for v in bad.head(SAMPLES)])
    return out


def _found(failures: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, float, list[str]]]:
    return {(f["column"], f["rule"]): (f["unexpected_count"], f["unexpected_percent"], f["sample_values"]) for f in failures}


def test_counts_percentages_and_samples_match_the_rows(spec: PipelineSpec) -> None:
    frame = cast_to_spec(_frame(0), spec)
    failures = run_rules(frame, quality_rules(spec), "engine_quality", spec, arrow=False)
    assert _found(failures) == _expected(frame)
    assert {f["severity"] for f in failures} == {"error"}
    # the columns with no breakage (and the row-count rule) pass
    assert not {f["column"] for f in failures} & {"qty", "label", None}


def test_two_validations_at_once_keep_their_own_answers(spec: PipelineSpec) -> None:
    frames = [cast_to_spec(_frame(shift), spec) for shift in (0, 1, 2, 3)]
    alone = [_found(run_rules(f, quality_rules(spec), "engine_quality", spec, arrow=False)) for f in frames]
    assert alone[0] != alone[1]  # the frames differ, so a mix-up between batches would show
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda f: _found(run_rules(f, quality_rules(spec), "engine_quality", spec, arrow=False)),
                                 frames * 2))
    assert together == alone * 2


def test_schema_rules_name_the_dtype_and_the_nulls(spec: PipelineSpec) -> None:
    frame = _frame(0).with_columns(
        pl.col("score").cast(pl.String),  # text where a float belongs
        # more than the 5% of null rows quarantine would set aside
        pl.when(pl.int_range(pl.len()) < 200).then(None).otherwise(pl.col("qty")).alias("qty"),
    ).drop("flag")
    failures = {(f["column"], f["rule"]): f for f in run_rules(frame, schema_rules(spec, frame.columns), "engine_raw", spec)}
    assert set(failures) == {("flag", "columns_match"), ("score", "dtype"), ("qty", "not_null")}
    assert failures[("score", "dtype")]["observed"] == "String (expected float)"
    assert failures[("qty", "not_null")]["unexpected_count"] == 200
    assert failures[("qty", "not_null")]["unexpected_percent"] == round(100 * 200 / ROWS, 3)
    assert failures[("flag", "columns_match")]["observed"] == "missing ['flag'], unexpected []"


def test_not_null_on_text_names_the_count_and_the_rows(spec: PipelineSpec) -> None:
    """Not-null rules on text pass or fail on a stand-in (byte lengths); the count and share are the text's own."""
    frame = _frame(0).with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0).then(None).otherwise(pl.col("color")).alias("color"),
        pl.when(pl.int_range(pl.len()) == 7).then(pl.lit("")).otherwise(pl.col("row_id")).alias("row_id"),  # empty is not null
    )
    failures = {(f["column"], f["rule"]): f for f in run_rules(frame, schema_rules(spec, frame.columns), "engine_nulls", spec)}
    assert set(failures) == {("color", "not_null")}
    assert failures[("color", "not_null")]["unexpected_count"] == ROWS // 10
    assert failures[("color", "not_null")]["unexpected_percent"] == 10.0


def test_a_dtype_rule_reads_the_column_dtype_of_every_column(spec: PipelineSpec) -> None:
    """Dtype rules run on the frame's schema alone (a zero-row batch): every mistyped column is named, none else."""
    frame = _frame(0).with_columns(pl.col("qty").cast(pl.Float64), pl.col("ts").cast(pl.String), pl.col("flag").cast(pl.Int8))
    failures = {f["column"]: f for f in run_rules(frame, schema_rules(spec, frame.columns), "engine_dtypes", spec)
                if f["rule"] == "dtype"}
    assert {c: f["observed"] for c, f in failures.items()} == {
        "qty": "Float64 (expected int)", "ts": "String (expected datetime)", "flag": "Int8 (expected bool)"}


def test_key_uniqueness_names_the_repeated_keys(spec: PipelineSpec) -> None:
    frame = cast_to_spec(_frame(0), spec)
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("dup")).otherwise(pl.col("row_id")).alias("row_id"))
    [unique] = [f for f in run_rules(frame, quality_rules(spec), "engine_keys", spec, arrow=False) if f["rule"] == "unique_key"]
    repeated = frame.filter(pl.col("row_id").is_duplicated())["row_id"]
    assert unique["column"] == "row_id" and unique["unexpected_count"] == repeated.len() == 3 + 10
    assert unique["sample_values"] == [str(v) for v in repeated.head(SAMPLES)] and unique["sample_values"][:3] == ["dup"] * 3


def test_key_uniqueness_passes_on_hashes_and_repeated_hashes_are_decided_on_the_keys(
        spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass/fail round checks text keys by their 64-bit hashes; a repeat there (even a collision) never reports
    a failure by itself: the rule runs again on the keys, which decide it and give the count and samples."""
    import pandas as pd

    import kiln.gx as engine

    clean = cast_to_spec(_frame(0), spec).unique("row_id", keep="first", maintain_order=True)
    stand_ins = engine._stand_ins(clean, quality_rules(spec), arrow=False)
    assert list(stand_ins) == [("ExpectColumnValuesToBeUnique", "row_id")]
    hashes = stand_ins[("ExpectColumnValuesToBeUnique", "row_id")]
    assert str(hashes.dtype) == "uint64" and hashes.is_unique
    assert not engine._stand_ins(clean.with_columns(pl.lit(None, pl.String).alias("row_id")), quality_rules(spec), arrow=False)

    used: list[int] = []
    real = engine._stand_ins

    def colliding(frame: pl.DataFrame, rules: list[Any], arrow: bool) -> dict[tuple[str, str], pd.Series]:
        out = {k: pd.Series([7] * len(v), dtype="uint64", name=k[1]) if k[0] == "ExpectColumnValuesToBeUnique" else v
               for k, v in real(frame, rules, arrow).items()}  # every key "collides"
        used.append(len(out))
        return out

    monkeypatch.setattr(engine, "_stand_ins", colliding)
    assert "unique_key" not in {f["rule"] for f in run_rules(clean, quality_rules(spec), "engine_quality", spec, arrow=False)}
    assert used == [1]
    broken = cast_to_spec(_frame(0), spec)
    assert _found(run_rules(broken, quality_rules(spec), "engine_quality", spec, arrow=False)) == _expected(broken)


GX_AS_SHIPPED = """
import json, sys
import great_expectations  # noqa: F401
from great_expectations.core.id_dict import IDDict
from great_expectations.execution_engine import pandas_execution_engine
from great_expectations.expectations.expectation import Expectation
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

def snapshot():
    return {"Expectation.__setattr__": Expectation.__setattr__, "Expectation.configuration": vars(Expectation)["configuration"],
            "ExpectationConfiguration.to_domain_obj": ExpectationConfiguration.to_domain_obj, "IDDict.to_id": IDDict.to_id,
            "HASH_THRESHOLD": pandas_execution_engine.HASH_THRESHOLD}

before = snapshot()
import polars as pl
from kiln.contracts import quality_rules, run_rules, schema_rules
from kiln.spec import PipelineSpec
spec = PipelineSpec.model_validate(json.loads(sys.argv[1]))
frame = pl.DataFrame({"k": ["a", "b", "b"], "x": [1.0, 2.0, 50.0], "y": [1, 0, 1]})
failures = run_rules(frame, schema_rules(spec, frame.columns), "s", spec) + run_rules(frame, quality_rules(spec), "q", spec, arrow=False)
after = snapshot()
print(json.dumps({"changed": [n for n in before if before[n] is not after[n]], "failures": sorted(f["rule"] for f in failures)}))
"""


def test_great_expectations_is_left_as_shipped() -> None:
    """A validation patches nothing in GX: its classes and module settings are the same objects before and after."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    spec = {"name": "shipped", "source": {"path": "shipped"}, "target": "y", "task": "classification",
            "features": {"passthrough": ["x"]},
            "schema": {"k": {"dtype": "str", "key": True}, "x": {"dtype": "float", "max": 10}, "y": {"dtype": "int"}}}
    out = subprocess.run([sys.executable, "-c", GX_AS_SHIPPED, json.dumps(spec)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"changed": [], "failures": ["range", "unique_key"]}


def test_gx_methods_are_gx_s_own_after_validations(spec: PipelineSpec) -> None:
    """In this process too (whatever ran before): every GX method Kiln's engine goes through is defined by GX."""
    from great_expectations.core.id_dict import IDDict
    from great_expectations.expectations.expectation import Expectation
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    run_rules(cast_to_spec(_frame(0), spec), quality_rules(spec), "engine_quality", spec, arrow=False)
    for function in (vars(Expectation)["configuration"].fget, ExpectationConfiguration.to_domain_obj, IDDict.to_id):
        assert function.__module__.startswith("great_expectations."), function
    assert "__setattr__" not in vars(Expectation)
