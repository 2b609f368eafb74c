"""MLflow tracking and registry, configured per profile (SQLite locally, a tracking server in prod)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION_ALIAS = "champion"


class MlflowResource(dg.ConfigurableResource):
    """A small replacement for dagster-mlflow: points the MLflow client at the profile's servers."""

    tracking_uri: str
    artifact_root: str | None = None

    def client(self) -> MlflowClient:
        """Set the process-wide tracking/registry URI and return a client bound to it."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self, pipeline: str) -> str:
        """The pipeline's experiment (``kiln/<p>``), created with an explicit artifact location."""
        client = self.client()
        name = f"kiln/{pipeline}"
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = f"{self.artifact_root.rstrip('/')}/{pipeline}" if self.artifact_root else None
        return str(client.create_experiment(name, artifact_location=location))

    def champion(self, pipeline: str) -> Any | None:
        """The model version holding the ``champion`` alias, or None before the first promotion."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(pipeline, CHAMPION_ALIAS)
        except MlflowException:
            return None
