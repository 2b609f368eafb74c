"""A third trainer kind end to end: the fraud spec with ``trainer.kind: sklearn`` (HistGradientBoostingClassifier)
trained, registered with mlflow.sklearn, gated, built into a bento and served by a real `bentoml serve` over HTTP."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml

from tests.conftest import FRAUD_SPEC, free_port
from tests.results import check_evaluation, materialization, served_matches_offline

PIPELINE = "fraud_sklearn"
ESTIMATOR = "sklearn.ensemble.HistGradientBoostingClassifier"
DAYS = 3
ROWS = 2500


@pytest.fixture(scope="module")
def world(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kiln.spec import load_spec, spec_data
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources

    data = spec_data(FRAUD_SPEC)
    data |= {"name": PIPELINE, "source": data["source"] | {"path": PIPELINE}}
    data["serving"]["port"] = free_port()
    data["trainer"] = data["trainer"] | {"kind": "sklearn", "params": {"estimator": ESTIMATOR, "params": {"max_iter": 50}}}
    spec_dir = tmp_path_factory.mktemp("sklearn_pipelines")
    (spec_dir / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    spec = load_spec(spec_dir / f"{PIPELINE}.yaml")
    defs = build_definitions([spec])
    folder = local_paths()["sources"] / spec.source.path
    simulate(spec, folder, DAYS, ROWS, seed=3, start=date(2026, 1, 1))
    instance = dg.DagsterInstance.get()
    ingested = ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None)
    trained = retrain(defs, spec, instance, progress=lambda _: None)
    serving = resources("local")["serving"]
    try:
        yield {"spec": spec, "defs": defs, "instance": instance, "ingested": ingested, "trained": trained,
               "mlflow": resources("local")["mlflow"], "serving": serving}
    finally:
        serving.shutdown(PIPELINE)  # router, backends and their handoff folders
        os.environ.pop("KILN_PIPELINES_DIR", None)


def _packages(info: Any) -> list[str]:
    """A bento's pip requirements: BentoML records them under `image` or, built from docker/python options, `python`."""
    image = getattr(info, "image", None)
    return image.python_requirements.splitlines() if image is not None else list(info.python.packages or [])


def _rows(kiln_home: Path) -> list[dict[str, Any]]:
    return json.loads((kiln_home / "state" / "reference" / PIPELINE / "sample_rows.json").read_text())


def test_sklearn_model_trained_registered_and_promoted(world: dict[str, Any]) -> None:
    from kiln.trainers import flavor_of, model_dir

    assert all(r.success for r in world["ingested"])
    result = world["trained"]
    assert result.success
    model = result.output_for_node(f"{PIPELINE}__model")
    client = world["mlflow"].client()
    version_ = client.get_model_version(PIPELINE, model["version"])
    assert version_.tags["dagster_run_id"] == result.run_id
    assert version_.tags["features_data_version"] == materialization(result, PIPELINE, "features").metadata["data_version"].value
    run = client.get_run(model["run_id"])
    assert run.data.params["estimator"] == ESTIMATOR and run.data.params["max_iter"] == "50"
    assert 0.5 < run.data.metrics["roc_auc"] <= 1.0 and run.data.metrics["average_precision"] == model["score"]
    assert flavor_of(model_dir(model["model_uri"])) == "sklearn"
    assert str(client.get_model_version_by_alias(PIPELINE, "champion").version) == model["version"]
    assert check_evaluation(result, "champion_gate").passed
    metadata = materialization(result, PIPELINE, "model").metadata
    assert "plot/roc" in metadata and "model_card" in metadata and "drift_reference" in metadata


def test_bento_carries_scikit_learn_not_lightgbm(world: dict[str, Any]) -> None:
    bento = world["serving"].bentoml().bentos.get(world["trained"].output_for_node(f"{PIPELINE}__bento")["tag"])
    packages = _packages(bento.info)
    assert f"scikit-learn=={version('scikit-learn')}" in packages  # the pickle loads only in the version that wrote it
    assert not any(p.startswith(("lightgbm", "torch")) for p in packages)
    assert bento.info.labels["mlflow_model_version"] == world["trained"].output_for_node(f"{PIPELINE}__champion")["version"]


def test_http_predictions_are_the_offline_positive_class_probabilities(world: dict[str, Any], kiln_home: Path) -> None:
    spec = world["spec"]
    state = world["serving"].state(PIPELINE)
    champion = world["trained"].output_for_node(f"{PIPELINE}__champion")
    assert state["model_version"] == champion["version"]
    rows = _rows(kiln_home)
    offline = served_matches_offline(state["url"], rows, spec, champion["version"])
    assert ((offline > 0) & (offline < 1)).all() and offline.std() > 0.001  # probabilities, not 0/1 labels
    assert check_evaluation(world["trained"], "live_smoke_test").passed
    bad = dict(rows[0]) | {"amount": -5.0}
    response = httpx.post(f"{state['url']}/predict", json={"rows": [bad]}, timeout=30)
    assert response.status_code == 400 and "amount" in response.text


def test_retrain_on_the_same_data_is_gated_and_the_champion_keeps_serving(world: dict[str, Any], kiln_home: Path) -> None:
    from platform_defs.lifecycle import retrain

    before = world["trained"].output_for_node(f"{PIPELINE}__champion")["version"]
    again = retrain(world["defs"], world["spec"], world["instance"], progress=lambda _: None)
    assert again.success
    decision = again.output_for_node(f"{PIPELINE}__champion")
    # The same data and seed give the same model: no gain of min_improvement (0.005), so the challenger is not promoted.
    assert decision["challenger_version"] != before and not decision["promoted"]
    assert abs(decision["challenger_score"] - decision["score"]) < 1e-9
    assert str(world["mlflow"].client().get_model_version_by_alias(PIPELINE, "champion").version) == before
    state = world["serving"].state(PIPELINE)
    assert httpx.post(f"{state['url']}/predict", json={"rows": _rows(kiln_home)[:2]}, timeout=30).json()["model_version"] == before
