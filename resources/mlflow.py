"""MLflow tracking and registry, configured per profile (SQLite locally, a tracking server in prod)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dagster as dg

from kiln.paths import CHAMPION_ALIAS, CHECKSUM_TAG, STEP_TAG  # noqa: F401  (named once in kiln/paths.py)

if TYPE_CHECKING:
    from mlflow import MlflowClient


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


# ---------------------------------------------------------------------------- integrity and idempotent registration

class ChecksumMismatch(RuntimeError):
    """A registered model's artifact no longer matches the checksum recorded at registration."""


def artifact_sha256(model_uri: str) -> str:
    """sha256 over every file of a model artifact (relative path and bytes, in path order), downloaded from the registry."""
    import hashlib
    import tempfile
    from pathlib import Path

    import mlflow

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="kiln-sha-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(root)).encode() + b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()


def record_checksum(mlflow: MlflowResource, name: str, version: str) -> str:
    """Compute the artifact's sha256 and store it as the version tag ``kiln_sha256`` (marks the registration complete)."""
    checksum = artifact_sha256(f"models:/{name}/{version}")
    mlflow.client().set_model_version_tag(name, str(version), CHECKSUM_TAG, checksum)
    return checksum


def verify_checksum(mlflow: MlflowResource, name: str, version: str) -> str:
    """Refuse a model version whose artifact differs from the checksum recorded at registration."""
    recorded = mlflow.client().get_model_version(name, str(version)).tags.get(CHECKSUM_TAG)
    if not recorded:
        raise ChecksumMismatch(f"models:/{name}/{version}: no '{CHECKSUM_TAG}' tag; the registration never completed")
    try:
        actual = artifact_sha256(f"models:/{name}/{version}")
    except Exception as exc:  # an unreadable artifact is as bad as a changed one
        raise ChecksumMismatch(f"models:/{name}/{version}: artifact unreadable ({type(exc).__name__}: {exc})") from exc
    if actual != recorded:
        raise ChecksumMismatch(f"models:/{name}/{version}: artifact sha256 {actual[:12]} != recorded {recorded[:12]}; refusing it")
    return actual


def registered_by_step(mlflow: MlflowResource, name: str, run_id: str, step: str) -> tuple[Any | None, list[Any]]:
    """Versions this Dagster run + step registered before (a retried step): (a complete one or None, incomplete ones)."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.client().search_model_versions(f"name='{name}' and tags.dagster_run_id='{run_id}'")
    except MlflowException:
        return None, []
    mine = [v for v in found if v.tags.get(STEP_TAG, step) == step]
    complete = [v for v in mine if v.tags.get(CHECKSUM_TAG)]
    return (complete[0] if complete else None), [v for v in mine if not v.tags.get(CHECKSUM_TAG)]


def discard(mlflow: MlflowResource, name: str, versions: list[Any]) -> None:
    """Delete half-registered versions (no checksum tag) a failed attempt left behind; they never held an alias."""
    client = mlflow.client()
    for v in versions:
        if not getattr(v, "aliases", None):
            client.delete_model_version(name, str(v.version))
