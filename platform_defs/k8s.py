"""Kubernetes for the prod profile: the k8s executor, the step Jobs dagster-k8s submits, the endpoint release
objects (`resources/kubernetes.py`: versioned Deployments/Services, the stable Service, the HTTPRoute), and their
offline validation.

``python -m platform_defs.k8s render --out DIR`` writes every rendered object; ``python -m platform_defs.k8s
validate`` renders them all and validates them strictly (non-zero exit on any failure): core objects with
kubernetes-validate, the Gateway API HTTPRoute (a CRD it has no schema for) with the hand-written schema of
`resources/httproute_schema.py`.

Op tags and pools are plain dicts from `kiln/steps.py`; only :func:`executor` (prod profile) and the rendering
functions import dagster_k8s.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import settings
from kiln.spec import PipelineSpec
from kiln.steps import K8sConfigError
from platform_defs.profiles import executor
from resources.httproute_schema import httproute_error
from resources.kubernetes import endpoint_image, gateway_parents, release_manifests, serialize

if TYPE_CHECKING:
    import dagster as dg

KUBERNETES_VERSION = "1.37.0"
ROOT = Path(__file__).resolve().parent.parent
DAGSTER_CLOUD_YAML = ROOT / "dagster_cloud.yaml"
DAGSTER_YAML = ROOT / "deploy" / "dagster.yaml"


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
    return settings.code_image(env)


def plan_definitions(specs: Sequence[PipelineSpec]) -> dg.Definitions:
    """The prod Definitions with placeholder resources: the execution plan (and so every step's tags) without
    resolving the prod profile's environment variables, which only a cluster has."""
    import dagster as dg

    from platform_defs.component import pipeline_definitions
    from platform_defs.profiles import resources

    placeholders = {
        name: dg.fs_io_manager if isinstance(value, dg.ConfigurableIOManagerFactory) else dg.ResourceDefinition.none_resource()
        for name, value in resources("prod").items()
    }
    merged = dg.Definitions.merge(*[pipeline_definitions(s) for s in specs]) if specs else dg.Definitions()
    return dg.Definitions.merge(merged, dg.Definitions(resources=placeholders, executor=executor("prod")))


def step_tags(defs: dg.Definitions) -> dict[str, tuple[Mapping[str, str], str | None]]:
    """Tags and pool of every step of every asset and asset check, keyed by step (the op's name).

    Kiln's assets and checks are each one op, so each is one step of a run, and the step carries its op's tags (the
    ``dagster-k8s/config`` dagster-k8s' step handler reads) and pool."""
    import dagster as dg

    steps: dict[str, tuple[Mapping[str, str], str | None]] = {}
    for definition in [*(defs.assets or []), *(defs.asset_checks or [])]:
        if isinstance(definition, dg.AssetsDefinition) and definition.is_executable:
            op = definition.op
            steps[op.name] = (op.tags, op.pool)
    return steps


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
        namespace=settings.k8s_namespace(),
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


# ------------------------------------------------------------------------------------------ render and validate


# Placeholder model versions of an offline render: a champion, and a challenger where serving.release routes one.
RENDER_CHAMPION, RENDER_CHALLENGER = "1", "2"


def render_all(specs: Sequence[PipelineSpec] | None = None) -> dict[str, dict[str, Any]]:
    """Every object Kiln submits in the prod profile: a step Job per asset step, and per endpoint the release objects
    of placeholder versions (champion ``1``, plus challenger ``2`` when ``serving.release.mode`` is canary or shadow).

    Keys are file names (``jobs/<step>.yaml``, ``endpoints/<p>/<kind>-<name>.yaml``); values are API-server JSON.
    """
    from kiln.release import route_table
    from kiln.spec import load_specs

    specs = list(specs) if specs is not None else load_specs()
    defs = plan_definitions(specs)
    launcher, context = run_launcher_config(), code_location_container_context()
    objects: dict[str, dict[str, Any]] = {}
    for step_key, (tags, _pool) in sorted(step_tags(defs).items()):
        objects[f"jobs/{step_key}.yaml"] = serialize(step_job(step_key, tags, container_context=context, launcher=launcher))
    parents = gateway_parents()
    for spec in specs:
        challenger = RENDER_CHALLENGER if spec.serving.release.mode != "none" else None
        table = route_table(spec, RENDER_CHAMPION, challenger)
        images = {version: endpoint_image(spec) for version in table.versions}
        for obj in release_manifests(spec, table, images, parents=parents):
            objects[f"endpoints/{spec.name}/{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"] = obj
    return objects


def validate_objects(objects: Mapping[str, Mapping[str, Any]], version: str = KUBERNETES_VERSION) -> dict[str, str]:
    """Strict schema validation of rendered objects; returns ``{name: error}`` for each that fails.

    Core objects: kubernetes-validate (strict). A Gateway API HTTPRoute: the hand-written schema of
    `resources/httproute_schema.py` (kubernetes-validate bundles no CRD schemas)."""
    import kubernetes_validate

    errors: dict[str, str] = {}
    for name, obj in objects.items():
        if obj.get("kind") == "HTTPRoute" and str(obj.get("apiVersion", "")).startswith("gateway.networking.k8s.io/"):
            error = httproute_error(obj)
            if error is not None:
                errors[name] = error
            continue
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
