"""Applying a release to a cluster: server-side apply, a bounded wait for the rollout, and restore on any failure.

``api`` is a ``kubernetes.dynamic.DynamicClient`` (public API only: ``resources.get``, ``server_side_apply``, ``get``,
``delete``). :func:`release` snapshots the live objects it is about to change, applies, waits for every Deployment's
rollout, runs the smoke test, and on any failure puts the snapshot back (re-applies what existed, deletes what did
not), so the champion keeps serving; then it raises :class:`ReleaseFailed` naming the stage and the cause.

Rollouts are RollingUpdate with ``maxUnavailable: 0`` (`resources/kubernetes.py`): while a new version's pods never
become ready, the old pods keep serving, and restoring the old template scales the new ReplicaSet back.

:func:`endpoint_release` is the prod `<p>/endpoint` step (``KILN_ENDPOINT_TARGET`` kubernetes | gitops): it renders the
release of a bento and either applies it with :func:`release` through :func:`dynamic_client` (or an ``api`` passed in,
e.g. a test's fake) or only writes the manifests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.spec import PipelineSpec

FIELD_MANAGER = "kiln"
# Fields the API server owns: a snapshot drops them before it is applied again (managedFields must be absent from an
# apply request, and a stale resourceVersion would be a precondition that fails).
SERVER_METADATA = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink", "deletionTimestamp",
                   "deletionGracePeriodSeconds")
PRUNED_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"))

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace, name


class ReleaseFailed(RuntimeError):
    """A release did not complete; ``stage`` is snapshot | apply | rollout | smoke test, ``restored`` whether the
    previous objects are back (and their Deployments rolled out)."""

    def __init__(self, message: str, stage: str, restored: bool) -> None:
        super().__init__(message)
        self.stage = stage
        self.restored = restored


class RolloutTimeout(RuntimeError):
    """Deployments did not finish rolling out in time; the message names each and its last status."""


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(obj["apiVersion"]), str(obj["kind"]), str(meta.get("namespace") or ""), str(meta["name"]))


def describe(key: Key) -> str:
    """``Kind/namespace/name`` of an object key, as errors name it."""
    return f"{key[1]}/{key[2]}/{key[3]}" if key[2] else f"{key[1]}/{key[3]}"


def _as_dict(value: Any) -> dict[str, Any]:
    """A dynamic client ResourceInstance (or a plain mapping) as a dict."""
    return value.to_dict() if callable(getattr(value, "to_dict", None)) else dict(value)


def _reason(exc: BaseException) -> str:
    """A short reason: the API server's message when there is one, else the exception's text."""
    summary = getattr(exc, "summary", None)
    text = summary() if callable(summary) else str(exc)
    text = " ".join(str(text).split())
    return (text[:400] + "...") if len(text) > 400 else text or type(exc).__name__


def _resource(api: Any, api_version: str, kind: str) -> Any:
    return api.resources.get(api_version=api_version, kind=kind)


def _not_found(exc: BaseException) -> bool:
    from kubernetes.dynamic.exceptions import NotFoundError

    return isinstance(exc, NotFoundError)


def apply(objects: Sequence[Mapping[str, Any]], api: Any, field_manager: str = FIELD_MANAGER) -> list[dict[str, Any]]:
    """Server-side apply each object in order (``force``: Kiln owns these fields); returns the live objects.

    Raises ``RuntimeError`` naming the object that failed (the objects before it stay applied)."""
    live: list[dict[str, Any]] = []
    for obj in objects:
        key = key_of(obj)
        try:
            resource = _resource(api, key[0], key[1])
            result = api.server_side_apply(resource, body=dict(obj), name=key[3], namespace=key[2] or None,
                                           field_manager=field_manager, force_conflicts=True)
        except Exception as exc:  # noqa: BLE001 - any API failure names its object
            raise RuntimeError(f"apply {describe(key)}: {_reason(exc)}") from exc
        live.append(_as_dict(result))
    return live


def rollout_state(deployment: Mapping[str, Any]) -> str | None:
    """None when a Deployment's rollout is complete, else what it still waits for (as ``kubectl rollout status``)."""
    meta, spec, status = deployment.get("metadata") or {}, deployment.get("spec") or {}, deployment.get("status") or {}
    want = int(spec.get("replicas", 1))
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise RolloutTimeout(f"Deployment/{meta.get('name')}: progress deadline exceeded: {condition.get('message', '')}")
    observed, generation = int(status.get("observedGeneration", 0)), int(meta.get("generation", 0))
    if observed < generation:
        return f"observedGeneration {observed} < generation {generation}"
    updated, available, total = (int(status.get(f, 0)) for f in ("updatedReplicas", "availableReplicas", "replicas"))
    if updated != want:
        return f"{updated} of {want} replicas updated"
    if total != want:
        return f"{total - updated} old replicas pending termination"
    if available != want:
        return f"{available} of {want} updated replicas available"
    return None


def wait_rollout(api: Any, deployments: Sequence[Mapping[str, Any]], timeout_s: float, poll_s: float = 2.0, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll each Deployment (objects with metadata name/namespace) until its rollout is complete, at most ``timeout_s``.

    Raises :class:`RolloutTimeout` naming every unfinished Deployment and what it waits for."""
    resource = _resource(api, "apps/v1", "Deployment") if deployments else None
    pending = {key_of({"apiVersion": "apps/v1", "kind": "Deployment", **d}) for d in deployments}
    deadline = clock() + timeout_s
    waiting: dict[Key, str] = {}
    while True:
        waiting = {}
        for key in sorted(pending):
            try:
                live = _as_dict(api.get(resource, name=key[3], namespace=key[2] or None))
            except Exception as exc:  # noqa: BLE001 - a Deployment that vanished or cannot be read is not rolled out
                waiting[key] = f"cannot read: {_reason(exc)}"
                continue
            state = rollout_state(live)
            if state is not None:
                waiting[key] = state
        pending = set(waiting)
        if not pending:
            return
        if clock() >= deadline:
            detail = "; ".join(f"{describe(k)}: {v}" for k, v in sorted(waiting.items()))
            raise RolloutTimeout(f"rollout not complete after {timeout_s:g}s: {detail}")
        sleep(min(poll_s, max(0.0, deadline - clock())))


def snapshot(objects: Sequence[Mapping[str, Any]], api: Any) -> dict[Key, dict[str, Any] | None]:
    """The live version of each object (None where it does not exist), for :func:`restore`."""
    previous: dict[Key, dict[str, Any] | None] = {}
    for obj in objects:
        key = key_of(obj)
        try:
            previous[key] = _as_dict(api.get(_resource(api, key[0], key[1]), name=key[3], namespace=key[2] or None))
        except Exception as exc:  # noqa: BLE001
            if not _not_found(exc):
                raise RuntimeError(f"read {describe(key)}: {_reason(exc)}") from exc
            previous[key] = None
    return previous


def reappliable(live: Mapping[str, Any]) -> dict[str, Any]:
    """A live object as an apply request: no status, no server-owned metadata."""
    meta = {k: v for k, v in (live.get("metadata") or {}).items() if k not in SERVER_METADATA}
    return {k: v for k, v in live.items() if k not in ("status", "metadata")} | {"metadata": meta}


def restore(previous: Mapping[Key, dict[str, Any] | None], api: Any, field_manager: str = FIELD_MANAGER) -> list[str]:
    """Put a snapshot back, last object first (the route before the backends it names): re-apply what existed, delete
    what did not. Returns the errors (empty when everything is back); it never raises for one object."""
    errors: list[str] = []
    for key, live in reversed(list(previous.items())):
        try:
            resource = _resource(api, key[0], key[1])
            if live is None:
                try:
                    api.delete(resource, name=key[3], namespace=key[2] or None)
                except Exception as exc:  # noqa: BLE001
                    if not _not_found(exc):
                        raise
            else:
                api.server_side_apply(resource, body=reappliable(live), name=key[3], namespace=key[2] or None,
                                      field_manager=field_manager, force_conflicts=True)
        except Exception as exc:  # noqa: BLE001 - restore as much as possible, report the rest
            errors.append(f"{'delete' if live is None else 're-apply'} {describe(key)}: {_reason(exc)}")
    return errors


def prune(objects: Sequence[Mapping[str, Any]], api: Any, label_selector: str) -> tuple[list[str], list[str]]:
    """Delete Deployments and Services that match ``label_selector`` in the objects' namespaces but are not among
    ``objects`` (e.g. the version a promotion replaced). Returns (deleted, errors)."""
    keep = {key_of(o) for o in objects}
    namespaces = sorted({key_of(o)[2] for o in objects})
    deleted: list[str] = []
    errors: list[str] = []
    for api_version, kind in PRUNED_KINDS:
        resource = _resource(api, api_version, kind)
        for namespace in namespaces:
            try:
                items = _as_dict(api.get(resource, namespace=namespace or None, label_selector=label_selector)).get("items") or []
            except Exception as exc:  # noqa: BLE001
                errors.append(f"list {kind} in {namespace}: {_reason(exc)}")
                continue
            for item in items:
                key = key_of({"apiVersion": api_version, "kind": kind, **item})
                if key in keep:
                    continue
                try:
                    api.delete(resource, name=key[3], namespace=key[2] or None)
                    deleted.append(describe(key))
                except Exception as exc:  # noqa: BLE001
                    if not _not_found(exc):
                        errors.append(f"delete {describe(key)}: {_reason(exc)}")
    return deleted, errors


def release(objects: Sequence[Mapping[str, Any]], api: Any, smoke_test: Callable[[], None], timeout_s: float, *,
            field_manager: str = FIELD_MANAGER, poll_s: float = 2.0, prune_selector: str | None = None,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Apply a release and keep it only if it rolls out and passes the smoke test; otherwise restore and raise.

    Order: snapshot (GET) -> server-side apply -> wait for every Deployment among ``objects`` (``timeout_s``) ->
    ``smoke_test()`` (raises on failure) -> optional prune of stale Deployments/Services (``prune_selector``).
    Returns ``{"applied", "created", "updated", "pruned", "prune_errors"}`` (object descriptions).
    Raises :class:`ReleaseFailed` (stage, restored) after putting the previous objects back."""
    keys = [key_of(o) for o in objects]
    if len(set(keys)) != len(keys):
        raise ReleaseFailed("release: the same object is listed twice: "
                            + ", ".join(sorted({describe(k) for k in keys if keys.count(k) > 1})), "snapshot", restored=True)
    try:
        previous = snapshot(objects, api)
    except RuntimeError as exc:
        raise ReleaseFailed(f"release: snapshot failed, nothing applied: {exc}", "snapshot", restored=True) from exc
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    stage = "apply"
    try:
        apply(objects, api, field_manager)
        stage = "rollout"
        wait_rollout(api, deployments, timeout_s, poll_s, clock=clock, sleep=sleep)
        stage = "smoke test"
        smoke_test()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the previous objects go back
        errors = restore(previous, api, field_manager)
        back = [live for key, live in previous.items() if live is not None and key[1] == "Deployment"]
        if not errors and back:
            try:
                wait_rollout(api, back, timeout_s, poll_s, clock=clock, sleep=sleep)
            except Exception as wait_exc:  # noqa: BLE001
                errors.append(f"restored rollout: {_reason(wait_exc)}")
        outcome = "previous objects restored" if not errors else "RESTORE INCOMPLETE: " + "; ".join(errors)
        raise ReleaseFailed(f"release: {stage} failed: {_reason(exc)}; {outcome}", stage, restored=not errors) from exc
    pruned, prune_errors = prune(objects, api, prune_selector) if prune_selector else ([], [])
    return {
        "applied": [describe(k) for k in keys],
        "created": [describe(k) for k in keys if previous[k] is None],
        "updated": [describe(k) for k in keys if previous[k] is not None],
        "pruned": pruned,
        "prune_errors": prune_errors,
    }


# ------------------------------------------------------------------------------------------- the prod endpoint

TARGETS = ("kubernetes", "gitops")
# What a release may prune after success: the pipeline's Deployments and Services that Kiln made (older versions, and
# the single `kiln-<p>` Deployment of endpoints rendered before releases existed), never the objects just applied.
PRUNE_SELECTOR = "app.kubernetes.io/part-of=kiln,kiln/pipeline={pipeline}"


def dynamic_client() -> Any:
    """A ``DynamicClient`` for the cluster: the pod's service account in a cluster, else the local kubeconfig."""
    import kubernetes
    from kubernetes.dynamic import DynamicClient

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException as in_cluster:
        try:
            kubernetes.config.load_kube_config()
        except (kubernetes.config.ConfigException, OSError) as kubeconfig:
            raise RuntimeError(f"Kubernetes API: not in a cluster ({in_cluster}) and no usable kubeconfig ({kubeconfig}); "
                               "set KILN_ENDPOINT_TARGET=gitops to only write the manifests") from kubeconfig
    return DynamicClient(kubernetes.client.ApiClient())


def endpoint_release(spec: PipelineSpec, bento: Mapping[str, Any], state_root: str, target: str, *,
                     check: Callable[[str, str], None] | None = None, api: Any = None,
                     challenger: Mapping[str, Any] | None = None, timeout_s: float | None = None, poll_s: float = 2.0,
                     clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """The prod `<p>/endpoint`: the release of ``bento`` (the champion; ``challenger`` another bento record, routed as
    ``serving.release`` says) rendered by ``resources/kubernetes.py`` and, per ``target``:

    - ``gitops``: only written to ``<state_root>/endpoints/<p>/k8s.yaml`` (applying it is the GitOps tool's job);
    - ``kubernetes``: applied with :func:`release` (server-side apply, rollout wait of at most ``timeout_s``, default
      ``KILN_RELEASE_TIMEOUT_S``), then ``check(version, url)`` for each version through its own Service URL (raises on
      failure), then the pipeline's stale Deployments/Services pruned; the manifests file is written only after
      success. ``api``: a DynamicClient-like object (default :func:`dynamic_client`).

    Returns the endpoint record (:func:`resources.kubernetes.release_record` plus ``target``, ``healthy`` and the
    applied/created/updated/pruned objects). Raises :class:`ReleaseFailed` after restoring the previous objects."""
    from kiln import settings
    from kiln.release import route_table
    from resources import kubernetes

    if target not in TARGETS:
        raise ValueError(f"KILN_ENDPOINT_TARGET: {target!r} is not one of {', '.join(TARGETS)} (or local, served by bentoml)")
    champion = str(bento["model_version"])
    bentos: dict[str, Mapping[str, Any]] = {champion: bento}
    if challenger is not None:
        bentos[str(challenger["model_version"])] = challenger
    table = route_table(spec, champion, str(challenger["model_version"]) if challenger is not None else None)
    parents = kubernetes.gateway_parents()
    if target == "gitops":
        record = kubernetes.release_record(spec, table, bentos, state_root, parents=parents)
        return record | {"target": target, "applied": [], "created": [], "updated": [], "pruned": [], "prune_errors": []}
    if check is None:
        raise ValueError(f"{spec.name}: endpoint_release: the kubernetes target needs a smoke check (check=)")
    objects = kubernetes.release_manifests(spec, table, kubernetes.release_images(spec, bentos), parents=parents)

    def smoke_test() -> None:
        for version in table.versions:  # served versions, then the mirror target: each through its own Service
            check(version, kubernetes.version_url(spec, version))

    result = release(objects, dynamic_client() if api is None else api, smoke_test,
                     settings.release_timeout_s() if timeout_s is None else timeout_s, field_manager=FIELD_MANAGER,
                     poll_s=poll_s, prune_selector=PRUNE_SELECTOR.format(pipeline=spec.name), clock=clock, sleep=sleep)
    record = kubernetes.release_record(spec, table, bentos, state_root, parents=parents)
    return record | {"target": target, "healthy": True} | result
