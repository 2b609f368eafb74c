"""The GX engine behind every data-contract check: what `run_rules` reports must be what the rows hold.

The rules run on several GX batches (whole frame, one-column batches for null-dropping rules and for key uniqueness),
some of them on worker threads with their own data sources; these tests pin the counts, percentages and samples of
each failed rule against a direct computation, also when two validations run at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest

from assets.validated import SAMPLES, cast_to_spec, quality_rules, run_rules, schema_rules
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


def test_the_configuration_memo_changes_no_result(spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import assets.validated as validate

    frame = cast_to_spec(_frame(1), spec)
    raw = _frame(1).with_columns(pl.col("score").cast(pl.String))
    memoized = (run_rules(frame, quality_rules(spec), "memo_q", spec, arrow=False),
                run_rules(raw, schema_rules(spec, raw.columns), "memo_s", spec))

    class NoMemo:
        """GX as shipped: every ``configuration`` built afresh."""

        memo = property(lambda self: None, lambda self, value: None)

    monkeypatch.setattr(validate, "_MEMO", NoMemo())
    shipped = (run_rules(frame, quality_rules(spec), "memo_q", spec, arrow=False),
               run_rules(raw, schema_rules(spec, raw.columns), "memo_s", spec))
    assert memoized == shipped
    assert memoized[0] and memoized[1]


def test_outside_a_validation_gx_expectations_behave_as_shipped(spec: PipelineSpec) -> None:
    import great_expectations as gx

    run_rules(cast_to_spec(_frame(0), spec), quality_rules(spec), "engine_quality", spec, arrow=False)
    expectation = gx.expectations.ExpectColumnValuesToBeBetween(column="amount", min_value=0, max_value=1)
    assert expectation.configuration is not expectation.configuration  # built afresh, as GX ships it
    expectation.column = "score"
    assert expectation.configuration.kwargs["column"] == "score"
    configuration = expectation.configuration
    assert configuration.to_domain_obj() is not configuration.to_domain_obj()


def test_inside_a_validation_a_configuration_s_expectation_is_rebuilt_when_it_changes(spec: PipelineSpec) -> None:
    import great_expectations as gx

    import assets.validated as validate

    run_rules(cast_to_spec(_frame(0), spec), quality_rules(spec), "engine_quality", spec, arrow=False)  # GX patched
    configuration = gx.expectations.ExpectColumnValuesToBeBetween(column="amount", min_value=0, max_value=1).configuration
    validate._MEMO.memo = {}
    try:
        first = configuration.to_domain_obj()
        assert configuration.to_domain_obj() is first
        configuration.kwargs["max_value"] = 2  # GX adds the batch id to a copy's kwargs this way
        second = configuration.to_domain_obj()
        assert second is not first and second.max_value == 2
        configuration.meta = {"kiln_rule": 3}
        assert configuration.to_domain_obj().meta == {"kiln_rule": 3}
        third = configuration.to_domain_obj()
        third.min_value = -1  # an assigned expectation is never handed out again
        assert configuration.to_domain_obj() is not third and configuration.to_domain_obj().min_value == 0
    finally:
        validate._MEMO.memo = None


def test_plain_metric_ids_are_the_ids_gx_computes(spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a validation, plain metric kwargs get their id without GX's JSON conversion: it must be GX's own id."""
    import copy

    from great_expectations.core.id_dict import IDDict

    import assets.validated as validate

    run_rules(cast_to_spec(_frame(0), spec), quality_rules(spec), "ids_warmup", spec, arrow=False)  # GX patched
    patched = IDDict.to_id
    seen: list[tuple[dict[str, Any], Any, bool]] = []

    def recording(self: Any, id_keys: Any = None, id_ignore_keys: Any = None) -> Any:
        out = patched(self, id_keys, id_ignore_keys)
        if id_keys is None and id_ignore_keys is None and type(self) is IDDict:
            seen.append((copy.deepcopy(dict(self)), out, len(self) > 1 and validate._plain(self, IDDict)))
        return out

    monkeypatch.setattr(IDDict, "to_id", recording)
    frame = cast_to_spec(_frame(1), spec)
    raw = _frame(1).with_columns(pl.col("score").cast(pl.String))
    assert run_rules(frame, quality_rules(spec), "ids_q", spec, arrow=False)
    assert run_rules(raw, schema_rules(spec, raw.columns), "ids_s", spec)
    recorded = list(seen)
    assert sum(plain for _, _, plain in recorded) > 100  # the fast path is taken, and often
    assert any(isinstance(v, list) for kwargs, _, plain in recorded if plain for v in kwargs.values())  # value sets too
    for kwargs, got, _ in recorded:  # outside a validation every id takes GX's own path
        assert IDDict(kwargs).to_id() == got, kwargs


def test_key_uniqueness_passes_on_hashes_and_repeated_hashes_are_decided_on_the_keys(
        spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass/fail round checks text keys by their 64-bit hashes; a repeat there (even a collision) never reports
    a failure by itself: the rule runs again on the keys, which decide it and give the count and samples."""
    import pandas as pd

    import assets.validated as validate

    clean = cast_to_spec(_frame(0), spec).unique("row_id", keep="first", maintain_order=True)
    stand_ins = validate._key_hashes(clean, quality_rules(spec))
    assert list(stand_ins) == ["row_id"] and str(stand_ins["row_id"]["row_id"].dtype) == "uint64"
    assert stand_ins["row_id"]["row_id"].is_unique
    assert not validate._key_hashes(clean.with_columns(pl.lit(None, pl.String).alias("row_id")), quality_rules(spec))

    used: list[int] = []
    real = validate._key_hashes

    def colliding(frame: pl.DataFrame, rules: list[Any]) -> dict[str, pd.DataFrame]:
        out = {name: pd.DataFrame({name: [7] * len(stand_in)}, dtype="uint64")  # every key "collides"
               for name, stand_in in real(frame, rules).items()}
        used.append(len(out))
        return out

    monkeypatch.setattr(validate, "_key_hashes", colliding)
    assert "unique_key" not in {f["rule"] for f in run_rules(clean, quality_rules(spec), "engine_quality", spec, arrow=False)}
    assert used == [1]
    broken = cast_to_spec(_frame(0), spec)
    assert _found(run_rules(broken, quality_rules(spec), "engine_quality", spec, arrow=False)) == _expected(broken)
