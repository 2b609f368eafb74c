"""`<p>/endpoint`: the bento served over HTTP, with a live smoke test against offline predictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln import settings
from kiln.keys import key
from kiln.spec import PipelineSpec

SMOKE_TOLERANCE = 1e-9


def smoke_test(url: str, rows: list[dict[str, Any]], model_uri: str, spec: PipelineSpec) -> dict[str, Any]:
    """POST rows to the endpoint and compare with offline predictions of the same rows by the same model."""

    import httpx
    import numpy as np

    from kiln.features import compute_features
    from kiln.trainers import load_predictor
    from serving.requests import parse_rows

    key = settings.api_key()  # the platform's own smoke test authenticates like any client
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/predict", json={"rows": rows}, headers=headers, timeout=30)
    response.raise_for_status()
    body = response.json()
    offline = load_predictor(model_uri, spec, num_threads=None).predict(compute_features(parse_rows(rows, spec, len(rows)), spec))
    online = np.asarray(body["predictions"], dtype=float)
    diff = float(np.max(np.abs(online - offline))) if len(online) == len(offline) else float("inf")
    return {"rows": len(rows), "max_abs_diff": diff, "model_version": body.get("model_version"), "status": response.status_code}


def version_check(spec: PipelineSpec, state_root: str) -> Callable[[str, str], None]:
    """The live smoke test of one released version, for ``resources.k8s_apply.endpoint_release``: ``check(version,
    url)`` POSTs the pipeline's sample rows to the version's own Service and raises unless it answers as that version,
    with the offline predictions of ``models:/<p>/<version>`` (:func:`smoke_test`, the same test as the asset check)."""
    from kiln.reference import load_sample_rows

    rows = load_sample_rows(state_root, spec.name)  # read before anything is applied: a missing sample fails at once

    def check(version: str, url: str) -> None:
        try:
            result = smoke_test(url, rows, f"models:/{spec.name}/{version}", spec)
        except Exception as exc:  # noqa: BLE001 - name the Service that did not answer
            raise RuntimeError(f"{url} (version {version}): {type(exc).__name__}: {exc}") from exc
        if result["model_version"] != version or not result["max_abs_diff"] <= SMOKE_TOLERANCE:
            raise RuntimeError(f"{url} (version {version}): served model_version {result['model_version']!r}, "
                               f"max |online - offline| {result['max_abs_diff']:g} (tolerance {SMOKE_TOLERANCE:g})")

    return check


def with_image(bento: dict[str, Any], image: dict[str, Any] | None) -> dict[str, Any]:
    """The bento record plus ``image_ref``, the image `<p>/image` built for this bento (``<ref>`` or ``<ref>@<digest>``;
    the release manifests reference it). No image (local target, or an image of another bento): the bento alone, and
    the manifests name the image by convention (``resources.kubernetes.endpoint_image``)."""
    if not image or not image.get("ref") or str(image.get("bento")) != str(bento["tag"]):
        return bento
    return bento | {"image_ref": str(image["ref"]), "image_id": image.get("id"), "image_digest": image.get("digest")}


def build(spec: PipelineSpec, *, k8s_api: Callable[[], Any] | None = None,
          release_check: Callable[[str, str], None] | None = None) -> list[Any]:
    """The `<p>/endpoint` asset and its live smoke-test check.

    ``k8s_api`` (default ``resources.k8s_apply.dynamic_client``) makes the Kubernetes API client of a prod release and
    ``release_check`` replaces :func:`version_check` (tests pass a fake API and a check; nothing else should)."""
    import dagster as dg

    from assets.stage import asset_args
    from resources import k8s_apply
    from resources.retries import service_retry_policy
    from resources.serving import ServingResource, healthy
    from resources.storage import KilnStorage

    endpoint_key = dg.AssetKey(key(spec.name, "endpoint"))

    @dg.asset(
        **asset_args(spec, "endpoint"),
        ins={"bento": dg.AssetIn(key(spec.name, "bento"), input_manager_key="json_io_manager"),
             "image": dg.AssetIn(key(spec.name, "image"), input_manager_key="json_io_manager")},
        io_manager_key="json_io_manager",
        kinds={"bentoml"},
        required_resource_keys={"serving", "storage", "mlflow"},
        retry_policy=service_retry_policy(),
        description="The served endpoint: URL, model version, bento, health (local: a `bentoml serve` process; prod: a "
                    "Kubernetes release, applied or written for GitOps).",
    )
    def endpoint(context, bento: Any, image: Any = None):
        from kiln.settings import current_profile
        from resources.mlflow import verify_checksum

        verify_checksum(context.resources.mlflow, spec.name, str(bento["model_version"]))  # refuse a changed artifact
        bento = with_image(bento, image)
        # Prod: the release objects (versioned Deployments/Services, stable Service, HTTPRoute) applied through the
        # Kubernetes API (kubernetes) or only written (gitops); KILN_ENDPOINT_TARGET=local: `bentoml serve` below.
        # The release serves the champion only: this step has no challenger bento (canary/shadow need one).
        target = settings.endpoint_target()
        if current_profile() == "prod" and target != "local":
            state_root = context.resources.storage.state_root
            check = None
            if target == "kubernetes":
                check = release_check or version_check(spec, state_root)
            try:
                record = k8s_apply.endpoint_release(spec, bento, state_root, target, check=check,
                                                    api=(k8s_api or k8s_apply.dynamic_client)() if target == "kubernetes" else None)
            except k8s_apply.ReleaseFailed as exc:
                # Nothing applied yet (snapshot) or refused on apply: worth a retry; a rollout or smoke test that failed
                # would fail the same way again.
                raise dg.Failure(description=f"{spec.name}/endpoint: release to Kubernetes failed: {exc}",
                                 metadata={"stage": exc.stage, "restored": exc.restored},
                                 allow_retries=exc.stage in ("snapshot", "apply")) from exc
            return dg.Output(record, metadata={"url": dg.MetadataValue.url(record["url"]), "image": record["image"],
                                               "manifests": record["manifests"], "objects": ", ".join(record["objects"]),
                                               "model_version": record["model_version"], "bento": record["bento"],
                                               "target": target, "release_mode": record["release"]["mode"],
                                               "applied": ", ".join(record["applied"]) or "nothing (gitops)",
                                               "pruned": ", ".join(record["pruned"]) or "nothing"})
        serving: ServingResource = context.resources.serving
        record = serving.deploy(spec.name, bento["tag"], bento["model_tag"], bento["model_version"], spec.serving.port)
        record["healthy"] = healthy(record["url"])
        # the image `<p>/image` built, else the bento itself (`bentoml serve`; serving/images.py flavors it)
        record["image"] = bento.get("image_ref") or record["bento"]
        return dg.Output(
            record,
            metadata={
                "url": dg.MetadataValue.url(record["url"]),
                "model_version": record["model_version"],
                "bento": record["bento"],
                "image": record["image"],
                "pid": record["pid"],
                "healthy": record["healthy"],
                "reused": record["reused"],
            },
        )

    @dg.asset_check(
        asset=endpoint_key,
        name="live_smoke_test",
        blocking=True,
        required_resource_keys={"storage", "mlflow"},
        description="POSTs sample rows and requires predictions equal to offline predictions of the same rows.",
    )
    def live_smoke(context, endpoint: Any):
        from kiln.reference import load_sample_rows

        storage: KilnStorage = context.resources.storage
        context.resources.mlflow.client()  # a check runs in its own process under dagster dev: point MLflow at the registry
        rows = load_sample_rows(storage.state_root, spec.name)
        result = smoke_test(endpoint["url"], rows, f"models:/{spec.name}/{endpoint['model_version']}", spec)
        passed = result["max_abs_diff"] <= SMOKE_TOLERANCE and result["model_version"] == endpoint["model_version"]
        return dg.AssetCheckResult(passed=passed, metadata=result | {"url": endpoint["url"]})

    return [endpoint, live_smoke]
