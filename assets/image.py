"""`<p>/image`: the serving image containerized from the bento (id and digest), or a record that none was built.

Per ``KILN_ENDPOINT_TARGET`` and profile (:func:`image_mode`): ``container`` builds the image locally (buildah, see
``resources/containers.py``); the prod profile's ``kubernetes`` and ``gitops`` targets build it in the step's own pod
and push it to ``KILN_IMAGE_REGISTRY``; anything else (the local default: ``bentoml serve`` of the bento) records that
no image was built, so the local lifecycle stays fast. GPU bentos are not built here (no CUDA base without a registry).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import settings
from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg

MODES = ("none", "build", "push")


def image_mode(profile: str, target: str) -> str:
    """``build`` (local image), ``push`` (build, then push to the registry) or ``none`` for a profile and endpoint target."""
    if target == "container":
        return "build"
    if profile == "prod" and target in ("kubernetes", "gitops"):
        return "push"
    return "none"


def not_built(bento: dict[str, Any], reason: str) -> dict[str, Any]:
    """The record of a step that built nothing: the endpoint serves the bento itself (or an image named by convention)."""
    return {"image": "none", "built": False, "reason": reason, "bento": str(bento["tag"]),
            "model_version": str(bento["model_version"]), "id": None, "digest": None, "ref": None}


def bento_files(bentoml: Any, bento: dict[str, Any]) -> tuple[Path, dict[str, Path]]:
    """The bento's folder and its models' folders in the BentoML store; a bento only exported (prod: another step's
    pod built it) is imported from ``export_uri`` first."""
    try:
        built = bentoml.bentos.get(bento["tag"])
    except bentoml.exceptions.NotFound:
        if not bento.get("export_uri"):
            raise
        import tempfile

        from resources.storage import storage_path

        with tempfile.TemporaryDirectory(prefix="kiln-bento-import-") as tmp:
            local = Path(tmp) / "bento.bento"
            local.write_bytes(storage_path(str(bento["export_uri"])).read_bytes())
            built = bentoml.bentos.import_bento(str(local))
    models = {str(m.tag): Path(bentoml.models.get(m.tag).path) for m in built.info.models}
    return Path(built.path), models


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/image` asset."""
    import dagster as dg

    from assets.stage import asset_args
    from resources.retries import service_retry_policy

    @dg.asset(
        **asset_args(spec, "image"),
        ins={"bento": dg.AssetIn(key(spec.name, "bento"), input_manager_key="json_io_manager")},
        io_manager_key="json_io_manager",
        kinds={"podman"},
        required_resource_keys={"serving"},
        retry_policy=service_retry_policy(),
        description="The serving image built from the bento with buildah (id, digest; pushed to KILN_IMAGE_REGISTRY in "
                    "prod), or a record that none was built (local target: the endpoint serves the bento itself).",
    )
    def image(context, bento: Any):
        from resources import containers
        from resources.kubernetes import endpoint_image
        from serving.images import image_flavor, local_image

        profile, target = settings.current_profile(), settings.endpoint_target()
        mode = image_mode(profile, target)
        if mode == "none":
            record = not_built(bento, f"KILN_ENDPOINT_TARGET={target} in the {profile} profile serves the bento with "
                                      "`bentoml serve`; set KILN_ENDPOINT_TARGET=container to build the image")
        elif image_flavor(spec) == "gpu":
            raise dg.Failure(description=f"{spec.name}/image: GPU serving images are defined (serving/images.py) but not "
                                         "built by Kiln: build it from the bento's Dockerfile where a CUDA base image is reachable")
        else:
            bento_path, models = bento_files(context.resources.serving.bentoml(), bento)
            name = local_image(str(bento["tag"]))
            labels = {"kiln.pipeline": spec.name, "kiln.bento": str(bento["tag"]),
                      "kiln.model_version": str(bento["model_version"])}
            try:
                built = containers.build_image(bento_path, models, name, str(bento["model_tag"]), labels=labels)
                ref, pushed = name, None
                if mode == "push":
                    ref = endpoint_image(spec, str(bento["tag"]))
                    pushed = containers.push_image(name, ref)
            except containers.ContainerError as exc:
                raise dg.Failure(description=f"{spec.name}/image: {exc}") from exc
            record = {"image": name, "built": not built["reused"], "reason": f"KILN_ENDPOINT_TARGET={target} ({profile})",
                      "bento": str(bento["tag"]), "model_version": str(bento["model_version"]), "id": built["id"],
                      "digest": pushed or built["digest"], "ref": f"{ref}@{pushed}" if pushed else ref, "base": built["base"],
                      "seconds": round(built["seconds"], 1), "pushed": bool(pushed)}
            context.log.info(f"image {record['ref']} ({'built' if record['built'] else 'reused'}, id {built['id'][:12]})")
        return dg.Output(record, metadata={
            "image": record["image"], "built": record["built"], "reason": record["reason"], "bento": record["bento"],
            **({"id": record["id"], "digest": record["digest"], "ref": record["ref"], "seconds": record["seconds"]}
               if record["id"] else {}),
        })

    return image
