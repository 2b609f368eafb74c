"""Kubernetes, offline: the step Jobs dagster-k8s would submit for every asset, the endpoint manifests, and the deploy
configuration, rendered by Dagster's own code, serialized by the kubernetes client and validated strictly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import steps
from kiln.spec import load_spec, load_specs
from platform_defs import k8s
from resources import kubernetes
from tests.conftest import FRAUD_SPEC, REPO

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture()
def prod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prod profile with fake values: nothing here connects to anything."""
    for name, value in {"KILN_PROFILE": "prod", "KILN_K8S_NAMESPACE": "kiln", "KILN_CODE_IMAGE": "registry.local/kiln/code:1",
                        "KILN_IMAGE_REGISTRY": "registry.local/kiln", "KILN_STORAGE_PREFIX": "s3://kiln/storage",
                        "KILN_SOURCE_ROOT": "s3://kiln/sources", "KILN_STATE_ROOT": "/tmp/kiln-state",
                        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "BENTOML_HOME": "/tmp/bentoml"}.items():
        monkeypatch.setenv(name, value)
    for name in ("KILN_GPU_NODE_SELECTOR", "KILN_K8S_STEP_CONFIG", "KILN_PREDICTIONS_PVC", "KILN_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def gpu_pipelines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pipelines folder whose fraud spec trains on one GPU and serves on one GPU."""
    import yaml

    from kiln.spec import spec_data

    data = spec_data(FRAUD_SPEC)
    data["trainer"]["resources"] = {"cpu": "4", "memory": "16Gi", "gpu": 1}
    data["serving"] |= {"gpu": 1, "replicas": 2}
    (tmp_path / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(tmp_path))
    return tmp_path


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]


def _jobs(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name.removeprefix("jobs/").removesuffix(".yaml"): obj for name, obj in objects.items() if name.startswith("jobs/")}


def test_every_step_of_every_real_pipeline_renders_a_valid_cpu_job(prod: None) -> None:
    specs = load_specs()
    objects = k8s.render_all(specs)
    assert k8s.validate_objects(objects) == {}
    jobs = _jobs(objects)
    tags = k8s.step_tags(k8s.plan_definitions(specs))
    assert set(jobs) == set(tags)
    for spec in specs:
        steps = {f"{spec.name}__{s}"
                 for s in ("raw", "validated", "features", "model", "champion", "bento", "image", "endpoint", "predictions")}
        assert steps <= set(jobs), f"{spec.name}: missing step jobs {steps - set(jobs)}"
        model = _container(jobs[f"{spec.name}__model"])
        assert model["resources"]["limits"]["cpu"] == spec.trainer.resources.cpu
        assert model["resources"]["requests"]["memory"] == spec.trainer.resources.memory
        if spec.trainer.resources.gpu:  # e.g. breast_cancer (torch, gpu: 1)
            assert model["resources"]["limits"]["nvidia.com/gpu"] == str(spec.trainer.resources.gpu)
            assert GPU_TOLERATION in jobs[f"{spec.name}__model"]["spec"]["template"]["spec"]["tolerations"]
            assert tags[f"{spec.name}__model"][1] == "gpu"
    assert any(s.trainer.resources.gpu for s in specs), "the real specs include a GPU pipeline (breast_cancer)"
    for step, job in jobs.items():
        assert job["kind"] == "Job" and job["metadata"]["labels"]["dagster/op"] == step
        pod = job["spec"]["template"]["spec"]
        if any(s.trainer.resources.gpu and step == f"{s.name}__model" for s in specs):
            continue
        assert "nvidia.com/gpu" not in json.dumps(pod), f"{step}: a CPU step asks for a GPU"
        assert pod["nodeSelector"] == {"kiln.dev/pool": "cpu"}  # from dagster_cloud.yaml's run_k8s_config
        assert _container(job)["image"] == "registry.local/kiln/code:1"
        assert tags[step][1] is None


def test_gpu_step_gets_gpu_limit_toleration_node_selector_and_pool(prod: None, gpu_pipelines: Path) -> None:
    objects = k8s.render_all()
    assert k8s.validate_objects(objects) == {}
    jobs = _jobs(objects)
    model = jobs["fraud__model"]
    pod = model["spec"]["template"]["spec"]
    resources = _container(model)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["memory"] == "16Gi" and resources["requests"]["cpu"] == "4"
    assert GPU_TOLERATION in pod["tolerations"]
    # the run-level CPU pool selector of dagster_cloud.yaml is replaced, not merged: the pod can land on a GPU node
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tags = k8s.step_tags(k8s.plan_definitions(load_specs()))
    assert tags["fraud__model"][1] == "gpu"
    for step, job in jobs.items():
        if step != "fraud__model":
            assert "nvidia.com/gpu" not in json.dumps(job), step
            assert tags[step][1] is None


def test_gpu_node_selector_comes_from_the_profile(prod: None, gpu_pipelines: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_GPU_NODE_SELECTOR", "cloud.google.com/gke-accelerator=nvidia-h100-80gb, kiln.dev/pool=gpu")
    objects = k8s.render_all()
    pod = _jobs(objects)["fraud__model"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "kiln.dev/pool": "gpu"}
    monkeypatch.setenv("KILN_GPU_NODE_SELECTOR", "no-equals-sign")
    with pytest.raises(steps.K8sConfigError, match="KILN_GPU_NODE_SELECTOR: 'no-equals-sign' is not key=value"):
        steps.gpu_node_selector()


def test_user_config_cannot_leave_a_gpu_pod_unschedulable(prod: None) -> None:
    spec = load_spec(FRAUD_SPEC)
    hostile = {
        "merge_behavior": "DEEP",
        "container_config": {"resources": {"requests": {"cpu": "8", "nvidia.com/gpu": 0}, "limits": {"cpu": "2", "nvidia.com/gpu": 0}}},
        "pod_spec_config": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                            "node_selector": {"team": "ml"}},
    }
    config = steps.k8s_config("4", "16Gi", 1, extra=hostile, node_selector={"nvidia.com/gpu.present": "true"})
    resources = config["container_config"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["cpu"] == "8" and resources["limits"]["cpu"] == "8"  # a limit below the request is lifted
    tolerations = config["pod_spec_config"]["tolerations"]
    assert tolerations[0] == GPU_TOLERATION
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in tolerations
    assert config["pod_spec_config"]["node_selector"] == {"team": "ml", "nvidia.com/gpu.present": "true"}
    assert config["merge_behavior"] == "SHALLOW"
    job = kubernetes.serialize(k8s.step_job("fraud__model", {"dagster-k8s/config": json.dumps(config)}))
    assert k8s.validate_objects({"hostile": job}) == {}
    assert "kiln.dev/pool" not in job["spec"]["template"]["spec"]["nodeSelector"]
    # what the guard prevents: dagster-k8s' default DEEP merge would keep the CPU pool selector on the GPU pod
    deep = json.dumps(config | {"merge_behavior": "DEEP"})
    merged = kubernetes.serialize(k8s.step_job("fraud__model", {"dagster-k8s/config": deep}))["spec"]["template"]["spec"]["nodeSelector"]
    assert merged["kiln.dev/pool"] == "cpu" and merged["nvidia.com/gpu.present"] == "true"
    with pytest.raises(steps.K8sConfigError, match="CPU step"):
        steps.k8s_config("1", "1Gi", 0, extra={"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}})
    plain = steps.op_tags(spec, "model", extra={})["dagster-k8s/config"]
    assert plain["container_config"]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"} and "merge_behavior" not in plain


def test_quantities_compare_across_units() -> None:
    assert steps.parse_quantity("500m") < steps.parse_quantity("1") < steps.parse_quantity("1.5")
    assert steps.parse_quantity("1Gi") > steps.parse_quantity("1G") > steps.parse_quantity("512Mi")
    with pytest.raises(steps.K8sConfigError, match="'lots' is not a Kubernetes quantity"):
        steps.parse_quantity("lots")


def test_render_all_includes_the_release_objects_and_validates_the_httproute(prod: None, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.spec import spec_data

    data = spec_data(FRAUD_SPEC)
    data["serving"] = {**data.get("serving", {}), "release": {"mode": "shadow", "challenger_share": 0.5}}
    (tmp_path / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(tmp_path))
    monkeypatch.setenv("KILN_GATEWAY", "gateways/public")
    objects = k8s.render_all()
    endpoints = {name: obj for name, obj in objects.items() if name.startswith("endpoints/")}
    assert sorted(endpoints) == ["endpoints/fraud/deployment-kiln-fraud-v1.yaml", "endpoints/fraud/deployment-kiln-fraud-v2.yaml",
                                 "endpoints/fraud/httproute-kiln-fraud.yaml", "endpoints/fraud/service-kiln-fraud-v1.yaml",
                                 "endpoints/fraud/service-kiln-fraud-v2.yaml", "endpoints/fraud/service-kiln-fraud.yaml"]
    assert k8s.validate_objects(endpoints) == {}
    route = endpoints["endpoints/fraud/httproute-kiln-fraud.yaml"]
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public",
                                            "namespace": "gateways"}]
    assert route["spec"]["rules"][0]["filters"][0]["requestMirror"]["backendRef"]["name"] == "kiln-fraud-v2"
    broken = json.loads(json.dumps(route))
    broken["spec"]["rules"][0]["backendRefs"][0]["wieght"] = 100  # a typo of `weight`
    errors = k8s.validate_objects({"route": broken, "ok": route})
    assert list(errors) == ["route"] and errors["route"].startswith("spec.rules.0.backendRefs.0: Additional properties")
    assert "'wieght' was unexpected" in errors["route"]


def test_cpu_endpoint_deployment_and_service(prod: None) -> None:
    spec = load_spec(FRAUD_SPEC)
    image = kubernetes.endpoint_image(spec, "kiln-fraud:abc123")
    deployment, service = (kubernetes.serialize(m) for m in kubernetes.endpoint_manifests(spec, image))
    assert k8s.validate_objects({"deployment": deployment, "service": service}) == {}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == spec.serving.replicas
    assert container["image"] == "registry.local/kiln/kiln-fraud:abc123"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    # the prediction log ships to the prod state root as objects; the pod keeps only a spill emptyDir (no shared volume)
    env = {e["name"]: e for e in container["env"]}
    assert env["KILN_PREDICTION_LOG_ROOT"]["value"] == "/tmp/kiln-state" and "KILN_PREDICTION_LOG" not in env
    assert env["KILN_PREDICTION_LOG_SPILL_DIR"]["value"] == kubernetes.PREDLOG_SPILL_DIR
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kiln-secrets", "key": "AWS_SECRET_ACCESS_KEY",
                                                                          "optional": True}
    assert {"name": "predlog-spill", "mountPath": kubernetes.PREDLOG_SPILL_DIR} in container["volumeMounts"]
    assert {"name": "predlog-spill", "emptyDir": {}} in pod["volumes"] and "persistentVolumeClaim" not in json.dumps(pod)
    assert container["resources"]["limits"] == {"cpu": spec.serving.cpu, "memory": spec.serving.memory}
    assert "nvidia.com/gpu" not in json.dumps(deployment) and "tolerations" not in pod
    assert deployment["spec"]["template"]["metadata"]["annotations"]["kiln/image-flavor"] == "cpu"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == spec.serving.port and service["spec"]["ports"][0]["targetPort"] == "http"


def test_gpu_endpoint_gets_gpu_limit_and_toleration(prod: None, gpu_pipelines: Path) -> None:
    spec = load_specs()[0]
    deployment, service = (kubernetes.serialize(m) for m in kubernetes.endpoint_manifests(spec, kubernetes.endpoint_image(spec)))
    assert k8s.validate_objects({"deployment": deployment, "service": service}) == {}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert GPU_TOLERATION in pod["tolerations"] and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["metadata"]["annotations"]["kiln/image-flavor"] == "gpu"


def test_serving_images_follow_the_spec(gpu_pipelines: Path) -> None:
    from importlib.metadata import version

    from serving.images import CUDA_BASE_IMAGE, image_flavor, image_for

    cpu_spec, gpu_spec = load_spec(FRAUD_SPEC), load_specs()[0]
    cpu, gpu = image_for(cpu_spec), image_for(gpu_spec)
    assert image_flavor(cpu_spec) == "cpu" and image_flavor(gpu_spec) == "gpu"
    assert cpu.base_image == "python:3.11-slim" and "torch" not in cpu.python_requirements
    assert gpu.base_image == CUDA_BASE_IMAGE and "torch==2.13.0" in gpu.python_requirements.splitlines()
    assert any("uv" in c for c in gpu.commands)  # CUDA images have no pip; BentoML's Dockerfile needs uv
    # The LightGBM bento's model library, pinned to the version training used (requirements.lock).
    assert f"lightgbm=={version('lightgbm')}" in cpu.python_requirements.splitlines()


def _registered_tiny_model(tmp_path: Path) -> tuple[Any, str]:
    """A real LightGBM model registered as 'fraud' in a temporary SQLite registry, with its checksum recorded."""
    import lightgbm as lgb
    import mlflow as mlf
    import numpy as np

    from resources.mlflow import MlflowResource, record_checksum

    resource = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "art").as_uri())
    resource.client()
    rng = np.random.default_rng(0)
    booster = lgb.train({"objective": "binary", "verbosity": -1}, lgb.Dataset(rng.random((60, 3)), label=rng.integers(0, 2, 60)),
                        num_boost_round=2)
    with mlf.start_run(experiment_id=resource.experiment_id("fraud")):
        info = mlf.lightgbm.log_model(booster, name="model", registered_model_name="fraud", pip_requirements=["lightgbm"])
    version = str(info.registered_model_version)
    record_checksum(resource, "fraud", version)
    return resource, version


def test_prod_endpoint_asset_records_manifests_instead_of_serving(prod: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KILN_ENDPOINT_TARGET=gitops: the release objects are written, nothing is applied (tests/test_endpoint_release.py
    covers the kubernetes target)."""
    import dagster as dg

    from assets import endpoint as endpoint_stage
    from resources.serving import ServingResource
    from resources.storage import KilnStorage

    monkeypatch.setenv("KILN_ENDPOINT_TARGET", "gitops")
    spec = load_spec(FRAUD_SPEC)
    endpoint = endpoint_stage.build(spec)[0]
    mlflow, version = _registered_tiny_model(tmp_path)  # the endpoint verifies the artifact's checksum before deploying
    context = dg.build_asset_context(resources={
        "storage": KilnStorage(source_root=str(tmp_path / "src"), state_root=str(tmp_path / "state")),
        "serving": ServingResource(state_root=str(tmp_path / "state"), bentoml_home=str(tmp_path / "bentoml")),
        "mlflow": mlflow,
    })
    out = endpoint(context, bento={"tag": "kiln-fraud:v7abc", "model_tag": "fraud:xyz", "model_version": version})
    record = out.value
    assert record["url"] == "http://kiln-fraud.kiln.svc.cluster.local:3100"
    assert record["image"] == "registry.local/kiln/kiln-fraud:v7abc" and record["model_version"] == version
    assert record["objects"] == [f"Deployment/kiln-fraud-v{version}", f"Service/kiln-fraud-v{version}", "Service/kiln-fraud",
                                 "HTTPRoute/kiln-fraud"]
    assert record["target"] == "gitops" and record["applied"] == [] and record["healthy"] is None
    written = list(yaml.safe_load_all(Path(record["manifests"]).read_text()))
    assert [o["kind"] for o in written] == ["Deployment", "Service", "Service", "HTTPRoute"]
    assert written[0]["spec"]["template"]["metadata"]["annotations"]["kiln/model-version"] == version
    assert k8s.validate_objects({str(i): o for i, o in enumerate(written)}) == {}
    assert not (tmp_path / "state" / "endpoints" / "fraud" / "endpoint.json").exists()  # no local process was started
    assert out.metadata["image"].value == record["image"]


def test_dagster_cloud_container_context_is_accepted_by_dagster_k8s() -> None:
    from dagster import DagsterInvalidConfigError
    from dagster_k8s.container_context import K8sContainerContext

    raw = k8s.code_location_container_context()
    context = K8sContainerContext.create_from_config(raw)
    assert context.namespace == "kiln"
    assert context.run_k8s_config.container_config["resources"]["limits"]["memory"] == "1Gi"
    assert context.server_k8s_config.container_config["resources"]["requests"]["cpu"] == "250m"
    assert context.run_k8s_config.pod_spec_config["node_selector"] == {"kiln.dev/pool": "cpu"}
    assert {"name": "KILN_PROFILE", "value": "prod"} in context.run_k8s_config.container_config["env"]
    broken = {"k8s": {**raw["k8s"], "run_k8s_config": {"container_cfg": {}}}}
    with pytest.raises(DagsterInvalidConfigError):
        K8sContainerContext.create_from_config(broken)


def _validated(schema: Any, value: Any) -> Any:
    """``value`` checked against a Dagster config schema by Dagster itself (as an op's config); raises
    DagsterInvalidConfigError naming the offending entry, else returns it with its env vars resolved."""
    import dagster as dg

    @dg.op(config_schema=schema)
    def check() -> None: ...

    @dg.job
    def probe() -> None:
        check()

    return dg.validate_run_config(probe, {"ops": {"check": {"config": value}}})["ops"]["check"]["config"]


def test_deploy_dagster_yaml_is_a_valid_instance_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    limits = {(t["key"], json.dumps(t.get("value"))): t["limit"] for t in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert limits[("kiln/retrain", json.dumps({"applyLimitPerUniqueValue": True}))] == 1
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    # Dagster loads every section that needs no database or cluster as an instance (run coordinator, concurrency,
    # run monitoring and retries, telemetry): an unknown key or a wrong type fails here.
    local = {name: section for name, section in config.items() if name not in ("storage", "run_launcher")}
    with dg.instance_for_test(overrides=local) as instance:
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
    # The storage and the run launcher against their own config schemas, with the env vars a cluster provides.
    for name, value in {"KILN_K8S_NAMESPACE": "kiln", "DAGSTER_PG_HOST": "postgres", "DAGSTER_PG_PORT": "5432",
                        "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "secret"}.items():
        monkeypatch.setenv(name, value)
    storage = _validated(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage["postgres_db"]["hostname"] == "postgres" and storage["postgres_db"]["scheme"] == "postgresql+psycopg2"
    launcher = _validated(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert launcher["job_namespace"] == "kiln"
    with pytest.raises(dg.DagsterInvalidConfigError, match="job_namspace"):
        _validated(K8sRunLauncher.config_type(), config["run_launcher"]["config"] | {"job_namspace": "kiln"})
    from platform_defs.definitions import defs

    assert defs.resolve_job_def("fraud_retrain").tags["kiln/retrain"] == "fraud"


def test_helm_values_use_kiln_as_user_deployment() -> None:
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "platform_defs.definitions", "-a", "defs"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["concurrency"]["runs"]["tagConcurrencyLimits"][0]["key"] == "kiln/retrain"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_cli_renders_and_validates(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KILN_K8S") and k != "KILN_PIPELINES_DIR"}
    out = subprocess.run([sys.executable, "-m", "platform_defs.k8s", "render", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "jobs" / "fraud__model.yaml").exists()
    endpoint = tmp_path / "endpoints" / "fraud"
    assert sorted(p.name for p in endpoint.iterdir()) == ["deployment-kiln-fraud-v1.yaml", "httproute-kiln-fraud.yaml",
                                                          "service-kiln-fraud-v1.yaml", "service-kiln-fraud.yaml"]
    ok = subprocess.run([sys.executable, "-m", "platform_defs.k8s", "validate"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"objects valid for Kubernetes {k8s.KUBERNETES_VERSION} (strict)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "platform_defs.k8s", "validate"], cwd=REPO, env=env | {"KILN_K8S_STEP_CONFIG": "{oops"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "KILN_K8S_STEP_CONFIG: not JSON" in bad.stderr and "Traceback" not in bad.stderr


def test_strict_validation_names_the_bad_field(prod: None) -> None:
    objects = k8s.render_all(load_specs())
    job = json.loads(json.dumps(objects["jobs/fraud__raw.yaml"]))
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # a typo of `limits`
    errors = k8s.validate_objects({"typo": job, "ok": objects["jobs/fraud__model.yaml"]})
    assert list(errors) == ["typo"]
    assert errors["typo"].startswith("spec.template.spec.containers.0.resources: Additional properties are not allowed ('limit'")
    assert "Couldn't find schema" in k8s.validate_objects({"x": {"apiVersion": "v1", "kind": "Bogus"}})["x"]


def test_serving_images_freeze_to_the_dockerfiles_bentoml_builds(tmp_path: Path) -> None:
    from serving.images import CUDA_BASE_IMAGE, image_for

    specs = {s.name: s for s in load_specs()}
    built = {}
    for name, spec in (("fraud", specs["fraud"]), ("breast_cancer", specs["breast_cancer"])):
        bento_fs = tmp_path / name
        (bento_fs / "src").mkdir(parents=True)
        image_for(spec).freeze(bento_fs, [], None)
        built[name] = ((bento_fs / "env/docker/Dockerfile").read_text(), (bento_fs / "env/python/requirements.txt").read_text())
    cpu_dockerfile, cpu_requirements = built["fraud"]
    gpu_dockerfile, gpu_requirements = built["breast_cancer"]  # torch trainer with gpu: 1
    assert "FROM python:3.11-slim AS base-container" in cpu_dockerfile and "torch" not in cpu_requirements
    assert f"FROM {CUDA_BASE_IMAGE} AS base-container" in gpu_dockerfile
    assert gpu_dockerfile.index("pip install --break-system-packages uv") < gpu_dockerfile.index("uv venv --python 3.11")
    # Each bento carries its own model library, pinned to the lock: torch for the torch model, lightgbm for LightGBM.
    assert "torch==2.13.0" in gpu_requirements.splitlines() and "lightgbm" not in gpu_requirements
    assert any(line.startswith("lightgbm==") for line in cpu_requirements.splitlines())
    assert "USER bentoml" in gpu_dockerfile  # uid 1034: the endpoint Deployment runs as it (runAsNonRoot)


def test_prod_executor_is_k8s_unless_kiln_executor_picks_a_local_one(prod: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg
    from dagster_k8s import k8s_job_executor

    from platform_defs.profiles import executor

    assert executor("prod") is k8s_job_executor and executor("local") is None
    monkeypatch.setenv("KILN_EXECUTOR", "multiprocess")
    assert executor("prod") is dg.multiprocess_executor
    monkeypatch.setenv("KILN_EXECUTOR", "in_process")
    assert executor("prod") is dg.in_process_executor
    monkeypatch.setenv("KILN_EXECUTOR", "kubernetes")
    with pytest.raises(ValueError, match="KILN_EXECUTOR: 'kubernetes' is not one of k8s, multiprocess, in_process"):
        executor("prod")


def test_the_image_step_pod_runs_buildah_unprivileged_on_vfs(prod: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<p>/image` builds in its own step pod: chroot isolation and the vfs driver on an emptyDir (no mounts, no nested
    user namespaces), root in the container with a fixed capability set and no privilege escalation or privileged
    mode; every other step keeps the run's non-root settings. The user's KILN_K8S_STEP_CONFIG still merges in."""
    monkeypatch.setenv("KILN_K8S_STEP_CONFIG", json.dumps({"container_config": {"env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]}}))
    objects = k8s.render_all()
    assert k8s.validate_objects(objects) == {}
    pod = objects["jobs/fraud__image.yaml"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["STORAGE_DRIVER"] == "vfs" and env["BUILDAH_ISOLATION"] == "chroot" and env["HTTPS_PROXY"] == "http://proxy:3128"
    context = container["securityContext"]
    assert context["runAsUser"] == 0 and context["allowPrivilegeEscalation"] is False and not context.get("privileged")
    assert context["capabilities"]["drop"] == ["ALL"] and "SYS_ADMIN" not in context["capabilities"]["add"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "buildah-storage"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "buildah-storage"]
    assert mount["mountPath"] == "/var/lib/containers" and volume["emptyDir"]["sizeLimit"] == "10Gi"
    assert container["resources"]["limits"]["ephemeral-storage"] == "10Gi"
    other = objects["jobs/fraud__bento.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert "securityContext" not in other or other["securityContext"].get("runAsUser") != 0
    assert "STORAGE_DRIVER" not in {e["name"] for e in other.get("env", [])}
