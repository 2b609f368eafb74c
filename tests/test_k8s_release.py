"""Release manifests (resources/kubernetes.py: release_manifests): a Deployment and Service per served version, the
stable Service, and a Gateway API HTTPRoute rendered from the route table of kiln/release.py.

Core objects are validated strictly with kubernetes-validate (Kubernetes 1.37), as tests/test_k8s_render.py does.
HTTPRoute is a CRD: no installed package ships its schema (kubernetes-validate bundles core Kubernetes only, and no
PyPI package found ships the Gateway API CRDs). HTTPROUTE_SCHEMA (resources/httproute_schema.py, shared with
platform_defs/k8s.py: validate_objects) is therefore HAND-WRITTEN: a focused structural check (jsonschema) of the
Gateway API v1 HTTPRoute fields Kiln uses, with the limits and patterns of the v1 API (weights 0..1000000, at most 16
rules/backendRefs/filters, 32 parentRefs, DNS patterns) and two of its CEL rules (a Service reference needs a port; a
RequestMirror filter needs ``requestMirror``). Unknown fields are refused at every level, as kubernetes-validate
--strict does for core objects. It is not the upstream CRD schema.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kiln.release import ReleaseError, route_table
from kiln.spec import PipelineSpec, spec_data
from platform_defs import k8s
from resources import kubernetes
from resources.httproute_schema import HTTPROUTE_SCHEMA
from tests.conftest import FRAUD_SPEC

IMAGES = {"7": "registry.local/kiln/kiln-fraud:b7", "8": "registry.local/kiln/kiln-fraud:b8"}


@pytest.fixture()
def prod(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KILN_PROFILE": "prod", "KILN_K8S_NAMESPACE": "kiln", "KILN_IMAGE_REGISTRY": "registry.local/kiln"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KILN_PREDICTIONS_PVC", raising=False)


def _spec(mode: str, share: float = 0.1) -> PipelineSpec:
    data = spec_data(FRAUD_SPEC)
    data["serving"] = {**data.get("serving", {}), "release": {"mode": mode, "challenger_share": share}}
    return PipelineSpec.model_validate(data)


def _by_name(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def _validate(objects: list[dict[str, Any]]) -> None:
    """Core objects through kubernetes-validate --strict, the HTTPRoute through the hand-written schema (both in
    k8s.validate_objects), and the route once more with jsonschema directly."""
    assert k8s.validate_objects({f"{o['kind']}/{o['metadata']['name']}": o for o in objects}) == {}
    for route in (o for o in objects if o["kind"] == "HTTPRoute"):
        jsonschema.validate(route, HTTPROUTE_SCHEMA, cls=jsonschema.Draft202012Validator)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_canary_renders_a_deployment_and_service_per_version_and_a_weighted_route(prod: None) -> None:
    spec = _spec("canary", 0.2)
    table = route_table(spec, "7", "8")
    objects = kubernetes.release_manifests(spec, table, kubernetes.release_images(spec, {"7": {"tag": "kiln-fraud:b7"},
                                                                                        "8": {"tag": "kiln-fraud:b8"}}))
    _validate(objects)
    names = list(_by_name(objects))
    assert names == ["Deployment/kiln-fraud-v7", "Service/kiln-fraud-v7", "Deployment/kiln-fraud-v8", "Service/kiln-fraud-v8",
                     "Service/kiln-fraud", "HTTPRoute/kiln-fraud"]
    by = _by_name(objects)
    for version, role in (("7", "champion"), ("8", "challenger")):
        dep, svc = by[f"Deployment/kiln-fraud-v{version}"], by[f"Service/kiln-fraud-v{version}"]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["kiln/pipeline"] == "fraud" and pod_labels["kiln/model-version"] == version
        assert dep["metadata"]["labels"]["kiln/role"] == role and "kiln/role" not in pod_labels
        assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == IMAGES[version]  # endpoint_image of the bento record's tag
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert _matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert svc["spec"]["ports"] == [{"name": "http", "port": 3100, "targetPort": "http", "protocol": "TCP"}]
    other = by["Deployment/kiln-fraud-v8"]["spec"]["template"]["metadata"]["labels"]
    assert not _matches(by["Service/kiln-fraud-v7"]["spec"]["selector"], other)  # a version's Service never reaches another's pods
    stable = by["Service/kiln-fraud"]["spec"]["selector"]
    assert _matches(stable, by["Deployment/kiln-fraud-v7"]["spec"]["template"]["metadata"]["labels"]) and not _matches(stable, other)
    route = by["HTTPRoute/kiln-fraud"]
    assert route["spec"]["parentRefs"] == [{"group": "", "kind": "Service", "name": "kiln-fraud", "port": 3100}]
    (rule,) = route["spec"]["rules"]
    assert [(b["name"], b["port"], b["weight"]) for b in rule["backendRefs"]] == [("kiln-fraud-v7", 3100, 80), ("kiln-fraud-v8", 3100, 20)]
    assert "filters" not in rule
    assert route["metadata"]["annotations"]["kiln/weights"] == "7=80,8=20"


def test_shadow_mirrors_to_the_challenger_and_serves_only_the_champion(prod: None) -> None:
    spec = _spec("shadow", 0.5)
    objects = kubernetes.release_manifests(spec, route_table(spec, "7", "8"), IMAGES)
    _validate(objects)
    by = _by_name(objects)
    assert "Deployment/kiln-fraud-v8" in by and "Service/kiln-fraud-v8" in by  # the mirror target runs
    (rule,) = by["HTTPRoute/kiln-fraud"]["spec"]["rules"]
    assert [(b["name"], b["weight"]) for b in rule["backendRefs"]] == [("kiln-fraud-v7", 100)]
    assert rule["filters"] == [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"group": "", "kind": "Service", "name": "kiln-fraud-v8", "port": 3100}}}]
    assert by["Service/kiln-fraud"]["spec"]["selector"]["kiln/model-version"] == "7"
    assert by["Deployment/kiln-fraud-v8"]["metadata"]["labels"]["kiln/role"] == "challenger"


def test_no_release_renders_the_champion_only_and_a_gateway_parent_can_be_named(prod: None) -> None:
    spec = _spec("none")
    gateway = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public", "namespace": "gateways"}]
    objects = kubernetes.release_manifests(spec, route_table(spec, "7", "8"), {"7": IMAGES["7"]}, namespace="ml", parents=gateway)
    _validate(objects)
    assert list(_by_name(objects)) == ["Deployment/kiln-fraud-v7", "Service/kiln-fraud-v7", "Service/kiln-fraud", "HTTPRoute/kiln-fraud"]
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}
    route = objects[-1]
    assert route["spec"]["parentRefs"] == gateway
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [("kiln-fraud-v7", 100)]


def test_release_errors_say_what_is_missing(prod: None) -> None:
    spec = _spec("canary", 0.3)
    with pytest.raises(ReleaseError, match=r"fraud: release: no image for version\(s\) 8 \(images for: 7\)"):
        kubernetes.release_manifests(spec, route_table(spec, "7", "8"), {"7": IMAGES["7"]})
    other = spec.model_copy(update={"name": "churn"})
    with pytest.raises(ReleaseError, match="churn: release: the route table is for pipeline 'fraud'"):
        kubernetes.http_route(other, route_table(spec, "7", "8"))
    with pytest.raises(ReleaseError, match="longer than 63 characters"):
        kubernetes.version_name(spec, "1" * 60)


def test_the_hand_written_httproute_schema_refuses_what_the_api_would(prod: None) -> None:
    spec = _spec("shadow")
    route = kubernetes.http_route(spec, route_table(spec, "7", "8"))
    jsonschema.validate(route, HTTPROUTE_SCHEMA)
    broken: list[tuple[str, Any]] = [
        ("'wieght' was unexpected", lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(wieght=1)),
        ("1000001 is greater than the maximum", lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(weight=1000001)),
        ("'port' is a required property", lambda r: r["spec"]["rules"][0]["backendRefs"][0].pop("port")),
        ("'requestMirror' is a required property", lambda r: r["spec"]["rules"][0]["filters"][0].pop("requestMirror")),
        ("'Mirror' is not one of", lambda r: r["spec"]["rules"][0]["filters"][0].update(type="Mirror")),
        ("'gateway.networking.k8s.io/v1' was expected", lambda r: r.update(apiVersion="gateway.networking.k8s.io/v1beta2")),
    ]
    for message, damage in broken:
        bad = copy.deepcopy(route)
        damage(bad)
        with pytest.raises(jsonschema.ValidationError, match=message.replace("(", r"\(")):
            jsonschema.validate(bad, HTTPROUTE_SCHEMA)


def test_release_record_writes_the_manifests_for_gitops(prod: None, tmp_path: Path) -> None:
    spec = _spec("canary", 0.25)
    bentos = {"7": {"tag": "kiln-fraud:b7", "model_tag": "fraud:m7"}, "8": {"tag": "kiln-fraud:b8", "model_tag": "fraud:m8"}}
    record = kubernetes.release_record(spec, route_table(spec, "7", "8"), bentos, str(tmp_path))
    written = list(yaml.safe_load_all(Path(record["manifests"]).read_text()))
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in written] == record["objects"]
    _validate(written)
    assert record["release"] == {"mode": "canary", "weights": {"7": 75, "8": 25}, "mirror": None}
    assert record["model_version"] == "7" and record["image"] == IMAGES["7"] and record["images"] == IMAGES
    assert record["url"] == "http://kiln-fraud.kiln.svc.cluster.local:3100"
    assert kubernetes.version_url(spec, "8") == "http://kiln-fraud-v8.kiln.svc.cluster.local:3100"
