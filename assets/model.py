"""`<p>/model`: train a challenger, track it in MLflow and register a new model version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import lightgbm as lgb
    import numpy as np
    import polars as pl

BOOST_ROUNDS_KEY = "num_boost_round"
REFERENCE_ROWS = 100_000  # rows profiled for the drift reference (a systematic sample beyond that)
SMALL_FRAME_ROWS = 4096  # matrix() of up to this many rows is filled on the calling thread


def matrix(frame: pl.DataFrame, spec: PipelineSpec) -> np.ndarray:
    """Features as a float matrix in the spec's order (nulls become NaN, LightGBM's missing)."""
    import numpy as np
    import polars as pl

    from kiln.features import feature_columns

    cols = feature_columns(spec, frame)
    if cols == frame.columns and all(dtype.is_numeric() for dtype in frame.dtypes):
        # Already the features in order (compute_features' output): numpy's cast of the whole frame is the same
        # float64 matrix, nulls as NaN, ~8x cheaper than a polars select per call (serving calls this per batch).
        if frame.height > SMALL_FRAME_ROWS:
            return frame.to_numpy().astype(np.float64, copy=False)
        # A served batch of a few rows: filled column by column on this thread (the same values; the frame's
        # to_numpy hands the columns to polars' thread pool, whose wake-ups cost more than the copy).
        out = np.empty((frame.height, frame.width), dtype=np.float64)
        for i, column in enumerate(frame.iter_columns()):
            out[:, i] = column.to_numpy()
        return out
    return frame.select([pl.col(c).cast(pl.Float64) for c in cols]).to_numpy()


def train_lightgbm(train: pl.DataFrame, spec: PipelineSpec) -> lgb.Booster:
    """Fit a LightGBM booster on the training rows, categoricals declared as such."""
    import lightgbm as lgb

    from kiln.features import feature_columns

    params = dict(spec.trainer.params)
    rounds = int(params.pop(BOOST_ROUNDS_KEY, 200))
    objective = "binary" if spec.task == "classification" else "regression"
    params = {"objective": objective, "verbosity": -1, "num_threads": 0, "deterministic": True, **params}
    names = feature_columns(spec, train)
    dataset = lgb.Dataset(
        matrix(train, spec),
        label=train[spec.target].cast(float).to_numpy(),
        feature_name=names,
        categorical_feature=[n for n in names if n in spec.features.categorical],
        free_raw_data=True,
    )
    return lgb.train(params, dataset, num_boost_round=rounds)


def predict(booster: lgb.Booster, frame: pl.DataFrame, spec: PipelineSpec) -> np.ndarray:
    """Positive-class probability (classification) or value (regression) for featurized rows."""
    return booster.predict(matrix(frame, spec), num_threads=0)  # type: ignore[return-value]  # a 1-d array for one model


def load_booster(model_uri: str) -> lgb.Booster:
    """Load a registered LightGBM model from MLflow as a native booster."""
    import mlflow.lightgbm

    return mlflow.lightgbm.load_model(model_uri)


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/model` asset."""
    import dagster as dg

    from kiln import steps as k8s
    from resources.mlflow import MlflowResource
    from resources.retries import service_retry_policy

    @dg.asset(
        key=key(spec.name, "model"),
        group_name=spec.name,
        ins={"features": dg.AssetIn(key(spec.name, "features"))},
        io_manager_key="json_io_manager",
        kinds={spec.trainer.kind, "mlflow"},
        op_tags={"kiln/trainer": spec.trainer.kind, **k8s.op_tags(spec, "model")},
        pool=k8s.pool(spec, "model"),
        required_resource_keys={"mlflow", "storage"},
        retry_policy=service_retry_policy(),
        description=f"A {spec.trainer.kind} challenger, tracked and registered in MLflow as '{spec.name}'.",
    )
    def model(context, features: Any):
        mlflow: MlflowResource = context.resources.mlflow
        import mlflow as mlf
        import polars as pl
        from mlflow.models import infer_signature

        from assets import report
        from assets.champion import score, split_holdout
        from kiln.features import data_version, feature_columns
        from resources.mlflow import discard, registered_by_step

        done, partial = registered_by_step(mlflow, spec.name, context.run_id, "model")  # a retried step: reuse, never re-register
        for ancestor in ancestor_run_ids(context):  # a re-execution cleans up what a killed step of its parent left
            partial += registered_by_step(mlflow, spec.name, ancestor, "model")[1]
        discard(mlflow, spec.name, partial)
        if done is not None:
            context.log.info(f"reusing model version {done.version} registered by this run before the retry")
            return reused(mlflow, spec, done)
        if spec.trainer.kind == "torch":
            from assets.train_torch import train_and_register

            return report.attach(train_and_register(context, features, spec, mlflow, context.resources.storage), spec, features, mlflow)
        if spec.trainer.kind != "lightgbm":
            raise NotImplementedError(f"{spec.name}: trainer.kind '{spec.trainer.kind}' is not available yet")
        train, holdout = split_holdout(features, spec)
        experiment_id = mlflow.experiment_id(spec.name)
        version_of_data = data_version(features)
        tags = {
            "dagster_run_id": context.run_id,
            "features_data_version": version_of_data,
            "kiln_pipeline": spec.name,
        }
        with mlf.start_run(experiment_id=experiment_id, tags=tags) as run:
            booster = train_lightgbm(train, spec)
            y_pred = predict(booster, holdout, spec)
            y_true = holdout[spec.target].to_numpy()
            metrics = {m: score(m, y_true, y_pred) for m in _metrics(spec)}
            mlf.log_params({**spec.trainer.params, "train_rows": train.height, "holdout_rows": holdout.height})
            mlf.log_metrics(metrics)
            mlf.log_dict(spec.model_dump(mode="json", by_alias=True), "kiln/spec.json")
            from assets.drift_report import REFERENCE_ARTIFACT, reference_table, training_reference

            # Drift is judged against this model's own training data and prediction scores, stored with the version. Every
            # k-th row (spread over the whole time range, so daily cycles stay intact) bins like all rows at a fraction of the cost.
            sample = features.gather_every(max(1, -(-features.height // REFERENCE_ROWS)))
            drift_reference = training_reference(spec, sample, predict(booster, sample, spec))
            mlf.log_dict(drift_reference, REFERENCE_ARTIFACT)
            # The booster sees floats (NaN for missing), so the signature says so too.
            example = holdout.head(5).select([pl.col(c).cast(pl.Float64) for c in feature_columns(spec, holdout)]).to_pandas()
            info = mlf.lightgbm.log_model(
                booster,
                name="model",
                signature=infer_signature(example, predict(booster, holdout.head(5), spec)),
                input_example=example,
                registered_model_name=spec.name,
                tags=tags,
                # Explicit requirements: MLflow's inference runs a subprocess that costs seconds per retrain.
                pip_requirements=[f"lightgbm=={lgb_version()}", f"mlflow=={mlf.__version__}"],
            )
        version = str(info.registered_model_version)
        record = complete_registration(mlflow, spec, version, run.info.run_id, context.run_id, metrics, version_of_data,
                                       train.height, holdout.height)
        return report.attach(dg.Output(
            record,
            metadata={
                "model_version": version,
                "mlflow_run_id": run.info.run_id,
                "mlflow_run": run_link(mlflow.tracking_uri, experiment_id, run.info.run_id),
                "features_data_version": version_of_data,
                **{f"metric/{k}": v for k, v in metrics.items()},
                "train_rows": train.height,
                "holdout_rows": holdout.height,
                "drift_reference": reference_table(drift_reference),
            },
        ), spec, features, mlflow, holdout_scores=y_pred, gains=booster.feature_importance("gain"))

    return model


def ancestor_run_ids(context: Any, limit: int = 50) -> list[str]:
    """The runs this run re-executes, parent first up to the root (empty for a fresh run)."""
    ids: list[str] = []
    run = context.dagster_run
    while run is not None and run.parent_run_id and len(ids) < limit:
        ids.append(run.parent_run_id)
        run = context.instance.get_run_by_id(run.parent_run_id)
    return ids


def reused(mlflow: Any, spec: PipelineSpec, version: Any) -> Any:
    """The `model` output for a version this run registered in an earlier attempt (metrics from its MLflow run)."""
    import dagster as dg

    run = mlflow.client().get_run(version.run_id)
    metrics = dict(run.data.metrics)
    record = {
        "version": str(version.version),
        "run_id": version.run_id,
        "model_uri": f"models:/{spec.name}/{version.version}",
        "metric": spec.evaluation.metric,
        "score": metrics.get(spec.evaluation.metric),
        "metrics": metrics,
        "features_data_version": version.tags.get("features_data_version"),
        "train_rows": int(run.data.params.get("train_rows", 0)),
        "holdout_rows": int(run.data.params.get("holdout_rows", 0)),
    }
    return dg.Output(record, metadata={"model_version": record["version"], "mlflow_run_id": version.run_id, "reused": True})


def complete_registration(mlflow: Any, spec: PipelineSpec, version: str, mlflow_run_id: str, dagster_run_id: str,
                          metrics: dict[str, float], version_of_data: str, train_rows: int, holdout_rows: int) -> dict[str, Any]:
    """Tag a freshly registered version (Dagster run, data version, step), record its checksum last (the tag marks the
    registration complete) and return the `<p>/model` record; shared by every trainer."""
    from resources.mlflow import STEP_TAG, record_checksum

    client = mlflow.client()
    client.set_model_version_tag(spec.name, version, "dagster_run_id", dagster_run_id)
    client.set_model_version_tag(spec.name, version, "features_data_version", version_of_data)
    client.set_model_version_tag(spec.name, version, STEP_TAG, "model")
    record_checksum(mlflow, spec.name, version)
    return {
        "version": version,
        "run_id": mlflow_run_id,
        "model_uri": f"models:/{spec.name}/{version}",
        "metric": spec.evaluation.metric,
        "score": metrics[spec.evaluation.metric],
        "metrics": metrics,
        "features_data_version": version_of_data,
        "train_rows": train_rows,
        "holdout_rows": holdout_rows,
    }


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> Any:
    """A clickable link to the MLflow run on a tracking server; the run URI for a local SQLite store (no UI to link)."""
    import dagster as dg

    if tracking_uri.startswith(("http://", "https://")):
        return dg.MetadataValue.url(f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
    return dg.MetadataValue.text(f"runs:/{run_id} (open with `mlflow ui --backend-store-uri {tracking_uri}`)")


def lgb_version() -> str:
    import lightgbm as lgb

    return str(lgb.__version__)


def _metrics(spec: PipelineSpec) -> list[str]:
    base = ["roc_auc", "average_precision", "log_loss"] if spec.task == "classification" else ["rmse", "mae", "r2"]
    return base if spec.evaluation.metric in base else [*base, spec.evaluation.metric]
