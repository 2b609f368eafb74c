"""The bad-input gauntlet: each bad source file goes through the real raw/validated assets and their GX checks.

Two pipelines built from the fraud spec, each with a trained champion and a live `bentoml serve` endpoint:
``cards`` reads CSV and quarantines bad rows up to 5%; ``cardspq`` reads parquet and fails a partition on any bad
row. For every case: the partition's `validated` is not materialized (or only the good rows, within the quarantine
limit), the check's message names the column and rule, the champion alias does not move and the endpoint keeps
serving the same version. A clean partition then still flows end to end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port

TRAIN_DAYS = 2
ROWS = 1500
START = date(2026, 1, 1)


def _spec_file(folder: Path, name: str, fmt: str, validation: dict[str, Any]) -> Path:
    data = spec_data(FRAUD_SPEC)
    data.update(name=name, validation=validation)
    data["source"].update(path=name, format=fmt)
    data["serving"]["port"] = free_port()
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources

    spec_dir = tmp_path_factory.mktemp("bad-input-pipelines")
    specs = {
        "cards": load_spec(_spec_file(spec_dir, "cards", "csv", {"on_bad_rows": "quarantine", "max_bad_row_share": 0.05,
                                                                   "target": {"max_positive_rate": 0.5}})),
        "cardspq": load_spec(_spec_file(spec_dir, "cardspq", "parquet", {"on_bad_rows": "fail"})),
    }
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    defs = build_definitions(list(specs.values()))
    instance = dg.DagsterInstance.get()
    serving = resources("local")["serving"]
    folders = {}
    try:
        for name, spec in specs.items():
            folder = folders[name] = local_paths()["sources"] / spec.source.path
            simulate(spec, folder, TRAIN_DAYS, ROWS, seed=5, start=START)
            assert all(r.success for r in ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None))
            assert retrain(defs, spec, instance, progress=lambda _: None).success
        yield {"specs": specs, "defs": defs, "instance": instance, "folders": folders, "serving": serving,
               "mlflow": resources("local")["mlflow"], "storage": local_paths()["storage"], "days": iter(range(100))}
    finally:
        for name in specs:
            serving.shutdown(name)  # router, backends and their handoff folders
        os.environ.pop("KILN_PIPELINES_DIR", None)


def _next_day(world: dict[str, Any]) -> date:
    """A day no earlier case has used: each bad file lands as its own new partition."""
    return START + timedelta(days=TRAIN_DAYS + 1 + next(world["days"]))


def _good_frame(world: dict[str, Any], name: str, seed: int = 11, rows: int = 400, day: date = START) -> pl.DataFrame:
    """Clean rows of ``day`` (timestamps in that day, keys of that day)."""
    from platform_defs.simulators.fraud import generate_day

    return generate_day(day, rows, seed, 0.0)


def _write_csv(frame: pl.DataFrame) -> bytes:
    return frame.write_csv().encode()


def _feed(world: dict[str, Any], name: str, content: bytes, on: date | None = None) -> tuple[str, dg.ExecuteInProcessResult]:
    """Write the bytes as the source file of day ``on`` (default: a new day) of the pipeline and ingest that partition."""
    from platform_defs.lifecycle import ingest

    spec = world["specs"][name]
    day = (on or _next_day(world)).isoformat()
    (world["folders"][name] / f"{day}.{spec.source.format}").write_bytes(content)
    result = ingest(world["defs"], spec, [day], world["instance"], progress=lambda _: None)[0]
    return day, result


def _evaluation(result: dg.ExecuteInProcessResult, asset: str, check: str) -> Any:
    found = [e for e in result.get_asset_check_evaluations() if e.check_name == check and e.asset_key.path[-1] == asset]
    assert found, f"check {asset}:{check} did not run"
    return found[-1]


def _champion(world: dict[str, Any], name: str) -> str:
    return str(world["mlflow"].client().get_model_version_by_alias(name, "champion").version)


def _served_version(world: dict[str, Any], name: str, kiln_home: Path) -> str:
    import json

    rows = json.loads((kiln_home / "state" / "reference" / name / "sample_rows.json").read_text())[:2]
    response = httpx.post(f"{world['serving'].state(name)['url']}/predict", json={"rows": rows}, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def _materialized(result: dg.ExecuteInProcessResult, stage: str) -> bool:
    return any(e.asset_key.path[-1] == stage for e in result.get_asset_materialization_events())


def _with(frame: pl.DataFrame, column: str, values: list[Any] | Any, rows: int | None = None) -> pl.DataFrame:
    """The frame with ``column`` replaced: all rows (rows=None) or the first ``rows`` rows, as text."""
    text = frame.with_columns(pl.col(column).cast(pl.String))
    if rows is None:
        return text.with_columns(pl.lit(values, dtype=pl.String).alias(column))
    return text.with_columns(
        pl.when(pl.int_range(pl.len()) < rows).then(pl.lit(values, dtype=pl.String)).otherwise(pl.col(column)).alias(column)
    )


def _parquet(frame: pl.DataFrame) -> bytes:
    import io

    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


# (case id, pipeline, bad file content builder, failing check (asset, name), words the message must contain)
Case = tuple[str, str, Callable[[pl.DataFrame], bytes], tuple[str, str], list[str]]
CASES: list[Case] = [
    ("missing_column", "cards", lambda f: _write_csv(f.drop("amount")), ("raw", "schema_contract"), ["amount", "columns_match"]),
    ("renamed_column", "cards", lambda f: _write_csv(f.rename({"amount": "amt"})), ("raw", "schema_contract"),
     ["amount", "amt", "columns_match"]),
    ("extra_column", "cards", lambda f: _write_csv(f.with_columns(pl.lit(1).alias("promo_code"))), ("raw", "schema_contract"),
     ["promo_code", "columns_match"]),
    ("text_in_numeric_column", "cards", lambda f: _write_csv(_with(f, "amount", "twelve dollars")), ("raw", "schema_contract"),
     ["amount", "dtype", "twelve dollars"]),
    ("all_null_required_column", "cards", lambda f: _write_csv(_with(f, "country", None)), ("raw", "schema_contract"),
     ["country", "not_null"]),
    ("zero_byte_file", "cards", lambda f: b"", ("raw", "schema_contract"), ["(file)", "readable", "0 bytes"]),
    ("header_only_file", "cards", lambda f: _write_csv(f.head(0)), ("raw", "schema_contract"), ["table", "row_count"]),
    ("truncated_parquet", "cardspq", lambda f: _parquet(f)[: len(_parquet(f)) // 2], ("raw", "schema_contract"),
     ["(file)", "readable", "parquet"]),
    ("duplicate_keys", "cards", lambda f: _write_csv(pl.concat([f, f.head(200)])), ("validated", "quality_contract"),
     ["txn_id", "unique_key", "bad_row_share"]),
    ("out_of_range_values", "cardspq", lambda f: _parquet(f.with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(-50.0).otherwise(pl.col("amount")).alias("amount"))),
     ("validated", "quality_contract"), ["amount", "range", "-50"]),
    ("unknown_category", "cards", lambda f: _write_csv(_with(f, "country", "XX", rows=120)), ("validated", "quality_contract"),
     ["country", "allowed_values", "XX"]),
    ("unparseable_timestamps", "cards", lambda f: _write_csv(_with(f, "ts", "31/02/2026 25:61", rows=7)), ("raw", "schema_contract"),
     ["ts", "dtype", "31/02/2026 25:61"]),
    ("non_utf8_bytes", "cards", lambda f: _write_csv(f).replace(b"grocery", b"groc\xe9ry\xff", 1), ("raw", "schema_contract"),
     ["(file)", "readable", "UTF-8"]),
    ("mixed_types_in_one_column", "cards", lambda f: _write_csv(_with(f, "txns_last_24h", "n/a", rows=5)), ("raw", "schema_contract"),
     ["txns_last_24h", "dtype", "n/a"]),
    ("every_row_labelled_fraud", "cards", lambda f: _write_csv(f.with_columns(pl.lit(1).alias("is_fraud"))),
     ("validated", "quality_contract"), ["is_fraud", "target_rate", "positive rate 100.00%"]),
    ("timestamps_of_another_day", "cardspq", lambda f: _parquet(f.with_columns(pl.col("ts").dt.offset_by("30y"))),
     ("validated", "quality_contract"), ["ts", "partition_day", "2056-"]),
]


@pytest.mark.parametrize(("case", "pipeline", "build", "check", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_stopped_and_the_champion_keeps_serving(world: dict[str, Any], kiln_home: Path, case: str, pipeline: str,
                                                            build: Callable[[pl.DataFrame], bytes], check: tuple[str, str],
                                                            words: list[str]) -> None:
    champion = _champion(world, pipeline)
    on = _next_day(world)
    day, result = _feed(world, pipeline, build(_good_frame(world, pipeline, day=on)), on)
    assert not result.success, f"{case}: the bad partition {day} passed"
    evaluation = _evaluation(result, *check)
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    summary = evaluation.metadata["summary"].value
    for word in words:
        assert word in summary, f"{case}: {word!r} not in {summary!r}"
    assert evaluation.metadata["partition"].value == day
    assert day in evaluation.metadata["file"].value
    failures = evaluation.metadata["failures"].value
    assert all({"rule", "column", "unexpected_count", "unexpected_percent", "sample_values"} <= set(f) for f in failures)
    assert not _materialized(result, "validated")
    assert not (world["storage"] / pipeline / "validated" / f"{day}.parquet").exists()
    assert _champion(world, pipeline) == champion
    assert _served_version(world, pipeline, kiln_home) == champion


def test_few_bad_rows_are_quarantined_with_reasons_within_the_limit(world: dict[str, Any], kiln_home: Path) -> None:
    frame = _good_frame(world, "cards", seed=12, day=(on := _next_day(world)))
    bad = frame.with_columns(pl.when(pl.int_range(pl.len()) < 6).then(99999.0).otherwise(pl.col("amount")).alias("amount"))
    day, result = _feed(world, "cards", _write_csv(bad), on)
    assert result.success
    evaluation = _evaluation(result, "validated", "quality_contract")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN  # reported, not blocking
    assert "amount" in evaluation.metadata["summary"].value and "range" in evaluation.metadata["summary"].value
    validated = pl.read_parquet(world["storage"] / "cards" / "validated" / f"{day}.parquet")
    quarantine = pl.read_parquet(world["storage"] / "cards" / "quarantine" / f"{day}.parquet")
    assert validated.height == frame.height - 6 and quarantine.height == 6
    assert set(quarantine["_reasons"].to_list()) == {"amount.range"}
    assert quarantine["amount"].to_list() == [99999.0] * 6


def test_a_clean_partition_still_flows_end_to_end(world: dict[str, Any], kiln_home: Path) -> None:
    from platform_defs.lifecycle import retrain

    for pipeline in ("cards", "cardspq"):
        spec = world["specs"][pipeline]
        frame = _good_frame(world, pipeline, seed=13, day=(on := _next_day(world)))
        day, result = _feed(world, pipeline, _write_csv(frame) if spec.source.format == "csv" else _parquet(frame), on)
        assert result.success, pipeline
        assert _evaluation(result, "raw", "schema_contract").passed
        assert (world["storage"] / pipeline / "validated" / f"{day}.parquet").exists()
        again = retrain(world["defs"], spec, world["instance"], progress=lambda _: None)
        assert again.success
        features = [e for e in again.get_asset_materialization_events() if e.asset_key.path[-1] == "features"][-1]
        stored = sorted(p.stem for p in (world["storage"] / pipeline / "validated").glob("*.parquet"))
        assert features.step_materialization_data.materialization.metadata["partitions"].value == len(stored)
        assert day in stored
        served = _champion(world, pipeline)
        assert _served_version(world, pipeline, kiln_home) == served


def test_schema_change_is_flagged_between_materializations(world: dict[str, Any]) -> None:
    frame = _good_frame(world, "cards", seed=14, day=(on := _next_day(world)))
    _, result = _feed(world, "cards", _write_csv(frame.with_columns(pl.lit("none").alias("coupon"))), on)
    change = _evaluation(result, "raw", "schema_change")
    assert not change.passed and change.severity == dg.AssetCheckSeverity.WARN
    assert "coupon" in change.metadata["added"].value
    # The extra column breaks the blocking schema contract: the file is refused, not stored as raw (never a mix of days).
    assert not _evaluation(result, "raw", "schema_contract").passed
    assert not [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "raw"]


def test_a_warn_rule_reports_without_blocking(world: dict[str, Any], tmp_path: Path) -> None:
    from kiln.contracts import cast_to_spec, quality_rules, run_rules, split_rows

    spec = world["specs"]["cards"].model_copy(update={"validation": world["specs"]["cards"].validation.model_copy(
        update={"severity": {"customer_age.range": "warn"}})})
    frame = cast_to_spec(_good_frame(world, "cards", seed=15), spec).with_columns(
        pl.when(pl.int_range(pl.len()) < 50).then(150).otherwise(pl.col("customer_age")).alias("customer_age"))
    failures = run_rules(frame, quality_rules(spec), "warn_rule", spec, arrow=False)
    assert [(f["column"], f["rule"], f["severity"], f["unexpected_count"]) for f in failures] == [("customer_age", "range", "warn", 50)]
    good, bad = split_rows(frame, spec)
    assert bad.height == 0 and good.height == frame.height  # a warn rule never rejects rows


def test_null_fraction_and_row_count_bounds_are_quality_rules(world: dict[str, Any]) -> None:
    from kiln.contracts import cast_to_spec, quality_rules, run_rules

    data = world["specs"]["cards"].model_dump(by_alias=True)
    data["schema"]["customer_age"]["max_null_fraction"] = 0.1
    data["validation"]["max_rows"] = 300
    spec = type(world["specs"]["cards"]).model_validate(data)
    frame = cast_to_spec(_good_frame(world, "cards", seed=16), spec).with_columns(
        pl.when(pl.int_range(pl.len()) < 100).then(None).otherwise(pl.col("customer_age")).alias("customer_age"))
    failures = {(f["column"], f["rule"]): f for f in run_rules(frame, quality_rules(spec), "bounds", spec, arrow=False)}
    assert set(failures) == {(None, "row_count"), ("customer_age", "null_fraction")}
    assert failures[("customer_age", "null_fraction")]["unexpected_count"] >= 100


def test_real_world_parquet_dtypes_are_widened_and_reported(world: dict[str, Any]) -> None:
    """Dictionary-encoded text, nanosecond timestamps (pandas' default) and whole-number amounts pass the schema
    contract of a parquet pipeline, reach `validated` typed as the spec says, and the check says what was widened."""
    frame = _good_frame(world, "cardspq", seed=17, day=(on := _next_day(world)))
    real_world = frame.with_columns(pl.col("country").cast(pl.Categorical), pl.col("ts").cast(pl.Datetime("ns")),
                                    pl.col("amount").round(0).cast(pl.Int64))
    day, result = _feed(world, "cardspq", _parquet(real_world), on)
    assert result.success, day
    contract = _evaluation(result, "raw", "schema_contract")
    assert contract.passed
    assert contract.metadata["widened"].value == {"ts": "Datetime(ns) -> Datetime(us)", "amount": "Int64 -> Float64",
                                                   "country": "Categorical -> String"}
    validated = pl.read_parquet(world["storage"] / "cardspq" / "validated" / f"{day}.parquet")
    assert validated.height == frame.height
    assert (validated.schema["country"], validated.schema["ts"], validated.schema["amount"]) == (pl.String, pl.Datetime("us"), pl.Float64)
    assert validated["amount"].to_list() == real_world["amount"].cast(pl.Float64).to_list()


def _quarantined(world: dict[str, Any], name: str, day: str) -> pl.DataFrame:
    return pl.read_parquet(world["storage"] / name / "quarantine" / f"{day}.parquet")


def _assert_counts_add_up(world: dict[str, Any], name: str, day: str, evaluation: Any) -> pl.DataFrame:
    """The check's counts are the rows in `<p>/quarantine`: in total, and per column rule."""
    quarantine = _quarantined(world, name, day)
    assert evaluation.metadata["rows_quarantined"].value == quarantine.height
    by_rule = quarantine.select(pl.col("_reasons").str.split("; ")).explode("_reasons")["_reasons"].value_counts()
    expected = {r["_reasons"]: r["count"] for r in by_rule.to_dicts()}
    assert evaluation.metadata["quarantined_by_rule"].value == expected
    reported = {f"{f['column']}.{f['rule']}": f["unexpected_count"] for f in evaluation.metadata["failures"].value
                if f["rule"] not in ("bad_row_share", "target_rate", "row_count", "null_fraction")}
    assert reported == expected
    return quarantine


def test_yesterdays_file_under_a_new_date_is_refused(world: dict[str, Any], kiln_home: Path) -> None:
    champion = _champion(world, "cards")
    yesterday = _next_day(world)
    first, result = _feed(world, "cards", _write_csv(_good_frame(world, "cards", seed=18, day=yesterday)), yesterday)
    assert result.success
    copied = (world["folders"]["cards"] / f"{first}.csv").read_bytes()
    day, result = _feed(world, "cards", copied, yesterday + timedelta(days=1))
    assert not result.success
    evaluation = _evaluation(result, "validated", "quality_contract")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    summary = evaluation.metadata["summary"].value
    for word in ("txn_id", "key_in_other_partition", "ts", "partition_day", "bad_row_share", "400 rows"):
        assert word in summary, f"{word!r} not in {summary!r}"
    assert not (world["storage"] / "cards" / "validated" / f"{day}.parquet").exists()
    _assert_counts_add_up(world, "cards", day, evaluation)
    assert _champion(world, "cards") == champion


def test_a_few_keys_of_an_earlier_day_are_quarantined_and_never_reach_validated(world: dict[str, Any]) -> None:
    earlier = _next_day(world)
    _, result = _feed(world, "cards", _write_csv(_good_frame(world, "cards", seed=19, day=earlier)), earlier)
    assert result.success
    on = _next_day(world)
    fresh = _good_frame(world, "cards", seed=20, day=on)
    # 10 of the earlier day's transactions again, re-dated into this day (only their keys give them away)
    replayed = _good_frame(world, "cards", seed=19, day=earlier).head(10).with_columns(pl.col("ts") + timedelta(days=(on - earlier).days))
    day, result = _feed(world, "cards", _write_csv(pl.concat([fresh.head(390), replayed])), on)
    assert result.success
    evaluation = _evaluation(result, "validated", "quality_contract")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    quarantine = _assert_counts_add_up(world, "cards", day, evaluation)
    assert set(quarantine["_reasons"]) == {"txn_id.key_in_other_partition"} and quarantine.height == 10
    validated = pl.read_parquet(world["storage"] / "cards" / "validated" / f"{day}.parquet")
    stored_before = pl.read_parquet(world["storage"] / "cards" / "validated" / f"{earlier.isoformat()}.parquet")
    assert validated.height == 390 and not validated["txn_id"].is_in(stored_before["txn_id"].implode()).any()
    # feeding the same day again replaces its own keys: nothing is a duplicate of itself
    again = _feed(world, "cards", _write_csv(pl.concat([fresh.head(390), replayed])), on)[1]
    assert _quarantined(world, "cards", day).height == 10 and again.success


def test_timestamps_thirty_years_off_are_quarantined_as_partition_day(world: dict[str, Any]) -> None:
    on = _next_day(world)
    frame = _good_frame(world, "cards", seed=21, day=on)
    shifted = frame.with_columns(pl.when(pl.int_range(pl.len()) < 8).then(pl.col("ts").dt.offset_by("30y")).otherwise(pl.col("ts")))
    day, result = _feed(world, "cards", _write_csv(shifted), on)
    assert result.success
    evaluation = _evaluation(result, "validated", "quality_contract")
    assert "ts" in evaluation.metadata["summary"].value and "partition_day" in evaluation.metadata["summary"].value
    quarantine = _assert_counts_add_up(world, "cards", day, evaluation)
    assert set(quarantine["_reasons"]) == {"ts.partition_day"} and quarantine.height == 8
    assert pl.read_parquet(world["storage"] / "cards" / "validated" / f"{day}.parquet")["ts"].dt.year().unique().to_list() == [on.year]


def test_two_percent_nulls_in_a_required_column_are_reported_as_quarantined(world: dict[str, Any]) -> None:
    on = _next_day(world)
    day, result = _feed(world, "cards", _write_csv(_with(_good_frame(world, "cards", seed=22, day=on), "country", None, rows=8)), on)
    assert result.success
    assert _evaluation(result, "raw", "schema_contract").passed  # within the quarantine limit: not the raw check's to stop
    evaluation = _evaluation(result, "validated", "quality_contract")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "column 'country': rule not_null failed [warn] (8 rows, 2.0%)" in evaluation.metadata["summary"].value
    assert _assert_counts_add_up(world, "cards", day, evaluation).height == 8


def test_nan_and_infinite_amounts_are_counted_as_quarantined(world: dict[str, Any]) -> None:
    on = _next_day(world)
    frame = _good_frame(world, "cards", seed=23, day=on)
    odd = [float("nan")] * 4 + [float("inf")] * 4 + [float("-inf")] * 4
    amounts = pl.Series("amount", odd + frame["amount"].to_list()[len(odd):])
    day, result = _feed(world, "cards", _write_csv(frame.with_columns(amounts)), on)
    assert result.success
    evaluation = _evaluation(result, "validated", "quality_contract")
    quarantine = _assert_counts_add_up(world, "cards", day, evaluation)
    assert quarantine.height == 12
    assert evaluation.metadata["quarantined_by_rule"].value == {"amount.not_null": 4, "amount.range": 8}


def _feed_days(world: dict[str, Any], name: str, frames: dict[date, pl.DataFrame]) -> list[Any]:
    """Write several days' files and ingest them together (consecutive days: one run over their range)."""
    from platform_defs.lifecycle import ingest

    spec = world["specs"][name]
    for day, frame in frames.items():
        content = _write_csv(frame) if spec.source.format == "csv" else _parquet(frame)
        (world["folders"][name] / f"{day.isoformat()}.{spec.source.format}").write_bytes(content)
    return ingest(world["defs"], spec, [d.isoformat() for d in frames], world["instance"], progress=lambda _: None)


def _range_runs(world: dict[str, Any], first: date, last: date) -> list[Any]:
    """The instance's runs over exactly the range ``first..last``."""
    runs = world["instance"].get_runs(filters=dg.RunsFilter(tags={"dagster/asset_partition_range_start": first.isoformat(),
                                                                  "dagster/asset_partition_range_end": last.isoformat()}))
    return list(runs)


def test_a_range_run_with_one_bad_day_stores_nothing_then_lands_the_good_days_one_by_one(world: dict[str, Any]) -> None:
    days = [_next_day(world) for _ in range(3)]
    assert days[2] - days[0] == timedelta(days=2)  # consecutive: ingested as one run over their range first
    frames = {d: _good_frame(world, "cardspq", seed=30 + i, day=d) for i, d in enumerate(days)}
    frames[days[1]] = frames[days[1]].drop("amount")  # the middle day breaks the schema contract
    results = _feed_days(world, "cardspq", frames)
    (batch,) = _range_runs(world, days[0], days[-1])
    assert batch.status == dg.DagsterRunStatus.FAILURE
    # then one run per day: the good days are stored, the bad one is reported on its own
    assert [r.success for r in results] == [True, False, True]
    assert [r.dagster_run.tags.get("dagster/partition") for r in results] == [d.isoformat() for d in days]
    bad = _evaluation(results[1], "raw", "schema_contract")
    assert "amount" in bad.metadata["summary"].value and bad.metadata["partition"].value == days[1].isoformat()
    stored = {p.stem for p in (world["storage"] / "cardspq" / "validated").glob("*.parquet")}
    assert {days[0].isoformat(), days[2].isoformat()} <= stored and days[1].isoformat() not in stored
    assert days[1].isoformat() not in {p.stem for p in (world["storage"] / "cardspq" / "raw").glob("*.parquet")}


def test_a_key_repeated_across_two_days_of_one_range_run_is_quarantined(world: dict[str, Any]) -> None:
    first, second = _next_day(world), _next_day(world)
    one = _good_frame(world, "cards", seed=40, day=first)
    replayed = one.head(5).with_columns(pl.col("ts") + timedelta(days=1))  # 5 of the first day's transactions, re-dated
    two = pl.concat([_good_frame(world, "cards", seed=41, day=second).head(395), replayed])
    (result,) = _feed_days(world, "cards", {first: one, second: two})
    assert result.success and result.dagster_run.tags["dagster/asset_partition_range_start"] == first.isoformat()
    quarantine = _quarantined(world, "cards", second.isoformat())
    assert quarantine.height == 5 and set(quarantine["_reasons"]) == {"txn_id.key_in_other_partition"}
    assert _quarantined(world, "cards", first.isoformat()).height == 0
    evaluation = _evaluation(result, "validated", "quality_contract")
    assert evaluation.metadata["rows_quarantined"].value == 5
    assert evaluation.metadata["failing_partitions"].value == second.isoformat()
    validated = pl.read_parquet(world["storage"] / "cards" / "validated" / f"{second.isoformat()}.parquet")
    assert validated.height == 395 and not validated["txn_id"].is_in(one["txn_id"].implode()).any()


def test_replacing_a_validated_day_with_a_file_that_fails_quality_keeps_both_old(world: dict[str, Any], kiln_home: Path) -> None:
    """A day already in `validated`, replaced by a file that passes the schema but fails the quality contract: raw and
    validated both keep the old file (never raw new and validated old), and the raw check says why."""
    champion = _champion(world, "cardspq")
    on = _next_day(world)
    good = _good_frame(world, "cardspq", seed=50, day=on)
    day, result = _feed(world, "cardspq", _parquet(good), on)
    assert result.success
    raw_before = pl.read_parquet(world["storage"] / "cardspq" / "raw" / f"{day}.parquet")
    bad = good.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(-5.0).otherwise(pl.col("amount")).alias("amount"))
    _, replaced = _feed(world, "cardspq", _parquet(bad), on)
    assert not replaced.success
    evaluation = _evaluation(replaced, "raw", "replacement_contract")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert "amount" in evaluation.metadata["summary"].value and "range" in evaluation.metadata["summary"].value
    assert evaluation.metadata["replaced_partitions"].value == day
    assert not _materialized(replaced, "raw") and not _materialized(replaced, "validated")
    assert pl.read_parquet(world["storage"] / "cardspq" / "raw" / f"{day}.parquet").equals(raw_before)
    assert pl.read_parquet(world["storage"] / "cardspq" / "validated" / f"{day}.parquet")["amount"].min() >= 0
    assert _champion(world, "cardspq") == champion
    # a good replacement of the same day passes the replacement check and moves both
    fixed = good.with_columns((pl.col("amount") + 1.0).alias("amount"))
    _, again = _feed(world, "cardspq", _parquet(fixed), on)
    assert again.success and _evaluation(again, "raw", "replacement_contract").passed
    assert pl.read_parquet(world["storage"] / "cardspq" / "validated" / f"{day}.parquet")["amount"].to_list() == fixed["amount"].to_list()
