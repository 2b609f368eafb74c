"""`kiln new <name> --from <file>` on two real-shaped samples: the inferred spec validates, loads, and accepts its sample."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from platform_defs.cli import main
from tests.conftest import REPO

STAGES = ["raw", "validated", "features", "model", "champion", "bento", "endpoint", "predictions"]


@pytest.fixture()
def pipelines(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "pipelines"
    shutil.copytree(REPO / "platform_defs" / "pipelines", folder)
    os.environ["KILN_PIPELINES_DIR"] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop("KILN_PIPELINES_DIR", None)


def churn_csv(path: Path, rows: int = 2000) -> Path:
    """Customer churn: an id, categoricals, nullable numbers, a 0/1 label."""
    rng = np.random.default_rng(1)
    spend = np.round(rng.gamma(2.0, 30.0, rows), 2).astype(object)
    spend[rng.random(rows) < 0.08] = None
    tickets = rng.poisson(1.2, rows).astype(object)
    tickets[rng.random(rows) < 0.05] = None
    pl.DataFrame({
        "customer_id": [f"C{i:06d}" for i in range(rows)],
        "plan": rng.choice(["basic", "pro", "enterprise"], rows, p=[0.6, 0.3, 0.1]),
        "region": rng.choice(["north", "south", "east", "west", None], rows),
        "monthly_spend": pl.Series(spend.tolist(), dtype=pl.Float64),
        "tenure_months": rng.integers(1, 120, rows),
        "support_tickets": pl.Series(tickets.tolist(), dtype=pl.Int64),
        "autopay": rng.random(rows) < 0.5,
        "churned": (rng.random(rows) < 0.2).astype(int),
    }).write_csv(path)
    return path


def trips_parquet(path: Path, rows: int = 1500) -> Path:
    """Taxi trips: timestamps, a payment category and a fare to predict."""
    rng = np.random.default_rng(2)
    start = datetime(2026, 3, 1)
    pickup = [start + timedelta(minutes=int(m)) for m in rng.integers(0, 60 * 24 * 7, rows)]
    distance = np.round(rng.gamma(2.0, 2.5, rows), 3)
    pl.DataFrame({
        "trip_id": np.arange(rows),
        "pickup_at": pickup,
        "dropoff_at": [p + timedelta(minutes=int(5 + 3 * d)) for p, d in zip(pickup, distance, strict=True)],
        "distance_km": distance,
        "passengers": rng.integers(1, 5, rows),
        "payment_type": rng.choice(["card", "cash", "app"], rows),
        "fare": np.round(3.0 + 1.8 * distance + rng.normal(0, 1, rows), 2),
    }).write_parquet(path)
    return path


def _ingest_sample(name: str, sample: Path, kiln_home: Path) -> dg.ExecuteInProcessResult:
    from kiln.spec import load_specs
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest

    specs = {s.name: s for s in load_specs()}
    folder = kiln_home / "sources" / specs[name].source.path
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(sample, folder / sample.name)
    defs = build_definitions(list(specs.values()))
    graph = defs.resolve_asset_graph()
    assert {dg.AssetKey([name, s]) for s in STAGES} <= set(graph.get_all_asset_keys())
    assert defs.resolve_job_def(f"{name}_retrain") is not None
    return ingest(defs, specs[name], [None], dg.DagsterInstance.get(), progress=lambda _: None)[0]  # type: ignore[list-item]


def test_new_from_csv_with_nulls_and_categoricals(pipelines: Path, tmp_path: Path, kiln_home: Path) -> None:
    from kiln.spec import load_spec

    sample = churn_csv(tmp_path / "churn.csv")
    assert main(["new", "churn", "--from", str(sample)]) == 0
    written = pipelines / "churn" / "defs.yaml"  # a Dagster component instance, like the shipped pipelines
    assert yaml.safe_load(written.read_text())["type"] == "platform_defs.component.KilnPipeline"
    spec = load_spec(written)
    schema = spec.schema_
    assert spec.target == "churned" and spec.task == "classification"
    assert spec.key_columns == ["customer_id"]
    assert schema["plan"].allowed == ["basic", "enterprise", "pro"] and "plan" in spec.features.categorical
    assert schema["region"].nullable and schema["region"].allowed == ["east", "north", "south", "west"]
    assert schema["monthly_spend"].dtype == "float" and schema["monthly_spend"].nullable
    assert schema["support_tickets"].dtype == "int" and schema["support_tickets"].nullable
    assert schema["tenure_months"].dtype == "int" and not schema["tenure_months"].nullable
    assert schema["tenure_months"].min is not None and schema["tenure_months"].min <= 1 and schema["tenure_months"].max >= 119
    assert schema["autopay"].dtype == "bool"
    assert main(["validate"]) == 0
    assert main(["new", "churn", "--from", str(sample)]) == 1  # refuses to overwrite

    result = _ingest_sample("churn", sample, kiln_home)
    assert result.success
    validated = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(["churn", "validated"])]
    assert validated[-1].step_materialization_data.materialization.metadata["dagster/row_count"].value == 2000


def test_new_from_parquet_with_timestamps(pipelines: Path, tmp_path: Path, kiln_home: Path) -> None:
    from kiln.spec import load_spec

    sample = trips_parquet(tmp_path / "trips.parquet")
    assert main(["new", "trips", "--from", str(sample), "--target", "fare"]) == 0
    spec = load_spec(pipelines / "trips" / "defs.yaml")
    assert spec.task == "regression" and spec.target == "fare" and spec.evaluation.metric == "rmse"
    assert spec.schema_["pickup_at"].dtype == "datetime" and spec.schema_["dropoff_at"].dtype == "datetime"
    assert spec.source.timestamp_column == "pickup_at" and spec.source.format == "parquet"
    assert "pickup_at_hour" in spec.features.expressions
    assert spec.key_columns == ["trip_id"]
    assert spec.schema_["payment_type"].allowed == ["app", "card", "cash"]
    assert main(["validate"]) == 0
    assert _ingest_sample("trips", sample, kiln_home).success


def test_new_explains_what_it_cannot_infer(pipelines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "nolabel.csv"
    pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).write_csv(sample)
    assert main(["new", "nolabel", "--from", str(sample)]) == 1
    assert "target" in capsys.readouterr().err
    assert main(["new", "nolabel", "--from", str(tmp_path / "missing.csv")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["new", "Bad-Name", "--from", str(sample), "--target", "a"]) == 1
    assert "name" in capsys.readouterr().err


def test_new_replaces_a_bare_spec_only_with_force(pipelines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An older `<name>.yaml` of the same name blocks `kiln new`; --force moves it to `<name>/defs.yaml`, keeping names unique."""
    from kiln.spec import load_specs, spec_data

    sample = churn_csv(tmp_path / "churn.csv", rows=300)
    (pipelines / "churn.yaml").write_text(yaml.safe_dump(spec_data(pipelines / "fraud" / "defs.yaml") | {"name": "churn"}))
    assert main(["new", "churn", "--from", str(sample)]) == 1
    assert "churn.yaml: already exists" in capsys.readouterr().err
    assert main(["new", "churn", "--from", str(sample), "--force"]) == 0
    assert not (pipelines / "churn.yaml").exists()
    assert [s.name for s in load_specs()].count("churn") == 1
