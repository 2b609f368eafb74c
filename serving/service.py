"""The BentoML service every pipeline's endpoint runs (`bentoml serve` of a Kiln bento).

The model comes from the bento model named by ``KILN_MODEL_TAG``; the pipeline spec travels
inside that model's metadata, so features are computed by the same code as `<p>/features`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument
from fastapi import FastAPI

from assets.features import compute_features
from platform_defs.spec import PipelineSpec
from serving.requests import RequestError, parse_rows

LOG_FILES_KEPT = 48
app = FastAPI(title="Kiln endpoint")


class PredictionLog:
    """Append-only JSON-lines log of requests and predictions, one file per hour and process, bounded."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None
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
        with path.open("ab") as fh:
            out.write_ndjson(fh)
        self._rotate()

    def _rotate(self) -> None:
        assert self.folder is not None
        files = sorted(self.folder.glob("*.jsonl"))
        for old in files[:-LOG_FILES_KEPT]:
            old.unlink(missing_ok=True)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="kiln", traffic={"timeout": 30})
class KilnService:
    """Predicts for rows of the spec's input columns; answers 400 naming the field on bad input."""

    def __init__(self) -> None:
        from assets.predictors import load_predictor

        tag = os.environ["KILN_MODEL_TAG"]
        self.model_ref = bentoml.models.get(tag)
        info = self.model_ref.info
        self.spec = PipelineSpec.from_json(str(info.metadata["kiln_spec"]))
        self.labels = dict(info.labels)
        self.version = self.labels["mlflow_model_version"]
        self.predictor = load_predictor(self.model_ref.path, self.spec, num_threads=1)  # LightGBM or torch, from the MLmodel
        self.log = PredictionLog(os.environ.get("KILN_PREDICTION_LOG"))

    @bentoml.api(route="/predict")
    def predict(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Score rows; answers ``{"predictions": [...], "model_version": "<n>"}``."""
        import numpy as np

        try:
            frame = parse_rows(rows, self.spec, self.spec.serving.max_batch_rows)
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None
        features = compute_features(frame, self.spec)
        predictions = self.predictor.predict(features)
        self.log.write(frame, predictions, self.version)
        return {"predictions": np.asarray(predictions).tolist(), "model_version": self.version}

    @app.get("/metadata")
    def metadata(self) -> dict[str, Any]:
        """Pipeline, model version, MLflow run id, Dagster run id and training data version."""
        return {
            "pipeline": self.spec.name,
            "model_version": self.version,
            "mlflow_run_id": self.labels.get("mlflow_run_id"),
            "dagster_run_id": self.labels.get("dagster_run_id"),
            "features_data_version": self.labels.get("features_data_version"),
            "input_columns": self.spec.input_columns,
            "bento_model": str(self.model_ref.tag),
        }

