"""`<p>/endpoint`: the bento served over HTTP, with a live smoke test against offline predictions."""

from __future__ import annotations

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


def build(spec: PipelineSpec) -> list[Any]:
    """The `<p>/endpoint` asset and its live smoke-test check."""
    import dagster as dg

    from assets.stage import asset_args
    from resources import kubernetes
    from resources.retries import service_retry_policy
    from resources.serving import ServingResource, healthy
    from resources.storage import KilnStorage

    endpoint_key = dg.AssetKey(key(spec.name, "endpoint"))

    @dg.asset(
        **asset_args(spec, "endpoint"),
        ins={"bento": dg.AssetIn(key(spec.name, "bento"), input_manager_key="json_io_manager")},
        io_manager_key="json_io_manager",
        kinds={"bentoml"},
        required_resource_keys={"serving", "storage", "mlflow"},
        retry_policy=service_retry_policy(),
        description="The served endpoint: URL, model version, bento, health (local: a `bentoml serve` process).",
    )
    def endpoint(context, bento: Any):
        from kiln.settings import current_profile
        from resources.mlflow import verify_checksum

        verify_checksum(context.resources.mlflow, spec.name, str(bento["model_version"]))  # refuse a changed artifact
        # Kubernetes: render and record the Deployment + Service, no local process (KILN_ENDPOINT_TARGET=local: `bentoml serve`)
        if current_profile() == "prod" and settings.endpoint_target() != "local":
            record = kubernetes.endpoint_record(spec, bento, context.resources.storage.state_root)
            return dg.Output(record, metadata={"url": dg.MetadataValue.url(record["url"]), "image": record["image"],
                                               "manifests": record["manifests"], "objects": ", ".join(record["objects"]),
                                               "model_version": record["model_version"], "bento": record["bento"]})
        serving: ServingResource = context.resources.serving
        record = serving.deploy(spec.name, bento["tag"], bento["model_tag"], bento["model_version"], spec.serving.port)
        record["healthy"] = healthy(record["url"])
        return dg.Output(
            record,
            metadata={
                "url": dg.MetadataValue.url(record["url"]),
                "model_version": record["model_version"],
                "bento": record["bento"],
                "image": record["bento"],  # locally the bento is the image definition (serving/images.py flavors it)
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
