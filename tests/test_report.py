"""The model report: a trained `fraud/model` carries a model card and plots in Dagster metadata and in its MLflow run."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import dagster as dg
import numpy as np
import yaml

from tests.conftest import FRAUD_SPEC

DAYS = 2
ROWS = 1500
PLOTS = ("roc", "pr", "calibration", "feature_importance")


def test_model_card_and_plots_in_dagster_metadata_and_mlflow(kiln_home: Path, tmp_path: Path) -> None:
    from kiln.spec import load_spec, spec_data
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources

    data = spec_data(FRAUD_SPEC)
    data["name"] = "fraud_report"
    data["source"]["path"] = "fraud_report"
    data["trainer"]["params"]["num_boost_round"] = 30
    (tmp_path / "fraud_report.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(tmp_path / "fraud_report.yaml")
    defs = build_definitions([spec])
    folder = local_paths()["sources"] / spec.source.path
    simulate(spec, folder, DAYS, ROWS, seed=11, start=date(2026, 1, 1))
    instance = dg.DagsterInstance.get()
    assert all(r.success for r in ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None))
    result = retrain(defs, spec, instance, progress=lambda _: None, stages=("features", "model"))
    assert result.success
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey([spec.name, "model"])]
    metadata = events[-1].step_materialization_data.materialization.metadata
    card = metadata["model_card"]
    assert isinstance(card, dg.MarkdownMetadataValue)
    assert f"# Model card: {spec.name} v" in card.value
    assert spec.owner in card.value and spec.description in card.value
    assert f"rows: {DAYS * ROWS}" in card.value and "No champion yet" in card.value
    for plot in PLOTS:
        value = metadata[f"plot/{plot}"]
        assert isinstance(value, dg.MarkdownMetadataValue) and "data:image/png;base64," in value.value, plot

    client = resources("local")["mlflow"].client()
    run_id = metadata["mlflow_run_id"].value
    assert f"runs:/{run_id}" in metadata["mlflow_run"].value  # local SQLite store: the run URI (a URL on a tracking server)
    listed = {a.path for a in client.list_artifacts(run_id, "report")}
    assert listed == {"report/model_card.md", *[f"report/{p}.png" for p in PLOTS]}
    local = Path(client.download_artifacts(run_id, "report/roc.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 5_000


def test_regression_report_has_residuals() -> None:
    from kiln.report import evaluation_figures, png

    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    figures = evaluation_figures("regression", y, y + rng.normal(scale=0.1, size=500))
    assert set(figures) == {"residuals"}
    assert png(figures["residuals"])[:4] == b"\x89PNG"


def test_classifier_figures() -> None:
    from kiln.report import evaluation_figures

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=400)
    figures = evaluation_figures("classification", y, np.clip(y * 0.6 + rng.uniform(size=400) * 0.4, 0, 1))
    assert set(figures) == {"roc", "pr", "calibration"}
