"""Per-step compute resources as plain data: the `dagster-k8s/config` op tag of each stage and its pool.

Dagster-free (dicts only), so asset factories build op tags in every profile without importing dagster_k8s, and the
k8s renderer (`platform_defs/k8s.py`) and the endpoint manifests (`resources/kubernetes.py`) share one rule.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from kiln import settings
from kiln.spec import PipelineSpec

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_POOL = "gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# Label set on GPU nodes by NVIDIA GPU feature discovery (GPU operator); override with KILN_GPU_NODE_SELECTOR.
DEFAULT_GPU_NODE_SELECTOR = "nvidia.com/gpu.present=true"
STEP_DEFAULT = {"cpu": "500m", "memory": "1Gi"}
# `<p>/image` builds and pushes the serving image with buildah inside its step pod (no Docker daemon, no privileged
# pod): chroot isolation (no nested user namespaces or mounts), the vfs storage driver (no overlay or fuse mounts) on
# an emptyDir sized for the base and the bento's packages, as root in the container with the capabilities buildah's
# chroot runs of RUN instructions need (the user switch, file ownership and the chroot) and no privilege escalation.
IMAGE_STEP = {"cpu": "1", "memory": "2Gi", "ephemeral_storage": "10Gi"}
BUILDAH_STORAGE = "/var/lib/containers"
IMAGE_BUILD_CONFIG: dict[str, Any] = {
    "container_config": {
        "env": [{"name": "STORAGE_DRIVER", "value": "vfs"}, {"name": "BUILDAH_ISOLATION", "value": "chroot"}],
        "security_context": {"run_as_user": 0, "run_as_non_root": False, "allow_privilege_escalation": False,
                             "capabilities": {"drop": ["ALL"],
                                              "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "SYS_CHROOT"]}},
        "volume_mounts": [{"name": "buildah-storage", "mount_path": BUILDAH_STORAGE}],
    },
    "pod_spec_config": {"volumes": [{"name": "buildah-storage", "empty_dir": {"size_limit": IMAGE_STEP["ephemeral_storage"]}}]},
}


class K8sConfigError(ValueError):
    """Kubernetes configuration from the environment or a spec is invalid; the message says which and why."""


# ---------------------------------------------------------------------------------------------- op tags and pools


def gpu_node_selector(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``KILN_GPU_NODE_SELECTOR`` as ``key=value[,key=value]`` (empty: no selector); default the GPU-operator label."""
    text = settings.gpu_node_selector_text(DEFAULT_GPU_NODE_SELECTOR, env)
    selector: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise K8sConfigError(f"KILN_GPU_NODE_SELECTOR: '{part}' is not key=value (e.g. {DEFAULT_GPU_NODE_SELECTOR})")
        selector[name.strip()] = value.strip()
    return selector


def extra_step_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``KILN_K8S_STEP_CONFIG``: a JSON `dagster-k8s/config` merged into every step (GPU essentials always win)."""
    text = settings.step_config_text(env)
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
    if stage == "image":
        return IMAGE_STEP["cpu"], IMAGE_STEP["memory"], 0
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
    user = extra_step_config() if extra is None else dict(extra)
    if stage == "image":  # buildah's pod settings first, the user's config merged over them
        user = _deep_merge(IMAGE_BUILD_CONFIG, user)
        user = _deep_merge(user, {"container_config": {"resources": {
            "requests": {"ephemeral-storage": IMAGE_STEP["ephemeral_storage"]},
            "limits": {"ephemeral-storage": IMAGE_STEP["ephemeral_storage"]}}}})
    return {K8S_CONFIG_TAG: k8s_config(cpu, memory, gpu, user)}


def pool(spec: PipelineSpec, stage: str) -> str | None:
    """The concurrency pool of a stage's asset: ``gpu`` for steps that hold GPUs, else none."""
    return GPU_POOL if stage_resources(spec, stage)[2] > 0 else None
