"""`<p>_new_data` on a real source folder: misnamed files are reported and never block, content changes are runs.

The sensor is evaluated as Dagster evaluates it (``evaluate_tick`` with the cursor of the previous tick); a replaced day
is then ingested by a real `raw` + `validated` run to see what each asset holds afterwards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port

GOOD_DAY = "2026-02-10"


def _spec(folder: Path, name: str, source: Path) -> Any:
    from kiln.spec import load_spec

    data = spec_data(FRAUD_SPEC)
    data["name"] = name
    data["source"].update(path=str(source))
    data["serving"]["port"] = free_port()
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def _day(day: str, seed: int = 1, rows: int = 200) -> pl.DataFrame:
    from datetime import date

    from platform_defs.simulators.fraud import generate_day

    return generate_day(date.fromisoformat(day), rows, seed, 0.0)


@pytest.fixture
def sensor_world(tmp_path: Path) -> dict[str, Any]:
    from platform_defs.definitions import build_definitions
    from resources.storage import KilnStorage

    source = tmp_path / "source"
    source.mkdir()
    spec = _spec(tmp_path, "sensed", source)
    defs = build_definitions([spec])
    storage = KilnStorage(source_root=str(tmp_path), state_root=str(tmp_path / "state"))
    sensor = next(s for s in defs.sensors or [] if s.name == "sensed_new_data")
    return {"source": source, "spec": spec, "sensor": sensor, "storage": storage, "repo": defs.get_repository_def(),
            "state": tmp_path / "state", "instance": dg.DagsterInstance.ephemeral()}


def _tick(world: dict[str, Any], cursor: str | None) -> Any:
    context = dg.build_sensor_context(instance=world["instance"], resources={"storage": world["storage"]}, cursor=cursor,
                                      repository_def=world["repo"])
    return world["sensor"].evaluate_tick(context)


def _observed_rejections(tick: Any) -> dict[str, str] | None:
    found = [e for e in tick.asset_events if isinstance(e, dg.AssetObservation) and "rejected_files" in e.metadata]
    if not found:
        return None
    table = found[-1].metadata["rejected_files"]
    assert isinstance(table, dg.TableMetadataValue)
    return {str(r.data["file"]): str(r.data["reason"]) for r in table.records}


def test_a_misnamed_file_does_not_block_a_good_one_and_is_reported(sensor_world: dict[str, Any]) -> None:
    source = sensor_world["source"]
    _day(GOOD_DAY).write_parquet(source / f"{GOOD_DAY}.parquet")
    for bad in ("20260210.parquet", "latest.parquet", "2026-02-30.parquet", "2026-01-18.fixed.parquet"):
        _day(GOOD_DAY).write_parquet(source / bad)
    first = _tick(sensor_world, None)
    assert [(r.partition_key, r.tags["kiln/source_file"]) for r in first.run_requests] == [(GOOD_DAY, f"{GOOD_DAY}.parquet")]
    reasons = _observed_rejections(first)
    assert reasons is not None and set(reasons) == {"20260210.parquet", "latest.parquet", "2026-02-30.parquet",
                                                     "2026-01-18.fixed.parquet"}
    assert "2026-02-10.parquet" in reasons["20260210.parquet"] and "not a calendar date" in reasons["2026-02-30.parquet"]
    issues = json.loads((sensor_world["state"] / "sources" / "sensed" / "issues.json").read_text())
    assert {r["file"] for r in issues["rejected"]} == set(reasons)
    # Nothing new: the tick says why the misnamed files wait, and records them only once.
    again = _tick(sensor_world, first.cursor)
    assert not again.run_requests and _observed_rejections(again) is None
    assert "4 file(s) not ingested" in again.skip_message and "20260210.parquet" in again.skip_message
    # Renamed as the reason says: it is ingested, and the record of rejected files shrinks.
    (source / "20260210.parquet").unlink()
    _day("2026-02-11").write_parquet(source / "2026-02-11.parquet")
    third = _tick(sensor_world, again.cursor)
    assert [r.partition_key for r in third.run_requests] == ["2026-02-11"]
    assert set(_observed_rejections(third) or {}) == {"latest.parquet", "2026-02-30.parquet", "2026-01-18.fixed.parquet"}


def test_upper_case_and_pq_extensions_are_ingested(sensor_world: dict[str, Any]) -> None:
    source = sensor_world["source"]
    _day("2026-02-12").write_parquet(source / "2026-02-12.PARQUET")
    _day("2026-02-13").write_parquet(source / "2026-02-13.pq")
    tick = _tick(sensor_world, None)
    assert sorted(r.partition_key for r in tick.run_requests) == ["2026-02-12", "2026-02-13"]
    assert _observed_rejections(tick) is None


def test_a_same_mtime_replacement_is_a_new_run_a_touch_is_not(sensor_world: dict[str, Any]) -> None:
    day = sensor_world["source"] / f"{GOOD_DAY}.parquet"
    _day(GOOD_DAY, seed=1).write_parquet(day)
    first = _tick(sensor_world, None)
    assert len(first.run_requests) == 1
    mtime = day.stat().st_mtime
    _day(GOOD_DAY, seed=2).write_parquet(day)
    os.utime(day, (mtime, mtime))  # the old file's mtime, as `cp -p` or a sync tool leaves it
    second = _tick(sensor_world, first.cursor)
    assert [r.partition_key for r in second.run_requests] == [GOOD_DAY]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    replaced = [e for e in second.asset_events if isinstance(e, dg.AssetObservation) and e.partition == GOOD_DAY]
    assert replaced and replaced[0].metadata["replaces"].value == "an ingested day"
    os.utime(day, (mtime + 60, mtime + 60))  # touched, same content
    third = _tick(sensor_world, second.cursor)
    assert not third.run_requests and third.skip_message == "no new source files"


def test_an_old_mtime_cursor_does_not_reingest_every_file(sensor_world: dict[str, Any]) -> None:
    source = sensor_world["source"]
    for day in ("2026-02-10", "2026-02-11"):
        _day(day).write_parquet(source / f"{day}.parquet")
    old = json.dumps({p.name: p.stat().st_mtime for p in source.glob("*.parquet")})  # what earlier versions stored
    _day("2026-02-12").write_parquet(source / "2026-02-12.parquet")
    tick = _tick(sensor_world, old)
    assert [r.partition_key for r in tick.run_requests] == ["2026-02-12"]
    assert not _tick(sensor_world, tick.cursor).run_requests


# ------------------------------------------------------------------------------------ replacing an ingested day


@pytest.fixture(scope="module")
def ingested(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest
    from platform_defs.profiles import local_paths

    spec_dir = tmp_path_factory.mktemp("replace-pipelines")
    source = local_paths()["sources"] / "replaced"
    source.mkdir(parents=True, exist_ok=True)
    spec = _spec(spec_dir, "replaced", source)
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    try:
        defs = build_definitions([spec])
        instance = dg.DagsterInstance.get()
        _day(GOOD_DAY, seed=1, rows=300).write_parquet(source / f"{GOOD_DAY}.parquet")
        assert ingest(defs, spec, [GOOD_DAY], instance, progress=lambda _: None)[0].success
        yield {"spec": spec, "defs": defs, "instance": instance, "source": source,
               "stored": local_paths()["storage"] / "replaced"}
    finally:
        os.environ.pop("KILN_PIPELINES_DIR", None)


def _stored_rows(world: dict[str, Any], stage: str) -> int:
    return pl.read_parquet(world["stored"] / stage / f"{GOOD_DAY}.parquet").height


def test_a_replacement_that_fails_the_schema_check_leaves_both_raw_and_validated_old(ingested: dict[str, Any]) -> None:
    from platform_defs.lifecycle import ingest

    assert _stored_rows(ingested, "raw") == _stored_rows(ingested, "validated") == 300
    _day(GOOD_DAY, seed=3, rows=120).drop("amount").write_parquet(ingested["source"] / f"{GOOD_DAY}.parquet")
    result = ingest(ingested["defs"], ingested["spec"], [GOOD_DAY], ingested["instance"], progress=lambda _: None)[0]
    contract = [e for e in result.get_asset_check_evaluations() if e.check_name == "schema_contract"]
    assert contract and not contract[-1].passed
    assert _stored_rows(ingested, "validated") == 300  # the blocking check kept validated
    assert _stored_rows(ingested, "raw") == 300  # and raw: never the new raw beside the old validated


def test_kiln_status_lists_the_files_the_sensor_did_not_ingest(ingested: dict[str, Any]) -> None:
    from platform_defs.cli import status_rows

    (ingested["source"] / "20260211.parquet").write_bytes((ingested["source"] / f"{GOOD_DAY}.parquet").read_bytes())
    sensor = next(s for s in ingested["defs"].sensors or [] if s.name == "replaced_new_data")
    context = dg.build_sensor_context(instance=ingested["instance"], resources={"storage": ingested["defs"].resources["storage"]},
                                      repository_def=ingested["defs"].get_repository_def())
    tick = sensor.evaluate_tick(context)
    assert [r.partition_key for r in tick.run_requests] == [GOOD_DAY]  # the misnamed file did not stop the good one
    row = next(r for r in status_rows() if r["pipeline"] == "replaced")
    assert [i["file"] for i in row["source_issues"]] == ["20260211.parquet"]
    assert "2026-02-11.parquet" in row["source_issues"][0]["reason"]


def test_a_pq_file_is_ingested_by_a_real_run(ingested: dict[str, Any]) -> None:
    from platform_defs.lifecycle import ingest

    day = "2026-02-13"
    _day(day, seed=4, rows=80).write_parquet(ingested["source"] / f"{day}.pq")
    result = ingest(ingested["defs"], ingested["spec"], [day], ingested["instance"], progress=lambda _: None)[0]
    assert result.success
    assert pl.read_parquet(ingested["stored"] / "validated" / f"{day}.parquet").height == 80


def test_an_unpartitioned_source_runs_once_per_content_change(tmp_path: Path) -> None:
    from platform_defs.definitions import build_definitions
    from resources.storage import KilnStorage

    source = tmp_path / "source"
    source.mkdir()
    spec = _spec(tmp_path, "whole", source)
    spec = spec.model_copy(update={"source": spec.source.model_copy(update={"partitions": "none"})})
    defs = build_definitions([spec])
    world = {"sensor": next(s for s in defs.sensors or [] if s.name == "whole_new_data"), "repo": defs.get_repository_def(),
             "storage": KilnStorage(source_root=str(tmp_path), state_root=str(tmp_path / "state")),
             "instance": dg.DagsterInstance.ephemeral()}
    _day(GOOD_DAY).write_parquet(source / "part-1.parquet")
    (source / "notes.txt").write_text("not data")
    first = _tick(world, None)
    assert len(first.run_requests) == 1 and first.run_requests[0].partition_key is None
    assert set(_observed_rejections(first) or {}) == {"notes.txt"}
    again = _tick(world, first.cursor)
    assert not again.run_requests and "notes.txt" in again.skip_message
    _day(GOOD_DAY, seed=9).write_parquet(source / "part-1.parquet")
    assert len(_tick(world, again.cursor).run_requests) == 1
