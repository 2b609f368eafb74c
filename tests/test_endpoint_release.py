"""The prod `<p>/endpoint` release (resources/k8s_apply.py: endpoint_release, called by assets/endpoint.py).

There is no Kubernetes API server here: ``FakeApi`` (imported from tests/test_k8s_apply.py) STANDS IN FOR THE KUBERNETES
API — the public DynamicClient methods k8s_apply calls, over an in-memory state, with generations, server-owned
metadata, 404s as the dynamic client raises them, and a Deployment controller whose ``stuck`` images never become
available. The smoke check is a stand-in too (the real one POSTs to each version's Service inside the cluster); it
records which versions and URLs it was asked about and what the fake cluster served at that moment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.spec import PipelineSpec, load_spec, spec_data
from platform_defs import k8s
from resources import k8s_apply, kubernetes
from tests.conftest import FRAUD_SPEC
from tests.test_k8s_apply import FakeApi, FakeClock

V7 = {"tag": "kiln-fraud:b7", "model_tag": "fraud:m7", "model_version": "7"}
V8 = {"tag": "kiln-fraud:b8", "model_tag": "fraud:m8", "model_version": "8"}
IMAGE = {"7": "registry.local/kiln/kiln-fraud:b7", "8": "registry.local/kiln/kiln-fraud:b8"}
URL = {v: f"http://kiln-fraud-v{v}.kiln.svc.cluster.local:3100" for v in ("7", "8")}


@pytest.fixture()
def prod(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KILN_PROFILE": "prod", "KILN_K8S_NAMESPACE": "kiln", "KILN_IMAGE_REGISTRY": "registry.local/kiln"}.items():
        monkeypatch.setenv(name, value)
    for name in ("KILN_PREDICTIONS_PVC", "KILN_GATEWAY", "KILN_ENDPOINT_TARGET", "KILN_RELEASE_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


class Check:
    """A stand-in for the live smoke check: records (version, url, what the fake cluster served) per call."""

    def __init__(self, api: FakeApi, fail: str | None = None) -> None:
        self.api, self.fail, self.calls = api, fail, []  # type: ignore[var-annotated]

    def __call__(self, version: str, url: str) -> None:
        self.calls.append((version, url, dict(self.api.serving)))
        if self.fail:
            raise RuntimeError(self.fail)


def _spec(mode: str = "none", share: float = 0.1) -> PipelineSpec:
    data = spec_data(FRAUD_SPEC)
    data["serving"] = {**data.get("serving", {}), "release": {"mode": mode, "challenger_share": share}}
    return PipelineSpec.model_validate(data)


def _release(api: FakeApi, state: Path, bento: dict[str, str], check: Check, spec: PipelineSpec | None = None,
             **kw: Any) -> dict[str, Any]:
    clock = FakeClock()
    return k8s_apply.endpoint_release(spec or _spec(), bento, str(state), "kubernetes", check=check, api=api, timeout_s=60,
                                      clock=clock, sleep=clock.sleep, **kw)


def _written(record: dict[str, Any]) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(Path(record["manifests"]).read_text()))


def test_kubernetes_target_applies_the_release_smoke_tests_it_and_writes_the_record(prod: None, tmp_path: Path) -> None:
    api = FakeApi()
    # An endpoint rendered before releases existed: one `kiln-fraud` Deployment + Service, applied by hand.
    for legacy in kubernetes.endpoint_manifests(_spec(), IMAGE["7"], model_version="7"):
        obj = kubernetes.serialize(legacy)
        api.server_side_apply(api.resources.get(obj["apiVersion"], obj["kind"]), body=obj, name=obj["metadata"]["name"],
                              namespace="kiln", field_manager="kiln", force_conflicts=True)
    check = Check(api)
    record = _release(api, tmp_path, V7, check)
    # the smoke test ran once, through v7's own Service, after v7's pods were serving
    assert check.calls == [("7", URL["7"], {"kiln-fraud-v7": IMAGE["7"]})]
    assert record["created"] == ["Deployment/kiln/kiln-fraud-v7", "Service/kiln/kiln-fraud-v7", "HTTPRoute/kiln/kiln-fraud"]
    assert record["updated"] == ["Service/kiln/kiln-fraud"]  # the old Service's name is the stable Service's
    assert record["pruned"] == ["Deployment/kiln/kiln-fraud"] and record["prune_errors"] == []  # the legacy Deployment
    assert record["target"] == "kubernetes" and record["healthy"] is True
    assert record["url"] == "http://kiln-fraud.kiln.svc.cluster.local:3100" and record["model_version"] == "7"
    assert record["release"] == {"mode": "none", "weights": {"7": 100}, "mirror": None}
    assert sorted((k[1], k[3]) for k in api.state) == [("Deployment", "kiln-fraud-v7"), ("HTTPRoute", "kiln-fraud"),
                                                      ("Service", "kiln-fraud"), ("Service", "kiln-fraud-v7")]
    stable = api.state[("v1", "Service", "kiln", "kiln-fraud")]
    assert stable["spec"]["selector"] == {"app.kubernetes.io/name": "kiln-fraud", "kiln/model-version": "7"}
    # the record file holds exactly what was applied
    written = _written(record)
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in written] == record["objects"]
    for obj in written:
        live = api.state[k8s_apply.key_of(obj)]
        assert live["spec"] | obj["spec"] == live["spec"] and live["metadata"]["labels"] == obj["metadata"]["labels"]


def test_a_new_champion_that_never_becomes_available_fails_naming_it_and_the_old_champion_keeps_serving(
        prod: None, tmp_path: Path) -> None:
    api = FakeApi()
    first = _release(api, tmp_path, V7, Check(api))
    before, manifests = api.specs(), Path(first["manifests"]).read_text()
    api.stuck.add(IMAGE["8"])
    check = Check(api)
    with pytest.raises(k8s_apply.ReleaseFailed) as failed:
        _release(api, tmp_path, V8, check)
    assert failed.value.stage == "rollout" and failed.value.restored
    assert "rollout not complete after 60s: Deployment/kiln/kiln-fraud-v8: 0 of 1 updated replicas available" in str(failed.value)
    assert str(failed.value).endswith("previous objects restored")
    assert check.calls == []  # no smoke test of a version that never rolled out
    assert api.specs() == before  # v8's objects are gone, the stable Service and the route point at v7 again
    assert api.state[("v1", "Service", "kiln", "kiln-fraud")]["spec"]["selector"]["kiln/model-version"] == "7"
    assert api.serving == {"kiln-fraud-v7": IMAGE["7"]}
    assert Path(first["manifests"]).read_text() == manifests  # the record file still describes what serves


def test_a_failing_smoke_test_restores_the_champion(prod: None, tmp_path: Path) -> None:
    api = FakeApi()
    _release(api, tmp_path, V7, Check(api))
    before = api.specs()
    check = Check(api, fail=f"{URL['8']} (version 8): max |online - offline| 0.31 (tolerance 1e-09)")
    with pytest.raises(k8s_apply.ReleaseFailed, match=r"smoke test failed: .*kiln-fraud-v8.*0\.31.*; previous objects restored"):
        _release(api, tmp_path, V8, check)
    assert [c[:2] for c in check.calls] == [("8", URL["8"])]
    assert api.specs() == before


def test_a_canary_challenger_is_routed_and_both_versions_are_smoke_tested(prod: None, tmp_path: Path) -> None:
    api = FakeApi()
    check = Check(api)
    record = _release(api, tmp_path, V7, check, spec=_spec("canary", 0.2), challenger=V8)
    assert [c[:2] for c in check.calls] == [("7", URL["7"]), ("8", URL["8"])]
    assert record["release"] == {"mode": "canary", "weights": {"7": 80, "8": 20}, "mirror": None}
    route = api.state[("gateway.networking.k8s.io/v1", "HTTPRoute", "kiln", "kiln-fraud")]
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [("kiln-fraud-v7", 80), ("kiln-fraud-v8", 20)]


def test_gitops_target_writes_the_release_and_applies_nothing(prod: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_GATEWAY", "gateways/public")
    api = FakeApi()
    check = Check(api, fail="the smoke test must not run for gitops")
    record = k8s_apply.endpoint_release(_spec(), V7, str(tmp_path), "gitops", check=check, api=api)
    assert api.log == [] and api.state == {} and check.calls == []
    assert record["target"] == "gitops" and record["applied"] == [] and record["healthy"] is None
    written = _written(record)
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in written] == ["Deployment/kiln-fraud-v7", "Service/kiln-fraud-v7",
                                                                        "Service/kiln-fraud", "HTTPRoute/kiln-fraud"]
    assert k8s.validate_objects({f"{o['kind']}/{o['metadata']['name']}": o for o in written}) == {}
    assert written[-1]["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public",
                                                  "namespace": "gateways"}]
    assert Path(record["manifests"]) == tmp_path / "endpoints" / "fraud" / "k8s.yaml"
    with pytest.raises(ValueError, match="KILN_ENDPOINT_TARGET: 'kubectl' is not one of kubernetes, gitops"):
        k8s_apply.endpoint_release(_spec(), V7, str(tmp_path), "kubectl", api=api)


def test_the_prod_endpoint_asset_applies_through_the_injected_api_and_fails_naming_the_deployment(
        prod: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The asset itself (Dagster direct invocation), KILN_ENDPOINT_TARGET unset (kubernetes, the default), with the fake
    API passed through build(k8s_api=...)."""
    import dagster as dg

    from assets import endpoint as endpoint_stage
    from resources.serving import ServingResource
    from resources.storage import KilnStorage
    from tests.test_k8s_render import _registered_tiny_model

    api = FakeApi()
    check = Check(api)
    endpoint = endpoint_stage.build(load_spec(FRAUD_SPEC), k8s_api=lambda: api, release_check=check)[0]
    mlflow, version = _registered_tiny_model(tmp_path)  # the endpoint verifies the artifact's checksum first
    context = dg.build_asset_context(resources={
        "storage": KilnStorage(source_root=str(tmp_path / "src"), state_root=str(tmp_path / "state")),
        "serving": ServingResource(state_root=str(tmp_path / "state"), bentoml_home=str(tmp_path / "bentoml")),
        "mlflow": mlflow,
    })
    bento = {"tag": "kiln-fraud:v7abc", "model_tag": "fraud:xyz", "model_version": version}
    api.stuck.add("registry.local/kiln/kiln-fraud:v7abc")
    monkeypatch.setenv("KILN_RELEASE_TIMEOUT_S", "0")  # no waiting for a rollout that cannot finish
    with pytest.raises(dg.Failure) as failed:
        endpoint(context, bento=bento)
    assert failed.value.description.startswith("fraud/endpoint: release to Kubernetes failed: release: rollout failed: ")
    assert f"Deployment/kiln/kiln-fraud-v{version}" in failed.value.description
    assert failed.value.metadata["stage"].value == "rollout" and api.state == {}  # nothing was there before, nothing stays
    assert not failed.value.allow_retries

    api.stuck.clear()
    monkeypatch.setenv("KILN_RELEASE_TIMEOUT_S", "60")
    out = endpoint(context, bento=bento)
    assert [c[:2] for c in check.calls] == [(version, f"http://kiln-fraud-v{version}.kiln.svc.cluster.local:3100")]
    assert out.value["healthy"] is True and out.value["image"] == "registry.local/kiln/kiln-fraud:v7abc"
    assert out.metadata["target"].value == "kubernetes"
    assert ("apps/v1", "Deployment", "kiln", f"kiln-fraud-v{version}") in api.state
    assert not (tmp_path / "state" / "endpoints" / "fraud" / "endpoint.json").exists()  # no local process was started
