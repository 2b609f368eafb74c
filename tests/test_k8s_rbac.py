"""deploy/rbac.yaml, offline: valid objects (kubernetes-validate, strict), bound to the service account the run and
step pods use, and granting every verb `<p>/endpoint` needs on every kind of object it applies."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.spec import spec_data
from platform_defs import k8s
from tests.conftest import FRAUD_SPEC, REPO

RBAC = REPO / "deploy" / "rbac.yaml"
APPLY_VERBS = {"get", "list", "watch", "patch", "delete"}  # server-side apply, rollout wait, restore, removal


def _rbac() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(RBAC.read_text()) if d}


def test_rbac_objects_are_valid_and_bind_the_run_service_account() -> None:
    objects = _rbac()
    assert sorted(objects) == ["Role/kiln-runs", "RoleBinding/kiln-runs", "ServiceAccount/kiln-runs"]
    assert k8s.validate_objects(objects) == {}
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    account = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]["serviceAccountName"]
    binding = objects["RoleBinding/kiln-runs"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kiln"}]
    assert binding["roleRef"]["name"] == objects["Role/kiln-runs"]["metadata"]["name"]
    jobs = [r for r in objects["Role/kiln-runs"]["rules"] if r["apiGroups"] == ["batch"] and r["resources"] == ["jobs"]]
    assert jobs and {"create", "get", "watch", "delete"} <= set(jobs[0]["verbs"])  # the k8s_job_executor's step Jobs


@pytest.mark.parametrize("mode", ["canary", "shadow"])
def test_the_role_grants_what_the_endpoint_applies(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KILN_PROFILE": "prod", "KILN_K8S_NAMESPACE": "kiln", "KILN_CODE_IMAGE": "registry.local/kiln/code:1",
                        "KILN_IMAGE_REGISTRY": "registry.local/kiln", "KILN_STORAGE_PREFIX": "s3://kiln/storage",
                        "KILN_SOURCE_ROOT": "s3://kiln/sources", "KILN_STATE_ROOT": "s3://kiln/state",
                        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "BENTOML_HOME": str(tmp_path / "bentoml"),
                        "KILN_PIPELINES_DIR": str(tmp_path), "KILN_GATEWAY": "gateways/public"}.items():
        monkeypatch.setenv(name, value)
    data = spec_data(FRAUD_SPEC)
    data["serving"] = {**data.get("serving", {}), "release": {"mode": mode, "challenger_share": 0.2}}
    (tmp_path / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    applied = {(obj["apiVersion"].rpartition("/")[0], obj["kind"].lower() + "s")
               for name, obj in k8s.render_all().items() if name.startswith("endpoints/")}
    assert applied == {("apps", "deployments"), ("", "services"), ("gateway.networking.k8s.io", "httproutes")}
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in _rbac()["Role/kiln-runs"]["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    missing = {kind: sorted(APPLY_VERBS - granted.get(kind, set())) for kind in applied if APPLY_VERBS - granted.get(kind, set())}
    assert not missing, f"deploy/rbac.yaml lacks verbs the endpoint needs: {missing}"
