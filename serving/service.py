"""The BentoML service every pipeline's endpoint runs (`bentoml serve` of a Kiln bento).

The model comes from the bento model named by ``KILN_MODEL_TAG``; the pipeline spec travels
inside that model's metadata, so features are computed by the same code as `<p>/features`.

``POST /predict`` reads the raw body and validates it column-wise against the spec's schema
(:mod:`serving.requests`): every bad request gets 4xx naming the field and reason, none gets 5xx.
Answers carry the model version in the ``X-Kiln-Model-Version`` header. With ``KILN_API_KEY``
set, ``/predict`` and ``/metadata`` need ``Authorization: Bearer <key>`` (or ``X-API-Key``);
``/livez``, ``/readyz`` and ``/metrics`` stay open. Access logs are off unless ``KILN_ACCESS_LOG=1``;
workers come from ``KILN_WORKERS`` (set by ``ServingResource`` from ``serving.workers``, 0 = CPUs).

Prometheus series at ``GET /metrics``: BentoML's own (``bentoml_service_request_total``,
``bentoml_service_request_duration_seconds``, ``bentoml_service_request_in_progress``, ...) and Kiln's,
all labelled ``pipeline`` and ``model_version``:

- ``kiln_requests_total{status}``: /predict answers by HTTP status (200, 400, 401, 413, ...)
- ``kiln_request_duration_seconds``: histogram of /predict latency (body read to response)
- ``kiln_batch_rows``: histogram of rows per scored request
- ``kiln_predicted_rows_total``: rows scored
- ``kiln_prediction_score``: histogram of predicted scores

The router in front of it (:mod:`serving.router`) adds ``kiln_router_*`` series at its own ``/metrics``.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from assets.features import compute_features
from platform_defs.spec import PipelineSpec
from serving.requests import RequestError, parse_body

LOG_FILES_KEPT = 48
app = FastAPI(title="Kiln endpoint")


class PredictionLog:
    """Append-only JSON-lines log of requests and predictions, one file per hour and process, bounded."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None
        self._current: Path | None = None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, frame: Any, predictions: Any, model_version: str) -> None:
        if self.folder is None:
            return
        import polars as pl

        now = time.time()
        out = frame.with_columns(
            pl.lit(now).alias("_logged_at"),
            pl.lit(model_version).alias("_model_version"),
            pl.Series("_prediction", predictions),
        )
        path = self.folder / f"{time.strftime('%Y%m%d%H', time.gmtime(now))}-{os.getpid()}.jsonl"
        data = out.write_ndjson().encode()  # serialized in memory first: one small append per request
        with path.open("ab") as fh:
            fh.write(data)
        if path != self._current:  # a new hourly file: drop the oldest beyond the bound
            self._current = path
            self._rotate()

    def _rotate(self) -> None:
        assert self.folder is not None
        files = sorted(self.folder.glob("*.jsonl"))
        for old in files[:-LOG_FILES_KEPT]:
            old.unlink(missing_ok=True)


def api_key_ok(headers: Any, key: str | None) -> bool:
    """True when no key is configured, or the request carries it (``Authorization: Bearer`` or ``X-API-Key``)."""
    if not key:
        return True
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


def json_response(body: dict[str, Any], status: int, version: str) -> Response:
    return Response(json.dumps(body, allow_nan=False), status_code=status, media_type="application/json",
                    headers={"X-Kiln-Model-Version": version})


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="kiln",
    traffic={"timeout": 30},
    workers=int(os.environ.get("KILN_WORKERS", "1")),
    logging={"access": {"enabled": os.environ.get("KILN_ACCESS_LOG") == "1"}},
)
class KilnService:
    """Predicts for rows of the spec's input columns; answers 4xx naming the field on bad input."""

    def __init__(self) -> None:
        from serving.metrics import EndpointMetrics

        tag = os.environ["KILN_MODEL_TAG"]
        self.model_ref = bentoml.models.get(tag)
        info = self.model_ref.info
        self.spec = PipelineSpec.from_json(str(info.metadata["kiln_spec"]))
        self.labels = dict(info.labels)
        self.version = self.labels["mlflow_model_version"]
        self.predict_features = self._load_model()
        self.log = PredictionLog(os.environ.get("KILN_PREDICTION_LOG"))
        self.api_key = os.environ.get("KILN_API_KEY") or None
        self.max_rows = self.spec.serving.max_batch_rows
        self.unknown_category = self.spec.serving.unknown_category
        self.metrics = EndpointMetrics(self.spec.name, self.version)

    def _load_model(self) -> Any:
        """A function from a features frame to a 1-D array of predictions (the one place a model is loaded)."""
        from assets.predictors import load_predictor

        self.predictor = load_predictor(self.model_ref.path, self.spec, num_threads=1)  # LightGBM or torch, from the MLmodel
        return self.predictor.predict

    @app.post("/predict")
    async def predict(self, request: Request) -> Response:
        """Score rows: ``{"rows": [...]}`` -> ``{"predictions": [...], "model_version": "<n>"}``; 4xx names the field."""
        import numpy as np

        started = time.perf_counter()
        if not api_key_ok(request.headers, self.api_key):
            self.metrics.request(401, time.perf_counter() - started)
            return json_response({"error": "unauthorized: send the API key as 'Authorization: Bearer <key>'"}, 401, self.version)
        try:
            frame = parse_body(await request.body(), self.spec, self.max_rows, self.unknown_category)
        except RequestError as exc:
            self.metrics.request(exc.status, time.perf_counter() - started)
            return json_response({"error": str(exc)}, exc.status, self.version)
        predictions = np.asarray(self.predict_features(compute_features(frame, self.spec)), dtype=float).ravel()
        self.log.write(frame, predictions, self.version)
        self.metrics.scored(predictions)
        response = json_response({"predictions": predictions.tolist(), "model_version": self.version}, 200, self.version)
        self.metrics.request(200, time.perf_counter() - started)
        return response

    @app.get("/metadata")
    def metadata(self, request: Request) -> Response:
        """Pipeline, model version, MLflow run id, Dagster run id and training data version."""
        if not api_key_ok(request.headers, self.api_key):
            return json_response({"error": "unauthorized"}, 401, self.version)
        return json_response({
            "pipeline": self.spec.name,
            "model_version": self.version,
            "mlflow_run_id": self.labels.get("mlflow_run_id"),
            "dagster_run_id": self.labels.get("dagster_run_id"),
            "features_data_version": self.labels.get("features_data_version"),
            "input_columns": self.spec.input_columns,
            "bento_model": str(self.model_ref.tag),
            "serving": self.spec.serving.model_dump(),
        }, 200, self.version)
