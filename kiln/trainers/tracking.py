"""Train a challenger in an MLflow run, whatever its kind: fit, score on the holdout, log, register.

The run carries the trainer's params, the holdout metrics, the spec (``kiln/spec.json``) and the model's drift
reference (``drift/reference.json``); the model is registered under the pipeline's name. Completing the registration
(version tags, checksum) is the caller's: it needs the platform's MLflow resource.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from kiln.trainers.base import CheckpointStore

REFERENCE_ROWS = 100_000  # rows profiled for the drift reference (a systematic sample beyond that)


@dataclass
class Trained:
    """A registered challenger and what the model asset reports about it."""

    version: str
    run_id: str
    experiment_id: str
    features_version: str
    metrics: dict[str, float]
    train_rows: int
    holdout_rows: int
    holdout_scores: np.ndarray
    importances: tuple[str, np.ndarray] | None
    reference: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointStore | None = None

    def release(self) -> None:
        """Drop the training checkpoints (pointer and objects, in the state store): once the version is registered, a later
        run on the same data trains afresh."""
        if self.checkpoint is not None:
            self.checkpoint.remove()


def holdout_calibration(spec: PipelineSpec, labels: Any, scores: Any, log: Any = None) -> dict[str, Any] | None:
    """The holdout's score calibration for a classifier (None for regression, or when the holdout cannot calibrate)."""
    from kiln.performance import fit_calibration

    if spec.task != "classification":
        return None
    try:
        return fit_calibration(scores, labels)
    except ValueError as exc:  # e.g. a holdout of one class: estimation is off for this model, and says so
        (log or (lambda _: None))(f"{spec.name}: no performance calibration: {exc}")
        return None


def train_and_log(spec: PipelineSpec, features: pl.DataFrame, experiment_id: str, dagster_run_id: str, state_root: str,
                  log: Any = None) -> Trained:
    """Fit the spec's trainer on the older rows of ``features``, score the newest, log and register the model.

    MLflow's tracking URI must already point at the registry (the platform's MLflow resource sets it)."""
    import mlflow

    from kiln import paths
    from kiln.evaluation import metrics as all_metrics
    from kiln.evaluation import split_holdout
    from kiln.features import data_version
    from kiln.reference import training_reference
    from kiln.trainers import trainer_for
    from kiln.trainers.base import Session, state_location

    trainer = trainer_for(spec)
    train, holdout = split_holdout(features, spec)
    version_of_data = data_version(features)
    tags = {paths.DAGSTER_RUN_TAG: dagster_run_id, paths.FEATURES_VERSION_TAG: version_of_data, "kiln_pipeline": spec.name}
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        session = Session(features_version=version_of_data, dagster_run_id=dagster_run_id, mlflow_run_id=run.info.run_id,
                          checkpoint_dir=state_location(state_root, paths.checkpoints_dir(spec.name)), log=log or (lambda _: None))
        fitted = trainer.fit(train, session)
        y_pred = fitted.predictor.predict(holdout)
        metrics = all_metrics(spec, holdout[spec.target].to_numpy(), y_pred)
        mlflow.log_params({**fitted.params, "train_rows": train.height, "holdout_rows": holdout.height})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"kiln.{k}": str(v) for k, v in fitted.training.items()})
        mlflow.log_dict(spec.model_dump(mode="json", by_alias=True), paths.SPEC_ARTIFACT)
        # Drift is judged against this model's own training data and prediction scores, stored with the version. Every
        # k-th row (spread over the whole time range, so daily cycles stay intact) bins like all rows at a fraction of the cost.
        sample = features.gather_every(max(1, -(-features.height // REFERENCE_ROWS)))
        reference = training_reference(spec, sample, fitted.predictor.predict(sample))
        # What label-free performance estimation (kiln.performance) and the retrain preconditions need from training:
        # the score calibration fitted on the holdout, and when and on how many rows this model was trained.
        reference["performance"] = holdout_calibration(spec, holdout[spec.target].to_numpy(), y_pred, log)
        reference["training"] = {"trained_at": time.time(), "train_rows": train.height, "features_version": version_of_data}
        mlflow.log_dict(reference, paths.REFERENCE_ARTIFACT)
        info = trainer.log_model(fitted, holdout.head(5), registered_model_name=spec.name, tags=tags)
    return Trained(version=str(info.registered_model_version), run_id=run.info.run_id, experiment_id=experiment_id,
                   features_version=version_of_data, metrics=metrics, train_rows=train.height, holdout_rows=holdout.height,
                   holdout_scores=y_pred, importances=fitted.predictor.importances(), reference=reference,
                   training=fitted.training, checkpoint=fitted.checkpoint)
