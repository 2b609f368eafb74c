"""`kiln demo`, `kiln status` and `kiln stop` as a user sees them, on a small pipeline built from the fraud spec.

The demo runs for real (Dagster runs, GX checks, LightGBM, `bentoml serve`) on two days of source data, the second
with three negative amounts: its line says FAILED and names the rule, column, count and samples, the first day
trains and serves. `kiln status` then has to fit a 60-column terminal, and `kiln stop` stops that endpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port

NAME = "democli"
ROWS = 1500
GOOD_DAY, BAD_DAY = "2026-01-01", "2026-01-02"


@pytest.fixture(scope="module")
def demo(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import polars as pl

    from kiln.spec import load_spec
    from platform_defs.cli import main
    from platform_defs.lifecycle import simulate
    from platform_defs.profiles import local_paths, resources
    from platform_defs.simulators.fraud import generate_day

    spec_dir = tmp_path_factory.mktemp("demo-pipelines")
    data = spec_data(FRAUD_SPEC)
    data.update(name=NAME, validation={"on_bad_rows": "fail"})
    data["source"]["path"] = NAME
    data["trainer"]["params"]["num_boost_round"] = 30
    data["serving"].update(port=free_port(), workers=1)
    (spec_dir / f"{NAME}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    spec = load_spec(spec_dir / f"{NAME}.yaml")
    folder = local_paths()["sources"] / spec.source.path
    simulate(spec, folder, 1, ROWS, seed=3, start=date.fromisoformat(GOOD_DAY))
    bad = generate_day(date.fromisoformat(BAD_DAY), ROWS, 4, 0.0)
    bad.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(-50.0).otherwise(pl.col("amount")).alias("amount")).write_parquet(
        folder / f"{BAD_DAY}.parquet")
    out = io.StringIO()
    serving = resources("local")["serving"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["demo", "--pipeline", NAME, "--days", "2", "--rows-per-day", str(ROWS)])
        yield {"code": code, "out": out.getvalue(), "spec": spec, "serving": serving}
    finally:
        serving.shutdown(NAME)
        os.environ.pop("KILN_PIPELINES_DIR", None)


def _step_line(out: str, outcome: str, stage: str, partition: str | None = None) -> str:
    suffix = rf"  \[{partition}\]" if partition else ""
    found = re.findall(rf"^  {outcome}\s+\d+\.\ds  {NAME}/{stage}{suffix}$", out, flags=re.MULTILINE)
    assert len(found) == 1, f"no single '{outcome} {stage} {partition}' step line in:\n{out}"
    return str(found[0])


def test_demo_prints_one_line_per_step_and_the_failing_rules(demo: dict[str, Any]) -> None:
    out = demo["out"]
    assert demo["code"] == 1, out  # a partition failed: the demo says so in its exit status, after serving the rest
    _step_line(out, "ok", "raw", GOOD_DAY)
    _step_line(out, "ok", "validated", GOOD_DAY)
    _step_line(out, "ok", "raw", BAD_DAY)  # the file reads fine: the schema holds, a quality rule does not
    _step_line(out, "FAILED", "validated", BAD_DAY)
    lines = out.splitlines()
    failed_at = lines.index(next(line for line in lines if line.startswith("  FAILED") and BAD_DAY in line))
    detail = "\n".join(lines[failed_at + 1: failed_at + 4])
    assert f"blocking: check {NAME}/validated:quality_contract failed" in detail
    assert re.search(r"amount: range  3 rows \(0\.2%\)  e\.g\. -50\.0, -50\.0, -50\.0", detail), detail
    for stage in ("features", "model", "champion", "bento", "image", "endpoint"):
        _step_line(out, "ok", stage)
    assert f"{NAME}: 1 of 2 partition(s) failed validation; training on the rest" in out
    assert re.search(rf"{NAME}: endpoint live at http://127\.0\.0\.1:\d+ serving model version 1", out)
    # Dagster's console log (DEBUG events, stack traces) and MLflow's download bars stay out of it
    for noise in ("DEBUG", "STEP_START", "Traceback", "dagster - ", "Downloading artifacts", "%|"):
        assert noise not in out, f"{noise!r} in the demo's output:\n{out}"
    assert len(lines) < 40, out


def test_instance_config_is_written_once_and_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg

    from platform_defs.lifecycle import prepare_local_env

    fresh = tmp_path / "dagster-fresh"
    monkeypatch.setenv("DAGSTER_HOME", str(fresh))
    prepare_local_env()
    written = (fresh / "dagster.yaml").read_text()
    assert yaml.safe_load(written)["telemetry"] == {"enabled": False}
    assert dg.DagsterInstance.from_config(str(fresh)).run_coordinator is not None  # Dagster accepts the file
    (fresh / "dagster.yaml").write_text(written + "# my edit\n")
    prepare_local_env()
    assert (fresh / "dagster.yaml").read_text().endswith("# my edit\n")

    own = tmp_path / "dagster-own"
    own.mkdir()
    (own / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    monkeypatch.setenv("DAGSTER_HOME", str(own))
    prepare_local_env()
    assert (own / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"


def test_status_fits_a_narrow_terminal(demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from platform_defs.cli import main

    url = demo["serving"].state(NAME)["url"]
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["status"]) == 0
    narrow = capsys.readouterr().out
    assert max(len(line) for line in narrow.splitlines()) <= 60, narrow
    metric = f"{demo['spec'].evaluation.metric}=0."
    assert NAME in narrow and url in narrow and metric in narrow and "last retrain" in narrow
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["status"]) == 0
    wide = capsys.readouterr().out
    row = next(line for line in wide.splitlines() if NAME in line)  # one row per pipeline when there is room
    assert url in row and metric in row and "yes" in row


def test_stop_stops_the_endpoint_and_is_quiet_when_none_runs(demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from platform_defs.cli import main
    from resources.serving import healthy

    url = demo["serving"].state(NAME)["url"]
    assert healthy(url)
    assert main(["stop", NAME]) == 0
    assert capsys.readouterr().out.strip() == f"stopped {NAME}: {url} (model version 1)"
    assert not healthy(url) and demo["serving"].state(NAME) is None
    assert main(["stop"]) == 0
    assert capsys.readouterr().out.strip() == "no endpoint running"
    with pytest.raises(SystemExit, match="no pipeline 'nosuch'"):
        main(["stop", "nosuch"])
