"""The `breast_cancer` pipeline (PyTorch trainer, unpartitioned CSV source) end to end on CPU, with a real MLflow
registry (SQLite), a real bento and a real `bentoml serve`; training killed with SIGKILL and resumed from its
checkpoint; determinism on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import numpy as np
import pytest
import yaml

from kiln.paths import checkpoints_dir
from kiln.state import state_path
from tests.conftest import REPO, free_port
from tests.results import check_evaluation, materialization, served_matches_offline

SPEC_FILE = REPO / "platform_defs" / "pipelines" / "breast_cancer" / "defs.yaml"
PIPELINE = "breast_cancer"
EPOCHS = 12
CRASH_EPOCHS = 50
KILL_AFTER_EPOCH = 3
SUBPROCESS_TIMEOUT_S = 240.0


def _spec_data(**params: Any) -> dict[str, Any]:
    from kiln.spec import spec_data

    data = spec_data(SPEC_FILE)
    data["serving"]["port"] = free_port()
    data["trainer"]["params"] |= params
    return data


@pytest.fixture(scope="module")
def world(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, ingest_keys, retrain, simulate
    from platform_defs.profiles import local_paths, resources

    spec_dir = tmp_path_factory.mktemp("torch_pipelines")
    (spec_dir / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(_spec_data(epochs=EPOCHS, patience=EPOCHS), sort_keys=False))
    os.environ["KILN_PIPELINES_DIR"] = str(spec_dir)
    spec = load_spec(spec_dir / f"{PIPELINE}.yaml")
    defs = build_definitions([spec])
    folder = local_paths()["sources"] / spec.source.path
    written = simulate(spec, folder, 1, 10_000, seed=5)
    instance = dg.DagsterInstance.get()
    keys = ingest_keys(spec, folder)
    ingested = ingest(defs, spec, keys, instance, progress=lambda _: None)
    trained = retrain(defs, spec, instance, progress=lambda _: None)
    serving = resources("local")["serving"]
    try:
        yield {"spec": spec, "defs": defs, "instance": instance, "ingested": ingested, "trained": trained, "keys": keys,
               "written": written, "folder": folder, "mlflow": resources("local")["mlflow"], "serving": serving,
               "storage": resources("local")["storage"]}
    finally:
        serving.shutdown(PIPELINE)  # router, backends and their handoff folders
        os.environ.pop("KILN_PIPELINES_DIR", None)


def test_unpartitioned_source_ingests_every_real_row(world: dict[str, Any]) -> None:
    assert world["keys"] == [None] and [p.name for p in world["written"]] == ["snapshot.csv"]
    (result,) = world["ingested"]
    assert result.success
    raw = materialization(result, PIPELINE, "raw")
    assert raw.partition is None
    assert raw.metadata["dagster/row_count"].value == 569  # every biopsy in scikit-learn's copy of the data
    assert materialization(result, PIPELINE, "validated").metadata["dagster/row_count"].value == 569
    assert check_evaluation(result, "schema_contract").passed and check_evaluation(result, "quality_contract").passed


def test_torch_model_trained_logged_registered_and_promoted(world: dict[str, Any]) -> None:
    result = world["trained"]
    assert result.success
    model = result.output_for_node(f"{PIPELINE}__model")
    assert model["training"] == model["training"] | {"start_epoch": 0, "epochs_run": EPOCHS, "device": "cpu", "mixed_precision": False}
    client = world["mlflow"].client()
    version = client.get_model_version(PIPELINE, model["version"])
    features = materialization(result, PIPELINE, "features")
    assert version.tags["dagster_run_id"] == result.run_id
    assert version.tags["features_data_version"] == features.metadata["data_version"].value == model["features_data_version"]
    run = client.get_run(model["run_id"])
    assert run.data.tags["kiln.start_epoch"] == "0" and run.data.tags["kiln_pipeline"] == PIPELINE
    assert 0.9 < run.data.metrics["roc_auc"] <= 1.0
    history = client.get_metric_history(model["run_id"], "val_loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))  # one point per epoch
    assert len(client.get_metric_history(model["run_id"], "val_roc_auc")) == EPOCHS
    from kiln.trainers import flavor_of, model_dir

    folder = model_dir(model["model_uri"])
    assert flavor_of(folder) == "pytorch" and (folder / "data" / "model.pt2").exists()
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert meta["signature"]["inputs"] and json.loads(meta["signature"]["inputs"])[0]["tensor-spec"]["shape"] == [-1, 32]
    assert any(folder.glob("input_example*"))
    # MLflow's own generic loader serves the same numbers as Kiln's predictor.
    import mlflow.pyfunc
    import polars as pl

    from kiln.trainers import load_predictor
    from kiln.trainers.torch import features_matrix

    holdout = pl.read_parquet(Path(os.environ["KILN_HOME"]) / "storage" / PIPELINE / "features.parquet").tail(model["holdout_rows"])
    pyfunc = mlflow.pyfunc.load_model(model["model_uri"]).predict(features_matrix(holdout, world["spec"]))
    np.testing.assert_allclose(np.asarray(pyfunc, dtype=float), load_predictor(model["model_uri"], world["spec"]).predict(holdout),
                               rtol=0, atol=1e-6)
    assert str(client.get_model_version_by_alias(PIPELINE, "champion").version) == model["version"]
    assert check_evaluation(result, "champion_gate").passed
    checkpoints = state_path(world["storage"].state_root, checkpoints_dir(PIPELINE))
    assert not list(checkpoints.glob("*.pt")), "a registered model leaves no checkpoint behind"


def test_http_prediction_equals_offline(world: dict[str, Any], kiln_home: Path) -> None:
    spec = world["spec"]
    state = world["serving"].state(PIPELINE)
    champion = world["trained"].output_for_node(f"{PIPELINE}__champion")
    bento = world["serving"].bentoml().bentos.get(world["trained"].output_for_node(f"{PIPELINE}__bento")["tag"])
    assert bento.info.labels["mlflow_model_version"] == champion["version"] == state["model_version"]
    # A GPU pipeline's bento is built on the CUDA image with torch (serving/images.py), not the CPU one.
    assert bento.info.docker.cuda_version and any(p.startswith("torch==") for p in bento.info.python.packages or [])
    rows = json.loads((kiln_home / "state" / "reference" / PIPELINE / "sample_rows.json").read_text())
    offline = served_matches_offline(state["url"], rows, spec, champion["version"])
    assert ((offline > 0) & (offline < 1)).all() and offline.std() > 0.05  # probabilities, not a constant
    assert check_evaluation(world["trained"], "live_smoke_test").passed
    meta = httpx.get(f"{state['url']}/metadata", timeout=10).json()
    assert meta["pipeline"] == PIPELINE and meta["mlflow_run_id"] == champion["run_id"]
    bad = dict(rows[0]) | {"mean_radius": -1.0}
    response = httpx.post(f"{state['url']}/predict", json={"rows": [bad]}, timeout=30)
    assert response.status_code == 400 and "mean_radius" in response.text


def test_new_data_sensor_runs_the_unpartitioned_source_once_per_change(world: dict[str, Any]) -> None:
    sensor = next(s for s in world["defs"].sensors if s.name == f"{PIPELINE}_new_data")
    resources = {"storage": world["defs"].resources["storage"]}
    first = sensor.evaluate_tick(dg.build_sensor_context(instance=world["instance"], resources=resources))
    assert len(first.run_requests) == 1 and first.run_requests[0].partition_key is None
    again = sensor.evaluate_tick(dg.build_sensor_context(instance=world["instance"], resources=resources, cursor=first.cursor))
    assert not again.run_requests and again.skip_message == "no new source files"


def _latest_checkpoint_epoch(folder: Path) -> int:
    """The epoch the trainer's "latest" pointer names (what a resumed run starts after); -1 before the first."""
    import json

    epochs = [-1]
    for pointer in folder.glob("*.latest.json"):
        try:
            epochs.append(int(json.loads(pointer.read_text())["epoch"]))
        except (OSError, ValueError, KeyError):
            continue  # replaced between listing and reading
    return max(epochs)


def test_sigkill_mid_training_resumes_from_the_checkpoint(world: dict[str, Any], tmp_path: Path) -> None:
    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import retrain

    # No early stopping, small batches and dropout: many steps per epoch and RNG state that must be restored.
    spec_dir = tmp_path / "pipelines"
    spec_dir.mkdir()
    (spec_dir / f"{PIPELINE}.yaml").write_text(
        yaml.safe_dump(_spec_data(epochs=CRASH_EPOCHS, patience=CRASH_EPOCHS, batch_size=8, dropout=0.2, seed=11), sort_keys=False))
    spec = load_spec(spec_dir / f"{PIPELINE}.yaml")
    checkpoints = state_path(world["storage"].state_root, checkpoints_dir(PIPELINE))
    for old in checkpoints.glob("*.pt"):
        old.unlink()
    code = ("import dagster as dg\n"
            "from platform_defs.definitions import build_definitions\n"
            "from platform_defs.lifecycle import retrain\n"
            "from kiln.spec import load_specs\n"
            "spec, = load_specs()\n"
            "retrain(build_definitions([spec]), spec, dg.DagsterInstance.get(), stages=('model',))\n")
    env = os.environ | {"KILN_PIPELINES_DIR": str(spec_dir)}
    log = tmp_path / "killed_run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and _latest_checkpoint_epoch(checkpoints) < KILL_AFTER_EPOCH:
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _latest_checkpoint_epoch(checkpoints)
    assert KILL_AFTER_EPOCH <= killed_at < CRASH_EPOCHS - 1

    defs = build_definitions([spec])
    resumed = retrain(defs, spec, world["instance"], progress=lambda _: None, stages=("model",))
    assert resumed.success
    record = resumed.output_for_node(f"{PIPELINE}__model")
    assert record["training"]["start_epoch"] == killed_at + 1
    assert record["training"]["epochs_run"] == CRASH_EPOCHS - killed_at - 1 < CRASH_EPOCHS
    client = world["mlflow"].client()
    run = client.get_run(record["run_id"])
    assert run.data.tags["kiln.resumed_from_epoch"] == str(killed_at) and run.data.tags["kiln.start_epoch"] == str(killed_at + 1)
    assert client.get_run(run.data.tags["kiln.resumed_from_run"]).info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(record["run_id"], "val_loss")) == list(range(CRASH_EPOCHS))
    assert materialization(resumed, PIPELINE, "model").metadata["training/start_epoch"].value == killed_at + 1

    # The same training without a crash: every epoch runs, and the result matches the resumed one.
    assert not list(checkpoints.glob("*.pt"))
    uninterrupted = retrain(defs, spec, world["instance"], progress=lambda _: None, stages=("model",))
    assert uninterrupted.success
    full = uninterrupted.output_for_node(f"{PIPELINE}__model")
    assert full["training"]["start_epoch"] == 0 and full["training"]["epochs_run"] == CRASH_EPOCHS
    assert full["version"] != record["version"]
    assert abs(full["score"] - record["score"]) < 1e-6
    assert abs(full["metrics"]["log_loss"] - record["metrics"]["log_loss"]) < 1e-6
    print(f"killed after epoch {killed_at}; resumed at {record['training']['start_epoch']} and ran {record['training']['epochs_run']} "
          f"epochs, roc_auc {record['score']:.6f}; uninterrupted ran {full['training']['epochs_run']}, roc_auc {full['score']:.6f}")


def test_cpu_training_is_deterministic(world: dict[str, Any]) -> None:
    import polars as pl

    from kiln.evaluation import score, split_holdout
    from kiln.trainers.torch import features_matrix, fit, predict_module

    spec = world["spec"]
    features = pl.read_parquet(Path(os.environ["KILN_HOME"]) / "storage" / PIPELINE / "features.parquet")
    train, holdout = split_holdout(features, spec)
    x, y = features_matrix(train, spec), train[spec.target].cast(float).to_numpy()
    x_hold, y_hold = features_matrix(holdout, spec), holdout[spec.target].to_numpy()

    def run(seed: int) -> tuple[dict[str, Any], float]:
        params = spec.trainer.params | {"seed": seed, "epochs": 6}
        other = spec.model_copy(update={"trainer": spec.trainer.model_copy(update={"params": params})})
        result = fit(x, y, other, device="cpu")
        return result.model.state_dict(), score("log_loss", y_hold, predict_module(result.model, x_hold))

    first, first_loss = run(1)
    second, second_loss = run(1)
    third, third_loss = run(2)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    assert first_loss == second_loss
    assert not all(np.array_equal(first[k].numpy(), third[k].numpy()) for k in first if k.startswith("net."))
    assert third_loss != first_loss


def test_torch_params_are_validated_with_the_field_named(tmp_path: Path) -> None:
    from kiln.spec import SpecError, load_spec

    data = _spec_data(epochs=0)
    path = tmp_path / f"{PIPELINE}.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"breast_cancer\.yaml: trainer: params\.epochs: Input should be greater than or equal to 1"):
        load_spec(path)
    data = _spec_data(hiden=[8])
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"trainer: params\.hiden: unknown torch parameter"):
        load_spec(path)


def test_categorical_features_are_one_hot_inside_the_model() -> None:
    from datetime import date

    from kiln.evaluation import split_holdout
    from kiln.features import feature_table
    from kiln.spec import load_spec
    from kiln.trainers.torch import categorical_columns, features_matrix, fit, predict_module
    from platform_defs.simulators.fraud import generate_day

    fraud = load_spec(REPO / "platform_defs" / "pipelines" / "fraud" / "defs.yaml")
    spec = fraud.model_copy(update={"trainer": fraud.trainer.model_copy(update={"kind": "torch", "params": {"epochs": 2, "seed": 3}})})
    _, features = feature_table([generate_day(date(2026, 1, d), 1500, 1) for d in (1, 2)], spec)
    train, holdout = split_holdout(features, spec)
    result = fit(features_matrix(train, spec), train[spec.target].cast(float).to_numpy(), spec, device="cpu")
    columns = categorical_columns(spec)
    assert columns == {5: 8, 6: 8, 7: 3}  # merchant_category, country, channel after the five passthrough columns
    first = result.model.net[0]
    assert first.in_features == len(spec.feature_names) - len(columns) + sum(columns.values())
    x = features_matrix(holdout.head(50), spec)
    base = predict_module(result.model, x)
    other = x.copy()
    other[:, 7] = (other[:, 7] + 1) % 3  # another channel
    unknown = x.copy()
    unknown[:, 5] = np.nan  # a category the model never saw (compute_features makes it null)
    assert np.isfinite(base).all() and np.isfinite(predict_module(result.model, unknown)).all()
    assert not np.allclose(base, predict_module(result.model, other))
