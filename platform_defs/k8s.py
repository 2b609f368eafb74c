"""Kubernetes for the prod profile: per-asset `dagster-k8s/config` op tags, the `gpu` pool, the k8s executor,
the step Jobs dagster-k8s submits, endpoint Deployments/Services, and their offline validation.

``python -m platform_defs.k8s render --out DIR`` writes every rendered object; ``python -m platform_defs.k8s
validate`` renders them all and validates them strictly with kubernetes-validate (non-zero exit on any failure).

Op tags are plain dicts, so asset factories call :func:`op_tags` in every profile without importing dagster_k8s;
only :func:`executor` (prod profile) and the rendering functions import it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from platform_defs.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_POOL = "gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# Label set on GPU nodes by NVIDIA GPU feature discovery (GPU operator); override with KILN_GPU_NODE_SELECTOR.
DEFAULT_GPU_NODE_SELECTOR = "nvidia.com/gpu.present=true"
STEP_DEFAULT = {"cpu": "500m", "memory": "1Gi"}
KUBERNETES_VERSION = "1.37.0"
ROOT = Path(__file__).resolve().parent.parent
DAGSTER_CLOUD_YAML = ROOT / "dagster_cloud.yaml"
DAGSTER_YAML = ROOT / "deploy" / "dagster.yaml"
SERVING_PORT = 3000  # BentoML's port inside the image
BENTO_UID = 1034  # the non-root `bentoml` user of BentoML's generated Dockerfile


class K8sConfigError(ValueError):
    """Kubernetes configuration from the environment or a spec is invalid; the message says which and why."""


# ---------------------------------------------------------------------------------------------- op tags and pools


def gpu_node_selector(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``KILN_GPU_NODE_SELECTOR`` as ``key=value[,key=value]`` (empty: no selector); default the GPU-operator label."""
    env = os.environ if env is None else env
    text = env.get("KILN_GPU_NODE_SELECTOR", DEFAULT_GPU_NODE_SELECTOR).strip()
    selector: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise K8sConfigError(f"KILN_GPU_NODE_SELECTOR: '{part}' is not key=value (e.g. {DEFAULT_GPU_NODE_SELECTOR})")
        selector[name.strip()] = value.strip()
    return selector


def extra_step_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``KILN_K8S_STEP_CONFIG``: a JSON `dagster-k8s/config` merged into every step (GPU essentials always win)."""
    env = os.environ if env is None else env
    text = env.get("KILN_K8S_STEP_CONFIG", "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise K8sConfigError(f"KILN_K8S_STEP_CONFIG: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise K8sConfigError(f"KILN_K8S_STEP_CONFIG: expected a JSON object, got {type(value).__name__}")
    return value


def stage_resources(spec: PipelineSpec, stage: str) -> tuple[str, str, int]:
    """(cpu, memory, gpus) of a stage: the trainer's for `<p>/model`, a small default for every other step."""
    if stage == "model":
        res = spec.trainer.resources
        return res.cpu, res.memory, res.gpu
    return STEP_DEFAULT["cpu"], STEP_DEFAULT["memory"], 0


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity (``500m``, ``2``, ``4Gi``, ``1e3``) as a number, to compare requests with limits."""
    text = str(value).strip()
    suffixes = {name: Decimal(2) ** (10 * i) for i, name in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), start=1)}
    suffixes |= {name: Decimal(10) ** exp for name, exp in (("n", -9), ("u", -6), ("m", -3), ("k", 3), ("M", 6), ("G", 9),
                                                           ("T", 12), ("P", 15), ("E", 18))}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix) and text[: -len(suffix)]:
            number, factor = text[: -len(suffix)], suffixes[suffix]
            break
    else:
        number, factor = text, Decimal(1)
    try:
        return Decimal(number) * factor
    except Exception:  # decimal raises InvalidOperation
        raise K8sConfigError(f"'{value}' is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)") from None


def _deep_merge(onto: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """dagster-k8s' DEEP merge: dicts merge, lists append without duplicates, scalars are replaced."""
    out = copy.deepcopy(onto)
    for name, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), dict):
            out[name] = _deep_merge(out[name], value)
        elif isinstance(value, list) and isinstance(out.get(name), list):
            out[name] = out[name] + [v for v in value if v not in out[name]]
        else:
            out[name] = copy.deepcopy(value)
    return out


def _section(config: dict[str, Any], name: str, *aliases: str) -> dict[str, Any]:
    """A config section, accepting dagster-k8s' camelCase aliases and folding them into the snake_case key."""
    section = config.setdefault(name, {})
    for alias in aliases:
        if alias in config:
            section.update(config.pop(alias))
    return section


def k8s_config(cpu: str, memory: str, gpu: int = 0, extra: Mapping[str, Any] | None = None,
               node_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `dagster-k8s/config` of one step: requests/limits, and for GPUs the limit, toleration and node selector.

    ``extra`` (user config) is merged in first; then the essentials are enforced so that no merge can leave a GPU
    pod unschedulable or invalid: the GPU count is both request and limit, the `nvidia.com/gpu` toleration and the
    profile's node selector are present, every request is at most its limit, and the step's config replaces
    (SHALLOW merge) the run-level tolerations, node selector and affinity, which are set for CPU run workers.
    """
    base: dict[str, Any] = {
        "container_config": {"resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}},
    }
    config = _deep_merge(base, extra or {})
    container = _section(config, "container_config", "containerConfig")
    resources = container.setdefault("resources", {})
    requests, limits = resources.setdefault("requests", {}), resources.setdefault("limits", {})
    for name in ("cpu", "memory"):
        if name in requests and name in limits and parse_quantity(requests[name]) > parse_quantity(limits[name]):
            limits[name] = requests[name]  # the scheduler places by requests; a lower limit would be rejected
    if gpu <= 0:
        if GPU_RESOURCE in requests or GPU_RESOURCE in limits:
            raise K8sConfigError(f"{GPU_RESOURCE} is requested by extra config of a CPU step; set resources.gpu in the spec")
        return config
    requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = gpu  # extended resources: request == limit, never overcommitted
    pod = _section(config, "pod_spec_config", "podSpecConfig")
    tolerations = [t for t in pod.pop("tolerations", []) if t != GPU_TOLERATION]
    pod["tolerations"] = [GPU_TOLERATION, *tolerations]
    selector = gpu_node_selector() if node_selector is None else dict(node_selector)
    pod["node_selector"] = {**pod.pop("node_selector", {}), **pod.pop("nodeSelector", {}), **selector}
    pod.setdefault("affinity", {})
    config["merge_behavior"] = "SHALLOW"
    return config


def op_tags(spec: PipelineSpec, stage: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``op_tags`` of a stage's asset: its `dagster-k8s/config` (harmless outside Kubernetes)."""
    cpu, memory, gpu = stage_resources(spec, stage)
    return {K8S_CONFIG_TAG: k8s_config(cpu, memory, gpu, extra_step_config() if extra is None else extra)}


def pool(spec: PipelineSpec, stage: str) -> str | None:
    """The concurrency pool of a stage's asset: ``gpu`` for steps that hold GPUs, else none."""
    return GPU_POOL if stage_resources(spec, stage)[2] > 0 else None


EXECUTORS = ("k8s", "multiprocess", "in_process")


def executor(profile: str) -> dg.ExecutorDefinition | None:
    """The prod profile runs each step as a Kubernetes Job; the local profile keeps Dagster's default executor.

    ``KILN_EXECUTOR=multiprocess|in_process`` runs the prod profile without a cluster (one VM, CI): each step in its
    own process, or all steps in the run worker.
    """
    import dagster as dg

    choice = os.environ.get("KILN_EXECUTOR", "k8s" if profile == "prod" else "")
    if choice and choice not in EXECUTORS:
        raise ValueError(f"KILN_EXECUTOR: '{choice}' is not one of {', '.join(EXECUTORS)}")
    if choice == "multiprocess":
        return dg.multiprocess_executor
    if choice == "in_process":
        return dg.in_process_executor
    if choice != "k8s":
        return None
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


# ------------------------------------------------------------------------------------- deploy configuration files


def load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise K8sConfigError(f"{path}: cannot read: {exc}") from None


def code_location_container_context(path: Path = DAGSTER_CLOUD_YAML) -> dict[str, Any]:
    """The ``container_context`` of Kiln's code location in ``dagster_cloud.yaml``."""
    locations = (load_yaml(path) or {}).get("locations") or []
    for location in locations:
        if location.get("location_name") == "kiln":
            return location.get("container_context") or {}
    raise K8sConfigError(f"{path}: locations: no location named 'kiln'")


def run_launcher_config(path: Path = DAGSTER_YAML) -> dict[str, Any]:
    """The K8sRunLauncher config of ``deploy/dagster.yaml`` (env-var references left as they are)."""
    launcher = (load_yaml(path) or {}).get("run_launcher") or {}
    if launcher.get("class") != "K8sRunLauncher":
        raise K8sConfigError(f"{path}: run_launcher.class: expected K8sRunLauncher, got {launcher.get('class')!r}")
    return launcher.get("config") or {}


# ------------------------------------------------------------------------------------------------- step Jobs


def code_image(env: Mapping[str, str] | None = None) -> str:
    """The code-location image (in a cluster dagster-k8s takes it from the code location)."""
    env = os.environ if env is None else env
    return env.get("KILN_CODE_IMAGE", "kiln/code-location:latest")


def plan_definitions(specs: Sequence[PipelineSpec]) -> dg.Definitions:
    """The prod Definitions with placeholder resources: the execution plan (and so every step's tags) without
    resolving the prod profile's environment variables, which only a cluster has."""
    import dagster as dg

    from platform_defs.definitions import pipeline_definitions
    from platform_defs.profiles import resources

    placeholders = {
        name: dg.fs_io_manager if isinstance(value, dg.ConfigurableIOManagerFactory) else dg.ResourceDefinition.none_resource()
        for name, value in resources("prod").items()
    }
    merged = dg.Definitions.merge(*[pipeline_definitions(s) for s in specs]) if specs else dg.Definitions()
    return dg.Definitions.merge(merged, dg.Definitions(resources=placeholders, executor=executor("prod")))


def step_tags(defs: dg.Definitions) -> dict[str, tuple[Mapping[str, str], str | None]]:
    """Tags and pool of every step of every asset, from the execution plan dagster-k8s' step handler reads."""
    from dagster._core.execution.api import create_execution_plan

    job = defs.resolve_implicit_global_asset_job_def()
    plan = create_execution_plan(job)
    return {step.key: (step.tags or {}, step.pool) for step in plan.steps}


# K8sRunLauncher settings that dagster-k8s copies into every run and step pod (K8sContainerContext.create_for_run).
LAUNCHER_CONTEXT_FIELDS = ("image_pull_policy", "image_pull_secrets", "service_account_name", "env_config_maps", "env_secrets",
                           "env_vars", "volume_mounts", "volumes", "labels", "resources", "scheduler_name", "security_context")


def step_job(step_key: str, tags: Mapping[str, str], job_name: str = "__ASSET_JOB", run_id: str = "00000000-0000-0000-0000-000000000000",
             container_context: Mapping[str, Any] | None = None, launcher: Mapping[str, Any] | None = None) -> Any:
    """The V1Job dagster-k8s' step handler would submit for a step, merged as it merges them.

    Run launcher config (``deploy/dagster.yaml``) <- code location ``container_context`` (``dagster_cloud.yaml``)
    <- the step's `dagster-k8s/config` tag, then ``construct_dagster_k8s_job``.
    """
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_k8s_job_name,
        get_user_defined_k8s_config,
    )

    launcher = run_launcher_config() if launcher is None else launcher
    container_context = code_location_container_context() if container_context is None else container_context
    shared = {name: launcher[name] for name in LAUNCHER_CONTEXT_FIELDS if name in launcher}
    context = K8sContainerContext(
        namespace=os.environ.get("KILN_K8S_NAMESPACE", "kiln"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher.get("run_k8s_config") or {}),
        **shared,
    )
    context = context.merge(K8sContainerContext.create_from_config(container_context))
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    name = f"dagster-step-{get_k8s_job_name(run_id, step_key)}"
    job_config = DagsterK8sJobConfig(
        job_image=code_image(),
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
        postgres_password_secret="dagster-postgresql-secret",
    )
    return construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name=name,
        pod_name=name,
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job_name, "dagster/op": step_key, "dagster/run-id": run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": job_name}, {"name": "DAGSTER_RUN_STEP_KEY", "value": step_key}],
    )


def serialize(obj: Any) -> dict[str, Any]:
    """A kubernetes client model as the JSON the API server receives (camelCase, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


# ----------------------------------------------------------------------------------------- endpoint manifests


def endpoint_name(spec: PipelineSpec) -> str:
    """The Deployment/Service name of a pipeline's endpoint (DNS-1035: no underscores)."""
    return f"kiln-{spec.name.replace('_', '-')}"


def endpoint_image(spec: PipelineSpec, bento_tag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The containerized bento: ``$KILN_IMAGE_REGISTRY/<bento name>:<bento version>``."""
    env = os.environ if env is None else env
    registry = env.get("KILN_IMAGE_REGISTRY", "registry.local/kiln").rstrip("/")
    tag = bento_tag or f"kiln-{spec.name}:{env.get('KILN_IMAGE_TAG', 'latest')}"
    return f"{registry}/{tag.lower()}"


def endpoint_manifests(spec: PipelineSpec, image: str, namespace: str | None = None, model_version: str = "") -> list[Any]:
    """A Deployment and a Service for a pipeline's endpoint, as kubernetes client models."""
    import kubernetes.client as k
    from dagster_k8s.models import k8s_model_from_dict

    from serving.images import image_flavor

    name = endpoint_name(spec)
    namespace = namespace or os.environ.get("KILN_K8S_NAMESPACE", "kiln")
    serving = spec.serving
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "kiln", "kiln/pipeline": spec.name}
    selector = {"app.kubernetes.io/name": name}
    resources = k8s_config(serving.cpu, serving.memory, serving.gpu)
    container_resources = resources["container_config"]["resources"]
    probe = {"period_seconds": 10, "timeout_seconds": 3, "failure_threshold": 3}
    predictions = ({"name": "predictions", "persistent_volume_claim": {"claim_name": os.environ["KILN_PREDICTIONS_PVC"]}}
                   if os.environ.get("KILN_PREDICTIONS_PVC") else {"name": "predictions", "empty_dir": {}})
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
    namespace = namespace or os.environ.get("KILN_K8S_NAMESPACE", "kiln")
    return f"http://{endpoint_name(spec)}.{namespace}.svc.cluster.local:{spec.serving.port}"


def endpoint_record(spec: PipelineSpec, bento: Mapping[str, Any], state_root: str) -> dict[str, Any]:
    """Prod `<p>/endpoint`: render the Deployment + Service for the bento's image, write them as YAML, return the record."""
    import yaml
    from upath import UPath

    image = endpoint_image(spec, str(bento["tag"]))
    manifests = [serialize(m) for m in endpoint_manifests(spec, image, model_version=str(bento["model_version"]))]
    path = UPath(state_root) / "endpoints" / spec.name / "k8s.yaml"
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


# ------------------------------------------------------------------------------------------ render and validate


def render_all(specs: Sequence[PipelineSpec] | None = None) -> dict[str, dict[str, Any]]:
    """Every object Kiln submits in the prod profile: a step Job per asset step, a Deployment + Service per endpoint.

    Keys are file names (``jobs/<step>.yaml``, ``endpoints/<p>-deployment.yaml``); values are API-server JSON.
    """
    from platform_defs.spec import load_specs

    specs = list(specs) if specs is not None else load_specs()
    defs = plan_definitions(specs)
    launcher, context = run_launcher_config(), code_location_container_context()
    objects: dict[str, dict[str, Any]] = {}
    for step_key, (tags, _pool) in sorted(step_tags(defs).items()):
        objects[f"jobs/{step_key}.yaml"] = serialize(step_job(step_key, tags, container_context=context, launcher=launcher))
    for spec in specs:
        for model in endpoint_manifests(spec, endpoint_image(spec)):
            obj = serialize(model)
            objects[f"endpoints/{spec.name}-{obj['kind'].lower()}.yaml"] = obj
    return objects


def validate_objects(objects: Mapping[str, Mapping[str, Any]], version: str = KUBERNETES_VERSION) -> dict[str, str]:
    """Strict schema validation of rendered objects; returns ``{name: error}`` for each that fails."""
    import kubernetes_validate

    errors: dict[str, str] = {}
    for name, obj in objects.items():
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
            errors[name] = f"{path}: {exc.message}"
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError,
                kubernetes_validate.utils.VersionNotSupportedError) as exc:
            errors[name] = exc.message
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m platform_defs.k8s", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write every rendered Kubernetes object as YAML")
    render.add_argument("--out", required=True, type=Path, help="folder to write into")
    check = sub.add_parser("validate", help="render and validate every object strictly (exit 1 on any failure)")
    check.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    os.environ["KILN_PROFILE"] = "prod"
    try:
        objects = render_all()
    except (K8sConfigError, ValueError) as exc:  # SpecError and dagster's config errors are ValueErrors too
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if args.command == "render":
        import yaml

        for name, obj in objects.items():
            path = args.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(obj, sort_keys=False))
        print(f"wrote {len(objects)} objects to {args.out}")
        return 0
    errors = validate_objects(objects, args.kubernetes_version)
    for name, error in sorted(errors.items()):
        print(f"INVALID {name}: {error}", file=sys.stderr)
    print(f"{len(objects) - len(errors)}/{len(objects)} objects valid for Kubernetes {args.kubernetes_version} (strict)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
