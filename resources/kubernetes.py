"""Kubernetes objects of the prod endpoint, rendered from a pipeline's spec.

Two shapes:

- :func:`endpoint_manifests`: one Deployment and one Service per pipeline (`<p>/endpoint` writes them in the prod
  profile; `platform_defs/k8s.py` renders and validates them offline).
- :func:`release_manifests`: the objects of a release, from a route table (`kiln/release.py`): a Deployment and a
  Service per served version (``kiln-<p>-v<version>``), the pipeline's stable Service (``kiln-<p>``, selecting the
  champion's pods) and a Gateway API ``HTTPRoute`` whose rule carries the weighted ``backendRefs`` of a canary or the
  ``RequestMirror`` filter of a shadow. By default the route's parent is the stable Service (GAMMA, the Gateway API for
  a service mesh), so in-cluster clients of the stable URL get the split; without a mesh the stable Service still
  sends everything to the champion, never to a shadow. ``parents`` may name a Gateway instead.
  `resources/k8s_apply.py` applies them and waits for the rollout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kiln import paths, settings
from kiln.release import ReleaseError, RouteTable, Version
from kiln.spec import PipelineSpec
from kiln.state import state_path
from kiln.steps import k8s_config

SERVING_PORT = 3000  # BentoML's port inside the image
BENTO_UID = 1034  # the non-root `bentoml` user of BentoML's generated Dockerfile
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
VERSION_LABEL = "kiln/model-version"


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


PREDLOG_SPILL_DIR = "/var/lib/kiln/predlog-spill"  # the pod's spill folder of the prediction log (one subfolder per worker)
S3_SECRET = "kiln-secrets"  # the Secret the step pods get their S3 credentials from (deploy/dagster.yaml env_secrets)
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")


def _prediction_log_env() -> list[dict[str, Any]]:
    """The endpoint's prediction-log settings: ship to the prod state root (``KILN_STATE_ROOT`` when rendering; without
    it the endpoint logs nothing), spill under :data:`PREDLOG_SPILL_DIR`, and reach S3 as the IO managers do (the
    endpoint URL as rendered, the credentials from the :data:`S3_SECRET` keys, each optional: an IAM role needs none)."""
    env: list[dict[str, Any]] = []
    state_root = settings.state_root()
    if state_root:
        env.append({"name": "KILN_PREDICTION_LOG_ROOT", "value": state_root})
    env.append({"name": "KILN_PREDICTION_LOG_SPILL_DIR", "value": PREDLOG_SPILL_DIR})
    endpoint = settings.s3_endpoint_url()
    if endpoint:
        env.append({"name": "KILN_S3_ENDPOINT_URL", "value": endpoint})
    env.extend({"name": name, "value_from": {"secret_key_ref": {"name": S3_SECRET, "key": name, "optional": True}}}
               for name in S3_SECRET_KEYS)
    return env


def _pod_spec(spec: PipelineSpec, image: str) -> dict[str, Any]:
    """The bento's pod: probes, resources (GPU toleration and selector), non-root, read-only root with /tmp."""
    serving = spec.serving
    resources = k8s_config(serving.cpu, serving.memory, serving.gpu)
    container_resources = resources["container_config"]["resources"]
    probe = {"period_seconds": 10, "timeout_seconds": 3, "failure_threshold": 3}
    # The prediction log goes to the state store as objects (serving/predlog.py); the pod keeps only a spill folder for
    # rows the store cannot take yet: an emptyDir, or KILN_PREDICTIONS_PVC to keep spilled rows across pod restarts.
    pvc = settings.predictions_pvc()
    spill = ({"name": "predlog-spill", "persistent_volume_claim": {"claim_name": pvc}} if pvc
             else {"name": "predlog-spill", "empty_dir": {}})
    pod_spec: dict[str, Any] = {
        "security_context": {"run_as_non_root": True, "run_as_user": BENTO_UID, "run_as_group": BENTO_UID, "fs_group": BENTO_UID,
                             "seccomp_profile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "bento",
            "image": image,
            "ports": [{"name": "http", "container_port": SERVING_PORT, "protocol": "TCP"}],
            "env": [
                {"name": "BENTOML_PORT", "value": str(SERVING_PORT)},
                *_prediction_log_env(),
                {"name": "BENTOML_DO_NOT_TRACK", "value": "True"},
            ],
            "resources": container_resources,
            "readiness_probe": {"http_get": {"path": "/readyz", "port": "http"}, "initial_delay_seconds": 5, **probe},
            "liveness_probe": {"http_get": {"path": "/livez", "port": "http"}, "initial_delay_seconds": 30, **probe},
            "security_context": {"allow_privilege_escalation": False, "read_only_root_filesystem": True,
                                 "capabilities": {"drop": ["ALL"]}},
            # BentoML writes its Prometheus and temp files under /tmp; the prediction log spills to its own volume.
            "volume_mounts": [{"name": "tmp", "mount_path": "/tmp"}, {"name": "predlog-spill", "mount_path": PREDLOG_SPILL_DIR}],
        }],
        "volumes": [{"name": "tmp", "empty_dir": {"size_limit": "1Gi"}}, spill],
    }
    if serving.gpu > 0:
        pod_spec["tolerations"] = resources["pod_spec_config"]["tolerations"]
        pod_spec["node_selector"] = resources["pod_spec_config"]["node_selector"]
    return pod_spec


def _deployment(spec: PipelineSpec, image: str, name: str, namespace: str, labels: Mapping[str, str],
                selector: Mapping[str, str], model_version: str, pod_labels: Mapping[str, str] | None = None) -> Any:
    """A RollingUpdate Deployment (maxUnavailable 0: old pods serve until new ones are ready) of the bento's pod."""
    import kubernetes.client as k
    from dagster_k8s.models import k8s_model_from_dict

    from serving.images import image_flavor

    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(SERVING_PORT), "prometheus.io/path": "/metrics",
                   "kiln/image-flavor": image_flavor(spec), VERSION_LABEL: model_version}
    return k8s_model_from_dict(k.V1Deployment, {
        "api_version": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "replicas": spec.serving.replicas,
            "selector": {"match_labels": dict(selector)},
            "strategy": {"type": "RollingUpdate", "rolling_update": {"max_unavailable": 0, "max_surge": 1}},
            "template": {"metadata": {"labels": dict(pod_labels or labels), "annotations": annotations}, "spec": _pod_spec(spec, image)},
        },
    })


def _service(spec: PipelineSpec, name: str, namespace: str, labels: Mapping[str, str], selector: Mapping[str, str],
             annotations: Mapping[str, str] | None = None) -> Any:
    """A ClusterIP Service on the spec's port to the pods' ``http`` port."""
    import kubernetes.client as k
    from dagster_k8s.models import k8s_model_from_dict

    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return k8s_model_from_dict(k.V1Service, {
        "api_version": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": "http", "port": spec.serving.port, "target_port": "http", "protocol": "TCP"}]},
    })


def endpoint_manifests(spec: PipelineSpec, image: str, namespace: str | None = None, model_version: str = "") -> list[Any]:
    """A Deployment and a Service for a pipeline's endpoint, as kubernetes client models."""
    name = endpoint_name(spec)
    namespace = namespace or settings.k8s_namespace()
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "kiln", "kiln/pipeline": spec.name}
    selector = {"app.kubernetes.io/name": name}
    deployment = _deployment(spec, image, name, namespace, labels, selector, model_version)
    service = _service(spec, name, namespace, labels, selector)
    return [deployment, service]


# ------------------------------------------------------------------------------------------------------- releases


def version_name(spec: PipelineSpec, version: Version) -> str:
    """The Deployment/Service name of one served version: ``kiln-<p>-v<version>`` (DNS-1035)."""
    name = f"{endpoint_name(spec)}-v{version}"
    if len(name) > 63:
        raise ReleaseError(f"{spec.name}: release: object name {name!r} is longer than 63 characters")
    return name


def version_url(spec: PipelineSpec, version: Version, namespace: str | None = None) -> str:
    """The in-cluster URL of one version's Service (a smoke test of a challenger goes here, past the route)."""
    namespace = namespace or settings.k8s_namespace()
    return f"http://{version_name(spec, version)}.{namespace}.svc.cluster.local:{spec.serving.port}"


def _version_selector(spec: PipelineSpec, version: Version) -> dict[str, str]:
    return {"app.kubernetes.io/name": endpoint_name(spec), VERSION_LABEL: version}


def release_images(spec: PipelineSpec, bentos: Mapping[Version, Mapping[str, Any]]) -> dict[Version, str]:
    """The image of each version's bento record: the ``image_ref`` `<p>/image` pushed (``<registry>/<name>:<tag>@<digest>``)
    when the record carries one, else the name :func:`endpoint_image` gives its ``tag``."""
    return {str(version): str(bento.get("image_ref") or endpoint_image(spec, str(bento["tag"]))) for version, bento in bentos.items()}


def gateway_parents() -> list[dict[str, Any]] | None:
    """The HTTPRoute's ``parentRefs`` from ``KILN_GATEWAY=<namespace>/<name>`` (None: the stable Service, GAMMA mesh)."""
    gateway = settings.gateway()
    if gateway is None:
        return None
    namespace, name = gateway
    return [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name, "namespace": namespace}]


def http_route(spec: PipelineSpec, table: RouteTable, namespace: str | None = None,
               parents: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The Gateway API v1 HTTPRoute of a route table: weighted ``backendRefs``; shadow adds a ``RequestMirror`` filter.

    ``parents``: the route's ``parentRefs``; default the pipeline's stable Service (GAMMA mesh routing)."""
    if table.pipeline != spec.name:
        raise ReleaseError(f"{spec.name}: release: the route table is for pipeline {table.pipeline!r}")
    namespace = namespace or settings.k8s_namespace()
    port = spec.serving.port
    name = endpoint_name(spec)
    parent_refs = [dict(p) for p in parents] if parents is not None else [{"group": "", "kind": "Service", "name": name, "port": port}]
    rule: dict[str, Any] = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [{"group": "", "kind": "Service", "name": version_name(spec, b.version), "port": port, "weight": b.weight}
                        for b in table.backends],
    }
    if table.mirror is not None:
        rule["filters"] = [{"type": "RequestMirror", "requestMirror": {
            "backendRef": {"group": "", "kind": "Service", "name": version_name(spec, table.mirror.version), "port": port}}}]
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "kiln", "kiln/pipeline": spec.name},
                     "annotations": {"kiln/release-mode": table.mode,
                                     "kiln/weights": ",".join(f"{b.version}={b.weight}" for b in table.backends),
                                     "kiln/mirror": table.mirror.version if table.mirror else ""}},
        "spec": {"parentRefs": parent_refs, "rules": [rule]},
    }


def release_manifests(spec: PipelineSpec, table: RouteTable, images: Mapping[Version, str], namespace: str | None = None,
                      parents: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every object of a release, as the JSON the API server receives, in apply order: per version (served, then
    mirrored) a Deployment and a Service, then the stable Service (champion's pods), then the HTTPRoute."""
    namespace = namespace or settings.k8s_namespace()
    name = endpoint_name(spec)
    missing = [v for v in table.versions if v not in images]
    if missing:
        raise ReleaseError(f"{spec.name}: release: no image for version(s) {', '.join(missing)} "
                           f"(images for: {', '.join(images) or 'none'})")
    roles = {b.version: b.role for b in (*table.backends, *((table.mirror,) if table.mirror else ()))}
    objects: list[dict[str, Any]] = []
    for version in table.versions:
        vname = version_name(spec, version)
        selector = _version_selector(spec, version)
        pod_labels = {**selector, "app.kubernetes.io/instance": vname, "app.kubernetes.io/part-of": "kiln", "kiln/pipeline": spec.name}
        labels = {**pod_labels, "kiln/role": roles[version]}  # the role is not a pod label: a promotion re-labels, never re-rolls
        objects.append(serialize(_deployment(spec, images[version], vname, namespace, labels, selector, version, pod_labels)))
        objects.append(serialize(_service(spec, vname, namespace, labels, selector)))
    stable_labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "kiln", "kiln/pipeline": spec.name}
    objects.append(serialize(_service(spec, name, namespace, stable_labels, _version_selector(spec, table.champion.version),
                                      annotations={"kiln/role": "stable: the champion's pods; the HTTPRoute's parent"})))
    objects.append(http_route(spec, table, namespace, parents))
    return objects


def release_record(spec: PipelineSpec, table: RouteTable, bentos: Mapping[Version, Mapping[str, Any]], state_root: str,
                   namespace: str | None = None, parents: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Render a release for the versions' bentos, write it as YAML to the endpoint's manifests file, return the record
    (``objects`` the rendered dicts' kinds and names; ``manifests`` the written file). Applying is k8s_apply's job."""
    import yaml

    images = release_images(spec, bentos)
    manifests = release_manifests(spec, table, images, namespace, parents)
    path = state_path(state_root, paths.k8s_manifests_file(spec.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    champion = table.champion.version
    return {
        "pipeline": spec.name,
        "url": endpoint_url(spec, namespace),
        "bento": str(bentos[champion]["tag"]),
        "model_tag": str(bentos[champion].get("model_tag", "")),
        "model_version": champion,
        "image": images[champion],
        "release": {"mode": table.mode, "weights": table.weights(), "mirror": table.mirror.version if table.mirror else None},
        "images": {v: images[v] for v in table.versions},
        "manifests": str(path),
        "objects": [f"{m['kind']}/{m['metadata']['name']}" for m in manifests],
        "replicas": spec.serving.replicas,
        "gpu": spec.serving.gpu,
        "healthy": None,
    }


def endpoint_url(spec: PipelineSpec, namespace: str | None = None) -> str:
    """The in-cluster URL of a pipeline's endpoint Service."""
    namespace = namespace or settings.k8s_namespace()
    return f"http://{endpoint_name(spec)}.{namespace}.svc.cluster.local:{spec.serving.port}"


def endpoint_record(spec: PipelineSpec, bento: Mapping[str, Any], state_root: str) -> dict[str, Any]:
    """Prod `<p>/endpoint`: render the Deployment + Service for the bento's image, write them as YAML, return the record."""
    import yaml

    image = str(bento.get("image_ref") or endpoint_image(spec, str(bento["tag"])))
    manifests = [serialize(m) for m in endpoint_manifests(spec, image, model_version=str(bento["model_version"]))]
    path = state_path(state_root, paths.k8s_manifests_file(spec.name))
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
