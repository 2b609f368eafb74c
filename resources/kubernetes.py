"""Kubernetes objects of the prod endpoint: a Deployment and a Service per pipeline, rendered from its spec.

`<p>/endpoint` writes them in the prod profile; `platform_defs/k8s.py` renders and validates them offline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiln import paths, settings
from kiln.spec import PipelineSpec
from kiln.steps import k8s_config

SERVING_PORT = 3000  # BentoML's port inside the image
BENTO_UID = 1034  # the non-root `bentoml` user of BentoML's generated Dockerfile


def serialize(obj: Any) -> dict[str, Any]:
    """A kubernetes client model as the JSON the API server receives (camelCase, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def endpoint_name(spec: PipelineSpec) -> str:
    """The Deployment/Service name of a pipeline's endpoint (DNS-1035: no underscores)."""
    return f"kiln-{spec.name.replace('_', '-')}"


def endpoint_image(spec: PipelineSpec, bento_tag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The containerized bento: ``$KILN_IMAGE_REGISTRY/<bento name>:<bento version>``."""
    registry = settings.image_registry(env)
    tag = bento_tag or f"kiln-{spec.name}:{settings.image_tag(env)}"
    return f"{registry}/{tag.lower()}"


def endpoint_manifests(spec: PipelineSpec, image: str, namespace: str | None = None, model_version: str = "") -> list[Any]:
    """A Deployment and a Service for a pipeline's endpoint, as kubernetes client models."""
    import kubernetes.client as k
    from dagster_k8s.models import k8s_model_from_dict

    from serving.images import image_flavor

    name = endpoint_name(spec)
    namespace = namespace or settings.k8s_namespace()
    serving = spec.serving
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "kiln", "kiln/pipeline": spec.name}
    selector = {"app.kubernetes.io/name": name}
    resources = k8s_config(serving.cpu, serving.memory, serving.gpu)
    container_resources = resources["container_config"]["resources"]
    probe = {"period_seconds": 10, "timeout_seconds": 3, "failure_threshold": 3}
    pvc = settings.predictions_pvc()
    predictions = ({"name": "predictions", "persistent_volume_claim": {"claim_name": pvc}} if pvc
                   else {"name": "predictions", "empty_dir": {}})
    pod_spec: dict[str, Any] = {
        "security_context": {"run_as_non_root": True, "run_as_user": BENTO_UID, "run_as_group": BENTO_UID, "fs_group": BENTO_UID,
                             "seccomp_profile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "bento",
            "image": image,
            "ports": [{"name": "http", "container_port": SERVING_PORT, "protocol": "TCP"}],
            "env": [
                {"name": "BENTOML_PORT", "value": str(SERVING_PORT)},
                {"name": "KILN_PREDICTION_LOG", "value": "/var/lib/kiln/predictions"},
                {"name": "BENTOML_DO_NOT_TRACK", "value": "True"},
            ],
            "resources": container_resources,
            "readiness_probe": {"http_get": {"path": "/readyz", "port": "http"}, "initial_delay_seconds": 5, **probe},
            "liveness_probe": {"http_get": {"path": "/livez", "port": "http"}, "initial_delay_seconds": 30, **probe},
            "security_context": {"allow_privilege_escalation": False, "read_only_root_filesystem": True,
                                 "capabilities": {"drop": ["ALL"]}},
            # BentoML writes its Prometheus and temp files under /tmp; the prediction log feeds <p>/predictions.
            "volume_mounts": [{"name": "tmp", "mount_path": "/tmp"}, {"name": "predictions", "mount_path": "/var/lib/kiln/predictions"}],
        }],
        "volumes": [{"name": "tmp", "empty_dir": {"size_limit": "1Gi"}}, predictions],
    }
    if serving.gpu > 0:
        pod_spec["tolerations"] = resources["pod_spec_config"]["tolerations"]
        pod_spec["node_selector"] = resources["pod_spec_config"]["node_selector"]
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(SERVING_PORT), "prometheus.io/path": "/metrics",
                   "kiln/image-flavor": image_flavor(spec), "kiln/model-version": model_version}
    deployment = k8s_model_from_dict(k.V1Deployment, {
        "api_version": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": serving.replicas,
            "selector": {"match_labels": selector},
            "strategy": {"type": "RollingUpdate", "rolling_update": {"max_unavailable": 0, "max_surge": 1}},
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    })
    service = k8s_model_from_dict(k.V1Service, {
        "api_version": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": serving.port, "target_port": "http", "protocol": "TCP"}]},
    })
    return [deployment, service]


def endpoint_url(spec: PipelineSpec, namespace: str | None = None) -> str:
    """The in-cluster URL of a pipeline's endpoint Service."""
    namespace = namespace or settings.k8s_namespace()
    return f"http://{endpoint_name(spec)}.{namespace}.svc.cluster.local:{spec.serving.port}"


def endpoint_record(spec: PipelineSpec, bento: Mapping[str, Any], state_root: str) -> dict[str, Any]:
    """Prod `<p>/endpoint`: render the Deployment + Service for the bento's image, write them as YAML, return the record."""
    import yaml
    from upath import UPath

    image = endpoint_image(spec, str(bento["tag"]))
    manifests = [serialize(m) for m in endpoint_manifests(spec, image, model_version=str(bento["model_version"]))]
    path = UPath(state_root) / paths.k8s_manifests_file(spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    return {
        "pipeline": spec.name,
        "url": endpoint_url(spec),
        "bento": str(bento["tag"]),
        "model_tag": str(bento.get("model_tag", "")),
        "model_version": str(bento["model_version"]),
        "image": image,
        "manifests": str(path),
        "objects": [f"{m['kind']}/{m['metadata']['name']}" for m in manifests],
        "replicas": spec.serving.replicas,
        "gpu": spec.serving.gpu,
        "healthy": None,  # known once the manifests are applied (GitOps / kubectl apply) and the smoke check runs
    }
