"""`<p>/model`: train a challenger with the spec's trainer (kiln.trainers), track it in MLflow, register a new version."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg

    from kiln.report import Report
    from kiln.trainers.tracking import Trained


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/model` asset."""
    import dagster as dg

    from assets.stage import asset_args
    from kiln import paths
    from resources.mlflow import MlflowResource
    from resources.retries import service_retry_policy

    @dg.asset(
        **asset_args(spec, "model", **{paths.TRAINER_OP_TAG: spec.trainer.kind}),
        ins={"features": dg.AssetIn(key(spec.name, "features"))},
        io_manager_key="json_io_manager",
        kinds={spec.trainer.kind, "mlflow"},
        required_resource_keys={"mlflow", "storage"},
        retry_policy=service_retry_policy(),
        description=f"A {spec.trainer.kind} challenger, tracked and registered in MLflow as '{spec.name}'.",
    )
    def model(context, features: Any):
        mlflow: MlflowResource = context.resources.mlflow
        from assets.metadata import reference_table
        from kiln import report
        from kiln.trainers.tracking import train_and_log
        from resources.mlflow import discard, registered_by_step

        done, partial = registered_by_step(mlflow, spec.name, context.run_id, "model")  # a retried step: reuse, never re-register
        for ancestor in ancestor_run_ids(context):  # a re-execution cleans up what a killed step of its parent left
            partial += registered_by_step(mlflow, spec.name, ancestor, "model")[1]
        discard(mlflow, spec.name, partial)
        if done is not None:
            context.log.info(f"reusing model version {done.version} registered by this run before the retry")
            return reused(mlflow, spec, done)
        experiment_id = mlflow.experiment_id(spec.name)
        trained = train_and_log(spec, features, experiment_id, context.run_id, context.resources.storage.state_root, context.log.info)
        record = complete_registration(mlflow, spec, trained, context.run_id)
        trained.release()
        champion = champion_summary(mlflow, spec, record)
        rendered = report.render(spec, record, features, trained.holdout_scores, trained.importances, champion)
        report.log_report(mlflow.client(), trained.run_id, rendered)
        return dg.Output(record, metadata={
            "model_version": trained.version,
            "mlflow_run_id": trained.run_id,
            "mlflow_run": run_link(mlflow.tracking_uri, experiment_id, trained.run_id),
            "features_data_version": trained.features_version,
            **{f"metric/{k}": v for k, v in trained.metrics.items()},
            "train_rows": trained.train_rows,
            "holdout_rows": trained.holdout_rows,
            **{f"training/{k}": v for k, v in trained.training.items()},
            **({"checkpoint": str(trained.checkpoint)} if trained.checkpoint else {}),
            "drift_reference": reference_table(trained.reference),
            **report_metadata(rendered),
        })

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

    from kiln import paths

    run = mlflow.client().get_run(version.run_id)
    metrics = dict(run.data.metrics)
    record = {
        "version": str(version.version),
        "run_id": version.run_id,
        "model_uri": f"models:/{spec.name}/{version.version}",
        "metric": spec.evaluation.metric,
        "score": metrics.get(spec.evaluation.metric),
        "metrics": metrics,
        "features_data_version": version.tags.get(paths.FEATURES_VERSION_TAG),
        "train_rows": int(run.data.params.get("train_rows", 0)),
        "holdout_rows": int(run.data.params.get("holdout_rows", 0)),
    }
    return dg.Output(record, metadata={"model_version": record["version"], "mlflow_run_id": version.run_id, "reused": True})


def complete_registration(mlflow: Any, spec: PipelineSpec, trained: Trained, dagster_run_id: str) -> dict[str, Any]:
    """Tag a freshly registered version (Dagster run, data version, step), record its checksum last (the tag marks the
    registration complete) and return the `<p>/model` record."""
    from kiln import paths
    from resources.mlflow import record_checksum

    client = mlflow.client()
    client.set_model_version_tag(spec.name, trained.version, paths.DAGSTER_RUN_TAG, dagster_run_id)
    client.set_model_version_tag(spec.name, trained.version, paths.FEATURES_VERSION_TAG, trained.features_version)
    client.set_model_version_tag(spec.name, trained.version, paths.STEP_TAG, "model")
    record_checksum(mlflow, spec.name, trained.version)
    return {
        "version": trained.version,
        "run_id": trained.run_id,
        "model_uri": f"models:/{spec.name}/{trained.version}",
        "metric": spec.evaluation.metric,
        "score": trained.metrics[spec.evaluation.metric],
        "metrics": trained.metrics,
        "features_data_version": trained.features_version,
        "train_rows": trained.train_rows,
        "holdout_rows": trained.holdout_rows,
        **({"training": trained.training} if trained.training else {}),
    }


def champion_summary(mlflow: Any, spec: PipelineSpec, record: dict[str, Any]) -> dict[str, Any] | None:
    """The current champion's version and training-run metrics, for the model card (None if this is the first model)."""
    current = mlflow.champion(spec.name)
    if current is None or str(current.version) == record["version"]:
        return None
    return {"version": str(current.version), "metrics": dict(mlflow.client().get_run(current.run_id).data.metrics)}


def report_metadata(rendered: Report) -> dict[str, Any]:
    """The model card and plots as metadata the Dagster UI renders (markdown with inline PNGs)."""
    import dagster as dg

    from assets.metadata import inline_png

    return {
        "model_card": dg.MetadataValue.md(rendered.card),
        **{f"plot/{name}": dg.MetadataValue.md(inline_png(name, data)) for name, data in rendered.images.items()},
        "report_artifacts": dg.MetadataValue.text(", ".join(rendered.artifacts)),
    }


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> Any:
    """A clickable link to the MLflow run on a tracking server; the run URI for a local SQLite store (no UI to link)."""
    import dagster as dg

    if tracking_uri.startswith(("http://", "https://")):
        return dg.MetadataValue.url(f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
    return dg.MetadataValue.text(f"runs:/{run_id} (open with `mlflow ui --backend-store-uri {tracking_uri}`)")
