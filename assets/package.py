"""`<p>/bento`: a BentoML bento (the serving image definition) built from the champion model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from assets.keys import key
from platform_defs.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg

SERVICE = "serving.service:KilnService"
# The bento carries Kiln's own modules so the container serves with the same feature code.
INCLUDE = ["serving/*.py", "assets/*.py", "platform_defs/*.py", "platform_defs/simulators/*.py"]
SERVING_PACKAGES = ["lightgbm>=4,<5", "polars>=1", "pyarrow>=14", "numpy>=1.26", "pydantic>=2.6,<3", "pyyaml>=6", "orjson>=3.9",
                    "httptools>=0.6"]


def project_root() -> Path:
    """The folder holding Kiln's packages (the bento build context)."""
    return Path(__file__).resolve().parent.parent


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


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/bento` asset."""
    import dagster as dg

    from platform_defs import k8s
    from resources.mlflow import MlflowResource
    from resources.retries import service_retry_policy
    from resources.serving import ServingResource

    @dg.asset(
        key=key(spec.name, "bento"),
        group_name=spec.name,
        op_tags=k8s.op_tags(spec, "bento"),
        pool=k8s.pool(spec, "bento"),
        ins={"champion": dg.AssetIn(key(spec.name, "champion"), input_manager_key="json_io_manager")},
        io_manager_key="json_io_manager",
        kinds={"bentoml"},
        required_resource_keys={"mlflow", "serving"},
        retry_policy=service_retry_policy(),
        description="BentoML bento built from models:/<p>@champion; labels carry model version and MLflow run id.",
    )
    def bento(context, champion: Any):
        mlflow: MlflowResource = context.resources.mlflow
        serving: ServingResource = context.resources.serving
        client = mlflow.client()
        bentoml = serving.bentoml()
        from bentoml._internal.bento.build_config import BentoEnvSchema

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
            built = bentoml.bentos.build(
                SERVICE,
                name=f"kiln-{spec.name}",
                labels=labels | {"bento_model": model_tag},
                description=f"Kiln endpoint for pipeline {spec.name}",
                include=INCLUDE,
                envs=[BentoEnvSchema(name="KILN_MODEL_TAG", value=model_tag)],
                **build_options(spec),  # CPU or GPU (CUDA + torch) image, from the spec
                models=[model_tag],
                build_ctx=str(project_root()),
            )
        record = {
            "tag": str(built.tag),
            "model_tag": model_tag,
            "model_version": labels["mlflow_model_version"],
            "labels": dict(built.info.labels),
            "path": str(built.path),
            "image": image_flavor(spec),
        }
        return dg.Output(
            record,
            metadata={"bento": record["tag"], "bento_model": model_tag, "image": record["image"],
                      **{f"label/{k}": v for k, v in labels.items()}},
        )

    return bento
