"""The fraud pipeline's CPU serving image, really built and run: `<p>/image` with ``KILN_ENDPOINT_TARGET=container``
containerizes the trained bento with buildah (on the local Debian base image, made with mmdebstrap when missing), the
image runs under podman, and its answers to the smoke rows equal the MLflow model's offline predictions.

Needs the OS packages podman, buildah, runc and mmdebstrap (``make install``; CI installs them): without them this
fails, never skips. The first run builds the base image (about 30 s) and downloads the pinned wheels into buildah's
cache; later runs reuse both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import date
from typing import Any

import httpx
import pytest
import yaml

from kiln.spec import spec_data
from tests.conftest import FRAUD_SPEC, free_port

NAME = "fraud_image"
DAYS = 2
ROWS = 1200
API_KEY = "image-test-key-51c2"
TOLERANCE = 1e-9
# The integration package's prod services (tests/integration/conftest.py) may still be up: this module is local.
PROD_VARIABLES = ("MLFLOW_TRACKING_URI", "KILN_STATE_ROOT", "KILN_SOURCE_ROOT", "KILN_STORAGE_PREFIX", "KILN_S3_ENDPOINT_URL",
                  "MLFLOW_S3_ENDPOINT_URL", "KILN_PIPELINES_DIR", "KILN_BASE_IMAGE")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The fraud pipeline (few rows, few boosting rounds) trained in the local profile up to `<p>/image`."""
    import dagster as dg

    from kiln.spec import load_spec
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources
    from resources.containers import ContainerError, require_tools

    try:
        require_tools("podman", "buildah", "runc", "mmdebstrap")
    except ContainerError as missing:  # CI installs them (make install): a missing tool is a failure, never a skip
        pytest.fail(f"the serving-image test cannot run: {missing}")
    saved = dict(os.environ)
    spec_dir = tmp_path_factory.mktemp("image-pipelines")
    data = spec_data(FRAUD_SPEC)
    data["name"] = NAME
    data["source"]["path"] = NAME
    data["trainer"]["params"]["num_boost_round"] = 20
    (spec_dir / f"{NAME}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for name in PROD_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update({"KILN_PROFILE": "local", "KILN_ENDPOINT_TARGET": "container", "KILN_PIPELINES_DIR": str(spec_dir),
                       "KILN_API_KEY": API_KEY, "DAGSTER_HOME": str(tmp_path_factory.mktemp("image-dagster"))})
    try:
        spec = load_spec(spec_dir / f"{NAME}.yaml")
        defs = build_definitions([spec])
        folder = local_paths()["sources"] / spec.source.path
        simulate(spec, folder, DAYS, ROWS, seed=11, start=date(2026, 1, 1))
        instance = dg.DagsterInstance.get()
        assert all(r.success for r in ingest(defs, spec, source_partitions(spec, folder), instance, progress=lambda _: None))
        lines: list[str] = []
        trained = retrain(defs, spec, instance, progress=lines.append, stages=("features", "model", "champion", "bento", "image"))
        assert trained.success, "\n".join(lines)
        local = resources("local")
        yield {"spec": spec, "image": trained.output_for_node(f"{NAME}__image"), "bento": trained.output_for_node(f"{NAME}__bento"),
               "state_root": local["storage"].state_root, "mlflow": local["mlflow"], "defs": defs, "instance": instance,
               "serving": local["serving"]}
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def container(built: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The built image running as a container on a free port (the endpoint's environment), stopped afterwards."""
    from resources import containers

    name = f"kiln-test-{NAME.replace('_', '-')}-{os.getpid()}"
    spill = tempfile.mkdtemp(prefix="kiln-image-spill-")
    log = {"KILN_PREDICTION_LOG_ROOT": built["state_root"], "KILN_PREDICTION_LOG_SPILL_DIR": spill,
           "KILN_PREDICTION_LOG_FLUSH_SECONDS": "0.5"}
    started = containers.run_container(built["image"]["image"], name, free_port(), api_key=API_KEY, prediction_log=log)
    try:
        yield started
    finally:
        assert containers.stop_container(name)
        assert containers.container_state(name) is None
        shutil.rmtree(spill, ignore_errors=True)


def _offline(rows: list[dict[str, Any]], spec: Any, version: str) -> Any:
    """The registered model's predictions for the rows, typed from the spec without the serving code's request parser."""
    import polars as pl

    from kiln.features import compute_features
    from kiln.source import POLARS_DTYPES
    from kiln.trainers import load_predictor

    columns = {}
    for name in spec.input_columns:
        dtype = spec.schema_[name].dtype
        values = [row[name] for row in rows]
        if dtype == "datetime":
            columns[name] = pl.Series(name, values, dtype=pl.String).str.to_datetime()
        else:
            columns[name] = pl.Series(name, values, dtype=getattr(pl, POLARS_DTYPES[dtype]))
    frame = pl.DataFrame(list(columns.values()))
    return load_predictor(f"models:/{spec.name}/{version}", spec, num_threads=None).predict(compute_features(frame, spec))


def test_the_image_step_records_a_real_image(built: dict[str, Any]) -> None:
    from resources import containers
    from serving.images import default_base_image, local_image

    record = built["image"]
    assert record["image"] == local_image(built["bento"]["tag"]) == record["ref"]
    assert record["bento"] == built["bento"]["tag"] and record["model_version"] == built["bento"]["model_version"]
    assert record["digest"].startswith("sha256:") and len(record["id"]) == 64 and not record["pushed"]
    inspected = containers.inspect_image(record["image"])
    assert (inspected["id"], inspected["digest"]) == (record["id"], record["digest"])
    assert record["base"] == default_base_image() and containers.image_exists(default_base_image())


def test_the_container_answers_the_smoke_rows_as_the_model_does_offline(built: dict[str, Any], container: dict[str, Any]) -> None:
    import numpy as np

    from kiln.reference import load_sample_rows
    from tests.results import wait_for_logged_rows

    spec, version = built["spec"], built["bento"]["model_version"]
    built["mlflow"].client()  # models:/ URIs below resolve in this pipeline's local registry
    rows = load_sample_rows(built["state_root"], NAME)
    assert len(rows) >= 5
    unauthorized = httpx.post(f"{container['url']}/predict", json={"rows": rows}, timeout=30)
    assert unauthorized.status_code == 401, unauthorized.text  # KILN_API_KEY reached the container
    response = httpx.post(f"{container['url']}/predict", json={"rows": rows}, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == version
    online = np.asarray(body["predictions"], dtype=float)
    offline = np.asarray(_offline(rows, spec, version), dtype=float)
    assert online.shape == offline.shape == (len(rows),)
    assert float(np.max(np.abs(online - offline))) <= TOLERANCE
    assert len(set(np.round(offline, 6))) > 1  # a model, not a constant: equal answers mean something
    # the container's prediction log reaches the state root on the host (bind-mounted), as `<p>/predictions` reads it
    assert wait_for_logged_rows(built["state_root"], NAME, len(rows)) >= len(rows)
    metadata = httpx.get(f"{container['url']}/metadata", timeout=10, headers={"Authorization": f"Bearer {API_KEY}"})
    assert metadata.status_code == 200 and str(metadata.json()["model_version"]) == version


def test_the_endpoint_record_references_the_image(built: dict[str, Any]) -> None:
    from assets.endpoint import with_image

    bento, image = built["bento"], built["image"]
    assert with_image(bento, image)["image_ref"] == image["ref"]
    assert "image_ref" not in with_image(bento, image | {"bento": "kiln-other:v1"})  # an image of another bento is not used


def test_the_endpoint_step_serves_the_image_behind_the_router(built: dict[str, Any]) -> None:
    """`<p>/endpoint` with KILN_ENDPOINT_TARGET=container: the router on the public port, the backend a podman container
    of the image (no `bentoml serve` process on the host); its live smoke test passes; shutdown stops the container."""
    from platform_defs.lifecycle import retrain
    from resources import containers

    lines: list[str] = []
    served = retrain(built["defs"], built["spec"], built["instance"], progress=lines.append, stages=("endpoint",))
    serving = built["serving"]
    try:
        assert served.success, "\n".join(lines)
        record = served.output_for_node(f"{NAME}__endpoint")
        champion = serving.router_config(NAME)["champion"]
        assert champion["pid"] is None and champion["image"] == built["image"]["image"]
        assert containers.container_state(champion["container"]) is not None  # running under podman
        answer = httpx.post(f"{record['url']}/predict", json={"rows": _rows(built)},
                            headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Kiln-Model-Version"] == built["bento"]["model_version"]
    finally:
        serving.shutdown(NAME)
    assert containers.container_state(champion["container"]) is None


def _rows(built: dict[str, Any]) -> list[dict[str, Any]]:
    from kiln.reference import load_sample_rows

    return load_sample_rows(built["state_root"], NAME)[:5]
