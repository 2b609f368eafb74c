"""`<p>/bento`: a BentoML bento (the serving image definition) built from the champion model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg

SERVICE = "serving.service:KilnService"
# The bento carries the serving runtime and the core it imports (the same feature code as training), nothing else.
INCLUDE = ["kiln/**/*.py", "serving/*.py"]


def project_root() -> Path:
    """The folder holding Kiln's packages."""
    return Path(__file__).resolve().parent.parent


def build_context(into: Path) -> Path:
    """Copy the files the bento carries (``INCLUDE``) into a fresh folder and return it as the build context.

    BentoML walks its whole build context before filtering; the project folder also holds the virtualenv, Dagster
    and Kiln state (tens of thousands of files), or is site-packages itself when Kiln is installed.
    """
    import shutil

    root = project_root()
    for pattern in INCLUDE:
        for source in root.glob(pattern):
            target = into / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


def labels_for(spec: PipelineSpec, champion: dict[str, Any], client: Any) -> dict[str, str]:
    """Labels that tie a bento to its MLflow model version, runs and training data."""
    version = client.get_model_version(spec.name, champion["version"])
    return {
        "pipeline": spec.name,
        "mlflow_model_version": str(champion["version"]),
        "mlflow_run_id": str(champion["run_id"]),
        "dagster_run_id": str(version.tags.get("dagster_run_id", "")),
        "features_data_version": str(version.tags.get("features_data_version", "")),
    }


def export_key(pipeline: str, tag: str) -> str:
    """Where a bento goes under the bento root: ``bentos/<p>/<name>-<version>.bento`` (no ':' in object keys)."""
    return f"bentos/{pipeline}/{tag.replace(':', '-')}.bento"


def export_bento(bentoml: Any, tag: str, pipeline: str, bento_root: str) -> dict[str, Any]:
    """Export a bento to ``<bento_root>/bentos/<p>/`` for image builds (once per tag); returns its URI, sha256 and size."""
    import hashlib
    import tempfile

    from resources.storage import storage_path, stored_sha256, upload_file

    dest = storage_path(bento_root) / export_key(pipeline, tag)
    uri = str(dest)
    recorded = stored_sha256(dest)
    if recorded:  # already exported (a reused bento): the object and its checksum stand
        return {"uri": uri, "sha256": recorded, "bytes": dest.stat().st_size, "reused": True}
    with tempfile.TemporaryDirectory(prefix="kiln-bento-") as tmp:
        local = Path(bentoml.bentos.export_bento(tag, str(Path(tmp) / "bento.bento")))
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        upload_file(local, dest, digest)
        return {"uri": uri, "sha256": digest, "bytes": local.stat().st_size, "reused": False}


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/bento` asset."""
    import dagster as dg

    from assets.stage import asset_args
    from resources.mlflow import MlflowResource
    from resources.retries import service_retry_policy
    from resources.serving import ServingResource

    @dg.asset(
        **asset_args(spec, "bento"),
        ins={"champion": dg.AssetIn(key(spec.name, "champion"), input_manager_key="json_io_manager")},
        io_manager_key="json_io_manager",
        kinds={"bentoml"},
        required_resource_keys={"mlflow", "serving", "storage"},
        retry_policy=service_retry_policy(),
        description="BentoML bento built from models:/<p>@champion; labels carry model version and MLflow run id.",
    )
    def bento(context, champion: Any):
        import tempfile

        mlflow: MlflowResource = context.resources.mlflow
        serving: ServingResource = context.resources.serving
        client = mlflow.client()
        bentoml = serving.bentoml()
        import yaml

        from resources.mlflow import verify_checksum
        from serving.images import build_options, image_flavor

        verify_checksum(mlflow, spec.name, str(champion["version"]))  # never build from a changed artifact
        labels = labels_for(spec, champion, client)
        existing = [
            b for b in bentoml.bentos.list()
            if b.tag.name == f"kiln-{spec.name}" and b.info.labels.get("mlflow_model_version") == labels["mlflow_model_version"]
        ]
        if existing:
            built = existing[0]
            model_tag = built.info.labels["bento_model"]
            context.log.info(f"reusing bento {built.tag} for model version {labels['mlflow_model_version']}")
        else:
            model = bentoml.mlflow.import_model(
                spec.name,
                model_uri=f"models:/{spec.name}/{champion['version']}",
                labels=labels,
                metadata={"kiln_spec": spec.to_json()},
            )
            model_tag = str(model.tag)
            with tempfile.TemporaryDirectory(prefix="kiln-bento-ctx-") as ctx:
                # A bentofile, BentoML's documented build config: its `envs` become the bento's and its image's
                # environment (bentoml.bentos.build takes envs only as objects from BentoML's private modules).
                bentofile = Path(ctx) / "bentofile.yaml"  # not in INCLUDE: BentoML writes the bento's own copy
                bentofile.write_text(yaml.safe_dump({
                    "service": SERVICE,
                    "description": f"Kiln endpoint for pipeline {spec.name}",
                    "include": INCLUDE,
                    "envs": [{"name": "KILN_MODEL_TAG", "value": model_tag}],
                    **build_options(spec),  # CPU or GPU (CUDA + torch) image, from the spec
                    "models": [model_tag],
                }))
                built = bentoml.bentos.build_bentofile(
                    str(bentofile),
                    name=f"kiln-{spec.name}",
                    labels=labels | {"bento_model": model_tag},
                    build_ctx=str(build_context(Path(ctx))),
                )
        record = {
            "tag": str(built.tag),
            "model_tag": model_tag,
            "model_version": labels["mlflow_model_version"],
            "labels": dict(built.info.labels),
            "path": str(built.path),
            "image": image_flavor(spec),
        }
        exported: dict[str, Any] = {}
        bento_root = context.resources.storage.bento_root
        if bento_root:  # prod: image builds (bentoml containerize, CI) fetch the bento from the object store
            exported = export_bento(bentoml, record["tag"], spec.name, bento_root)
            record |= {"export_uri": exported["uri"], "export_sha256": exported["sha256"]}
            context.log.info(f"bento {record['tag']} at {exported['uri']} ({exported['bytes']} bytes)")
        return dg.Output(
            record,
            metadata={"bento": record["tag"], "bento_model": model_tag, "image": record["image"],
                      **{f"label/{k}": v for k, v in labels.items()},
                      **({"export_uri": dg.MetadataValue.path(exported["uri"]), "export_sha256": exported["sha256"],
                          "export_bytes": exported["bytes"]} if exported else {})},
        )

    return bento
