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

STAGES = ["raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions"]


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
    assert (schema["churned"].min, schema["churned"].max) == (0, 1)  # the observed labels, not widened to 2
    assert spec.evaluation.min_improvement > 0  # a retrain that ties the champion is not promoted
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
    fares = pl.read_parquet(sample)["fare"]
    assert (spec.schema_["fare"].min, spec.schema_["fare"].max) == (fares.min(), fares.max())  # observed, not widened
    assert spec.validation.severity == {"fare.range": "warn"}  # a new extreme fare is reported, not quarantined
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


def odd_columns_parquet(path: Path, rows: int = 400) -> Path:
    """Public-dataset habits: dictionary-encoded text (Categorical, Enum), a constant column, a row number and a reference."""
    rng = np.random.default_rng(3)
    pl.DataFrame({
        "order_ref": [f"R{i * 7:07d}" for i in range(rows)],
        "row_number": np.arange(rows) * 3 + 5,
        "store_id": rng.integers(1, 9, rows),
        "country": pl.Series(rng.choice(["de", "fr", "us"], rows)).cast(pl.Categorical),
        "tier": pl.Series(rng.choice(["gold", "silver"], rows)).cast(pl.Enum(["bronze", "gold", "silver"])),
        "site": [2015] * rows,
        "amount": np.round(rng.gamma(2.0, 30.0, rows), 2),
        "label": (rng.random(rows) < 0.3).astype(int),
    }).write_parquet(path)
    return path


def test_new_leaves_out_constant_and_id_like_columns_and_says_why(pipelines: Path, tmp_path: Path, kiln_home: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.spec import load_spec

    sample = odd_columns_parquet(tmp_path / "orders.parquet")
    assert main(["new", "orders", "--from", str(sample)]) == 0
    written = pipelines / "orders" / "defs.yaml"
    spec = load_spec(written)
    assert spec.schema_["country"].dtype == "str" and spec.schema_["country"].allowed == ["de", "fr", "us"]
    assert spec.schema_["tier"].dtype == "str" and spec.schema_["tier"].allowed == ["bronze", "gold", "silver"]  # the Enum's own
    assert spec.features.categorical == ["country", "tier"] and spec.features.passthrough == ["amount"]
    assert set(spec.schema_) == {"order_ref", "row_number", "store_id", "country", "tier", "site", "amount", "label"}  # all checked
    comments = [line.strip() for line in written.read_text().splitlines() if line.strip().startswith("#   ")]
    assert comments == [
        "#   order_ref: id-like (a different value in each of 400 rows): it would memorize records, not learn",
        "#   row_number: id-like (a different value in each of 400 rows): it would memorize records, not learn",
        "#   store_id: id-like (named like an identifier): it would memorize records, not learn",
        "#   site: constant in the sample (every value is 2015): it cannot inform a model",
    ]
    assert main(["validate"]) == 0
    result = _ingest_sample("orders", sample, kiln_home)  # the dictionary-encoded file onboards with no hand edits
    assert result.success
    validated = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(["orders", "validated"])]
    assert validated[-1].step_materialization_data.materialization.metadata["dagster/row_count"].value == 400
    # ... and through the whole demo: trained, gated, packaged and served from the file as it came
    try:
        assert main(["demo", "--pipeline", "orders"]) == 0
        out = capsys.readouterr().out
        assert "orders: endpoint live at http://127.0.0.1:" in out and "orders: simulated" not in out
    finally:
        main(["stop", "orders"])


def test_new_picks_a_serving_port_no_other_pipeline_or_process_uses(pipelines: Path, tmp_path: Path) -> None:
    import socket

    from kiln.spec import load_specs

    taken = {s.serving.port for s in load_specs()}
    with socket.socket() as busy:  # a port something on this machine listens on is not handed out either
        busy.bind(("127.0.0.1", next(p for p in range(3100, 4000) if p not in taken)))
        busy.listen()
        listening = busy.getsockname()[1]
        assert main(["new", "churn", "--from", str(churn_csv(tmp_path / "churn.csv", rows=300))]) == 0
        assert main(["new", "orders", "--from", str(odd_columns_parquet(tmp_path / "orders.parquet"))]) == 0
    ports = {s.name: s.serving.port for s in load_specs()}
    assert len(set(ports.values())) == len(ports)  # fraud, breast_cancer, churn, orders: four endpoints, four ports
    assert ports["churn"] not in (*taken, listening) and 3100 <= ports["churn"] < 4000
    assert main(["validate"]) == 0


def test_validate_refuses_what_would_fail_at_materialization(pipelines: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.spec import spec_data

    assert main(["new", "churn", "--from", str(churn_csv(tmp_path / "churn.csv", rows=300))]) == 0
    written = pipelines / "churn" / "defs.yaml"
    data = spec_data(written)
    data["features"]["expressions"] = {"spend_per_month": "monthly_spend / tenure_monts"}  # a typo
    data["serving"] = {"port": spec_data(pipelines / "fraud" / "defs.yaml")["serving"]["port"]}
    written.write_text(yaml.safe_dump({"type": "platform_defs.component.KilnPipeline", "attributes": data}))
    capsys.readouterr()
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    assert f"{written}: features.expressions.spend_per_month: 'monthly_spend / tenure_monts' does not compute" in err
    assert 'unable to find column "tenure_monts"' in err
    assert f"{written}: serving.port: 3100 is used by 2 pipelines" in err
    assert f"{pipelines / 'fraud' / 'defs.yaml'}: serving.port: 3100" in err  # both files of the clash are named
    assert "3 problem(s) that would fail at materialization" in err


def test_the_scaffold_skeleton_gates_on_a_positive_improvement() -> None:
    from kiln.spec import PipelineSpec
    from platform_defs.infer import skeleton_text

    spec = PipelineSpec.model_validate(yaml.safe_load(skeleton_text("orders"))["attributes"])
    assert spec.evaluation.min_improvement > 0
