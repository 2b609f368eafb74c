"""Applying a release (resources/k8s_apply.py): server-side apply, rollout wait, smoke test, restore on failure.

There is no Kubernetes API server here. ``FakeApi`` below STANDS IN FOR THE KUBERNETES API: it offers the public methods
of ``kubernetes.dynamic.DynamicClient`` that k8s_apply calls (``resources.get``, ``server_side_apply``, ``get``,
``delete``) over a state dict, with what matters to a release modelled the way the API server and the Deployment
controller behave: generation counters bumped on spec changes, server-owned metadata (uid, resourceVersion,
managedFields) and a Service's defaulted clusterIP, an apply request refused when it carries managedFields or a stale
resourceVersion, 404s raised as the dynamic client's ``NotFoundError``, and a rollout that needs reads to progress.
Knobs: ``stuck`` (images whose pods never become available), ``crds`` (whether HTTPRoute is served), ``forbid_get``,
``invalid`` (names whose apply is refused).
What it does not model: field ownership merges between managers, admission, real pods. Time is a fake clock too.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError, ResourceNotFoundError, UnprocessibleEntityError

from kiln.release import route_table
from kiln.spec import PipelineSpec, spec_data
from resources import k8s_apply, kubernetes
from tests.conftest import FRAUD_SPEC

Key = tuple[str, str, str, str]


class FakeResource:
    def __init__(self, api_version: str, kind: str) -> None:
        self.api_version, self.kind = api_version, kind


class FakeResources:
    def __init__(self, api: FakeApi) -> None:
        self.api = api

    def get(self, api_version: str, kind: str) -> FakeResource:
        if kind == "HTTPRoute" and not self.api.crds:
            raise ResourceNotFoundError(f"No matches found for {{'api_version': '{api_version}', 'kind': '{kind}'}}")
        return FakeResource(api_version, kind)


def _error(cls: type, status: int, message: str) -> Exception:
    return cls(ApiException(status=status, reason=message))


class FakeApi:
    """Stands in for the Kubernetes API (see the module docstring)."""

    def __init__(self) -> None:
        self.resources = FakeResources(self)
        self.state: dict[Key, dict[str, Any]] = {}
        self.stuck: set[str] = set()  # images whose pods never become ready
        self.crds = True
        self.forbid_get = False
        self.invalid: set[str] = set()  # object names whose apply the API server refuses (422)
        self.serving: dict[str, str] = {}  # Deployment name -> image of the pods that serve (available)
        self.changed_reads: dict[Key, int] = {}
        self.log: list[str] = []
        self.revision = 0

    @staticmethod
    def _key(resource: FakeResource, name: str, namespace: str | None) -> Key:
        return (resource.api_version, resource.kind, namespace or "", name)

    def server_side_apply(self, resource: FakeResource, body: dict[str, Any], name: str, namespace: str | None = None,
                          field_manager: str | None = None, force_conflicts: bool | None = None) -> dict[str, Any]:
        assert (body["apiVersion"], body["kind"]) == (resource.api_version, resource.kind)
        meta = body["metadata"]
        key = self._key(resource, name, namespace)
        current = self.state.get(key)
        if "managedFields" in meta:
            raise _error(ApiException, 400, "metadata.managedFields must be nil")
        if "resourceVersion" in meta and (current is None or meta["resourceVersion"] != current["metadata"]["resourceVersion"]):
            raise _error(ApiException, 409, "the object has been modified")
        assert field_manager == "kiln" and force_conflicts is True
        if name in self.invalid:
            raise _error(UnprocessibleEntityError, 422, f'{resource.kind} "{name}" is invalid: spec.rules[0]: Too many')
        self.revision += 1
        new = copy.deepcopy({k: v for k, v in body.items() if k != "status"})
        if resource.kind == "Service":
            new["spec"].setdefault("clusterIP", current["spec"]["clusterIP"] if current else f"10.0.0.{self.revision}")
        generation = 1 if current is None else current["metadata"]["generation"] + (new.get("spec") != current.get("spec"))
        new["metadata"] |= {"uid": current["metadata"]["uid"] if current else f"uid-{self.revision}", "resourceVersion": str(self.revision),
                            "generation": generation, "creationTimestamp": "2026-12-06T00:00:00Z",
                            "managedFields": [{"manager": field_manager, "operation": "Apply"}]}
        if resource.kind == "Deployment":
            new["status"] = copy.deepcopy(current.get("status", {})) if current else {}
            if current is None or generation != current["metadata"]["generation"]:
                self.changed_reads[key] = 0
        self.state[key] = new
        self.log.append(f"apply {resource.kind}/{name}")
        return copy.deepcopy(new)

    def _reconcile(self, key: Key) -> None:
        """The Deployment controller: the first read after a change sees it unobserved, the next sees it rolled out,
        unless its image is stuck: then the new pod never becomes available and the old pods keep serving."""
        dep = self.state[key]
        if key not in self.changed_reads:
            return
        self.changed_reads[key] += 1
        if self.changed_reads[key] < 2:
            return
        want = dep["spec"]["replicas"]
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        generation = dep["metadata"]["generation"]
        if image in self.stuck:
            old = want if key[3] in self.serving else 0
            dep["status"] = {"observedGeneration": generation, "replicas": old + 1, "updatedReplicas": 1, "availableReplicas": old}
        else:
            self.serving[key[3]] = image
            dep["status"] = {"observedGeneration": generation, "replicas": want, "updatedReplicas": want, "availableReplicas": want}
            del self.changed_reads[key]

    def get(self, resource: FakeResource, name: str | None = None, namespace: str | None = None,
            label_selector: str | None = None) -> dict[str, Any]:
        if self.forbid_get:
            raise _error(ForbiddenError, 403, "deployments is forbidden")
        if name is None:
            wanted = [part.split("=", 1) for part in (label_selector or "").split(",") if part]
            items = [o for k, o in self.state.items() if k[:3] == (resource.api_version, resource.kind, namespace or "")
                     and all(w[0] in o["metadata"].get("labels", {}) and (len(w) == 1 or o["metadata"]["labels"][w[0]] == w[1])
                             for w in wanted)]
            return {"items": copy.deepcopy(items)}
        key = self._key(resource, name, namespace)
        if key not in self.state:
            raise _error(NotFoundError, 404, "Not Found")
        if resource.kind == "Deployment":
            self._reconcile(key)
        return copy.deepcopy(self.state[key])

    def delete(self, resource: FakeResource, name: str, namespace: str | None = None) -> None:
        key = self._key(resource, name, namespace)
        if key not in self.state:
            raise _error(NotFoundError, 404, "Not Found")
        del self.state[key]
        self.serving.pop(name, None) if resource.kind == "Deployment" else None
        self.log.append(f"delete {resource.kind}/{name}")

    def specs(self) -> dict[Key, Any]:
        """What each object asks for (spec, labels, annotations), without server-owned fields."""
        return {k: (o.get("spec"), o["metadata"].get("labels"), o["metadata"].get("annotations")) for k, o in self.state.items()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += max(seconds, 0.001)


@pytest.fixture()
def prod(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"KILN_K8S_NAMESPACE": "kiln", "KILN_IMAGE_REGISTRY": "registry.local/kiln"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KILN_PREDICTIONS_PVC", raising=False)


def _spec(mode: str = "none", share: float = 0.1, **serving: Any) -> PipelineSpec:
    data = spec_data(FRAUD_SPEC)
    data["serving"] = {**data.get("serving", {}), **serving, "release": {"mode": mode, "challenger_share": share}}
    return PipelineSpec.model_validate(data)


def _objects(spec: PipelineSpec, champion: str, challenger: str | None = None) -> list[dict[str, Any]]:
    images = {v: f"registry.local/kiln/kiln-fraud:b{v}" for v in ("7", "8")}
    return kubernetes.release_manifests(spec, route_table(spec, champion, challenger), images)


def _release(api: FakeApi, objects: list[dict[str, Any]], smoke: Any = None, clock: FakeClock | None = None, **kw: Any) -> dict[str, Any]:
    clock = clock or FakeClock()
    return k8s_apply.release(objects, api, smoke or (lambda: None), 60, poll_s=2, clock=clock, sleep=clock.sleep, **kw)


def _route(api: FakeApi) -> dict[str, Any]:
    return api.state[("gateway.networking.k8s.io/v1", "HTTPRoute", "kiln", "kiln-fraud")]


def test_release_applies_waits_for_rollout_then_runs_the_smoke_test(prod: None) -> None:
    api, clock = FakeApi(), FakeClock()
    seen: list[dict[str, str]] = []
    result = _release(api, _objects(_spec(), "7"), smoke=lambda: seen.append(dict(api.serving)), clock=clock)
    assert seen == [{"kiln-fraud-v7": "registry.local/kiln/kiln-fraud:b7"}]  # the smoke test ran once, after the rollout
    assert clock.sleeps == 1  # the first read saw the Deployment unobserved, the second rolled out
    assert result["created"] == ["Deployment/kiln/kiln-fraud-v7", "Service/kiln/kiln-fraud-v7", "Service/kiln/kiln-fraud",
                                 "HTTPRoute/kiln/kiln-fraud"] and result["updated"] == []
    route = _route(api)["spec"]["rules"][0]
    assert [(b["name"], b["weight"]) for b in route["backendRefs"]] == [("kiln-fraud-v7", 100)]


def test_a_challenger_that_never_becomes_available_is_removed_and_the_champion_keeps_serving(prod: None) -> None:
    api = FakeApi()
    _release(api, _objects(_spec(), "7"))
    before = api.specs()
    api.stuck.add("registry.local/kiln/kiln-fraud:b8")
    clock = FakeClock()
    smoke_calls: list[int] = []
    with pytest.raises(k8s_apply.ReleaseFailed) as failed:
        _release(api, _objects(_spec("canary", 0.2), "7", "8"), smoke=lambda: smoke_calls.append(1), clock=clock)
    assert failed.value.stage == "rollout" and failed.value.restored
    message = str(failed.value)
    assert "rollout failed: rollout not complete after 60s: Deployment/kiln/kiln-fraud-v8: 0 of 1 updated replicas available" in message
    assert message.endswith("previous objects restored") and smoke_calls == []
    assert api.specs() == before  # the route is back at 100% champion; v8's Deployment and Service are gone
    assert api.serving == {"kiln-fraud-v7": "registry.local/kiln/kiln-fraud:b7"}
    assert 30 <= clock.now <= 62 and clock.sleeps <= 31  # bounded: polled every 2 s until 60 s, not forever
    # restore runs last object first: the route goes back before the backend it named is deleted
    assert api.log[-6:] == ["apply HTTPRoute/kiln-fraud", "apply Service/kiln-fraud", "delete Service/kiln-fraud-v8",
                            "delete Deployment/kiln-fraud-v8", "apply Service/kiln-fraud-v7", "apply Deployment/kiln-fraud-v7"]


def test_a_failing_smoke_test_restores_the_previous_route(prod: None) -> None:
    api = FakeApi()
    _release(api, _objects(_spec(), "7"))
    before = api.specs()

    def smoke() -> None:
        assert "filters" in _route(api)["spec"]["rules"][0]  # the shadow was live when the smoke test ran
        raise AssertionError("max_abs_diff 0.31 > 1e-09")

    expected = r"release: smoke test failed: max_abs_diff 0.31 > 1e-09; previous objects restored"
    with pytest.raises(k8s_apply.ReleaseFailed, match=expected) as failed:
        _release(api, _objects(_spec("shadow"), "7", "8"), smoke=smoke)
    assert failed.value.stage == "smoke test" and failed.value.restored
    assert api.specs() == before and "filters" not in _route(api)["spec"]["rules"][0]


def test_a_changed_champion_template_that_does_not_roll_out_is_rolled_back(prod: None) -> None:
    api = FakeApi()
    _release(api, _objects(_spec(), "7"))
    before = api.specs()
    dep_key = ("apps/v1", "Deployment", "kiln", "kiln-fraud-v7")
    generation = api.state[dep_key]["metadata"]["generation"]
    objects = _objects(_spec(), "7")
    objects[0]["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.local/kiln/kiln-fraud:broken"
    api.stuck.add("registry.local/kiln/kiln-fraud:broken")
    with pytest.raises(k8s_apply.ReleaseFailed, match="1 old replicas pending termination") as failed:
        _release(api, objects)
    assert failed.value.restored
    assert api.specs() == before  # the old template is applied again ...
    assert api.state[dep_key]["metadata"]["generation"] == generation + 2  # ... as a new generation, rolled out again
    assert api.serving["kiln-fraud-v7"] == "registry.local/kiln/kiln-fraud:b7"  # the old pods served all along


def test_an_apply_error_names_the_object_and_removes_what_was_created(prod: None) -> None:
    api = FakeApi()
    api.invalid.add("kiln-fraud")  # the stable Service and the route are refused; the version objects were created
    with pytest.raises(k8s_apply.ReleaseFailed, match=r"release: apply failed: apply Service/kiln/kiln-fraud: 422 Reason: Service "
                                                      r'"kiln-fraud" is invalid: .*; previous objects restored') as failed:
        _release(api, _objects(_spec(), "7"))
    assert failed.value.stage == "apply" and failed.value.restored
    assert api.state == {} and api.log[:2] == ["apply Deployment/kiln-fraud-v7", "apply Service/kiln-fraud-v7"]


def test_a_cluster_without_the_gateway_api_is_refused_before_anything_is_applied(prod: None) -> None:
    api = FakeApi()
    api.crds = False  # no HTTPRoute CRD in the cluster
    expected = r"snapshot failed, nothing applied: read HTTPRoute/kiln/kiln-fraud: No matches found"
    with pytest.raises(k8s_apply.ReleaseFailed, match=expected):
        _release(api, _objects(_spec(), "7"))
    assert api.state == {} and api.log == []


def test_a_snapshot_that_cannot_be_read_applies_nothing(prod: None) -> None:
    api = FakeApi()
    api.forbid_get = True
    expected = r"snapshot failed, nothing applied: read Deployment/kiln/kiln-fraud-v7: 403"
    with pytest.raises(k8s_apply.ReleaseFailed, match=expected) as failed:
        _release(api, _objects(_spec(), "7"))
    assert failed.value.stage == "snapshot" and api.state == {}


def test_promotion_prunes_the_replaced_version_only_after_success(prod: None) -> None:
    api = FakeApi()
    _release(api, _objects(_spec("canary", 0.5), "7", "8"))
    weights = [(b["name"], b["weight"]) for b in _route(api)["spec"]["rules"][0]["backendRefs"]]
    assert weights == [("kiln-fraud-v7", 50), ("kiln-fraud-v8", 50)]
    result = _release(api, _objects(_spec(), "8"), prune_selector="kiln/pipeline=fraud,kiln/model-version")
    assert sorted(result["pruned"]) == ["Deployment/kiln/kiln-fraud-v7", "Service/kiln/kiln-fraud-v7"] and result["prune_errors"] == []
    assert sorted(k[3] for k in api.state) == ["kiln-fraud", "kiln-fraud", "kiln-fraud-v8", "kiln-fraud-v8"]
    stable = api.state[("v1", "Service", "kiln", "kiln-fraud")]
    assert stable["spec"]["selector"] == {"app.kubernetes.io/name": "kiln-fraud", "kiln/model-version": "8"}


def test_reappliable_drops_server_fields() -> None:
    live = {"apiVersion": "v1", "kind": "Service", "status": {"loadBalancer": {}}, "spec": {"clusterIP": "10.0.0.1"},
            "metadata": {"name": "s", "namespace": "kiln", "uid": "u", "resourceVersion": "9", "generation": 2,
                         "creationTimestamp": "t", "managedFields": [{}], "labels": {"a": "b"}}}
    assert k8s_apply.reappliable(live) == {"apiVersion": "v1", "kind": "Service", "spec": {"clusterIP": "10.0.0.1"},
                                           "metadata": {"name": "s", "namespace": "kiln", "labels": {"a": "b"}}}


def test_rollout_state_reads_deployment_status() -> None:
    dep = {"metadata": {"name": "d", "generation": 3}, "spec": {"replicas": 2}}
    assert k8s_apply.rollout_state(dep | {"status": {"observedGeneration": 2}}) == "observedGeneration 2 < generation 3"
    done = {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    assert k8s_apply.rollout_state(dep | {"status": done}) is None
    assert k8s_apply.rollout_state(dep | {"status": done | {"availableReplicas": 1}}) == "1 of 2 updated replicas available"
    stalled = done | {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                      "message": 'ReplicaSet "d-1" has timed out progressing.'}]}
    with pytest.raises(k8s_apply.RolloutTimeout, match='Deployment/d: progress deadline exceeded: ReplicaSet "d-1" has timed out'):
        k8s_apply.rollout_state(dep | {"status": stalled})


def test_k8s_apply_calls_the_dynamic_client_with_arguments_it_accepts() -> None:
    """The fake mirrors DynamicClient's public methods; every call k8s_apply makes must bind to the real signatures."""
    import inspect

    from kubernetes.dynamic import DynamicClient

    calls = {
        "server_side_apply": ((object(),), {"body": {}, "name": "n", "namespace": "kiln", "field_manager": "kiln",
                                            "force_conflicts": True}),
        "get": ((object(),), {"name": "n", "namespace": "kiln"}),
        "delete": ((object(),), {"name": "n", "namespace": "kiln"}),
    }
    for method, (args, kwargs) in calls.items():
        inspect.signature(getattr(DynamicClient, method)).bind(None, *args, **kwargs)
        inspect.signature(getattr(FakeApi, method)).bind(None, *args, **kwargs)
    inspect.signature(DynamicClient.get).bind(None, object(), namespace="kiln", label_selector="a=b")
