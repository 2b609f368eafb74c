"""`kiln rollback <p>`: move the `champion` alias back to the previous champion and roll the endpoint to it.

The champion history is kept on MLflow model versions: `<p>/champion` tags each promoted version with
``kiln.previous_champion`` (the version it replaced). A rollback moves the alias, tags the restored version with who,
why and from which version, records a `<p>/champion` materialization of the restored version (so Dagster's lineage
shows it), and materializes `<p>/bento`, `<p>/image` and `<p>/endpoint` from it with their live smoke test.
"""

from __future__ import annotations

import time
from typing import Any

from kiln import paths, settings
from kiln.spec import PipelineSpec

PREVIOUS_TAG = paths.PREVIOUS_CHAMPION_TAG


class RollbackError(RuntimeError):
    """A rollback that cannot be done; the message says why and what to do."""


def current_user() -> str:
    """Who asked: ``KILN_USER`` when set (CI, bots), else the login name."""
    return settings.user()


def plan(client: Any, pipeline: str, to: str | None) -> tuple[Any, Any]:
    """The current champion version and the version to restore (``to``, or the champion's recorded predecessor)."""
    from mlflow.exceptions import MlflowException

    from kiln.paths import CHAMPION_ALIAS

    try:
        current = client.get_model_version_by_alias(pipeline, CHAMPION_ALIAS)
    except MlflowException as exc:
        raise RollbackError(f"{pipeline}: no model version holds alias '{CHAMPION_ALIAS}'; nothing to roll back") from exc
    target_version = to or current.tags.get(PREVIOUS_TAG)
    if not target_version:
        raise RollbackError(
            f"{pipeline}: champion version {current.version} has no {PREVIOUS_TAG} tag (it was the first champion); "
            "pass --to VERSION to pick one"
        )
    try:
        target = client.get_model_version(pipeline, str(target_version))
    except MlflowException as exc:
        raise RollbackError(f"{pipeline}: --to {target_version}: no such registered model version") from exc
    if str(target.version) == str(current.version):
        raise RollbackError(f"{pipeline}: version {current.version} is already the champion")
    return current, target


def rollback(spec: PipelineSpec, defs: Any, instance: Any, to: str | None = None, reason: str | None = None,
             user: str | None = None) -> dict[str, Any]:
    """Restore a previous champion and serve it; returns what was done (versions, who, why, endpoint)."""
    import dagster as dg

    from kiln.keys import key
    from kiln.paths import CHAMPION_ALIAS
    from kiln.reference import publish_champion_reference
    from platform_defs.profiles import initialized

    ready = initialized(defs.resources, "mlflow", "storage")  # outside a run: resolve the prod profile's env vars
    client = ready["mlflow"].client()
    current, target = plan(client, spec.name, to)
    user = user or current_user()
    reason = reason or "manual rollback"
    version = str(target.version)
    client.set_registered_model_alias(spec.name, CHAMPION_ALIAS, version)
    for tag, value in {
        paths.ROLLED_BACK_BY_TAG: user,
        paths.ROLLBACK_REASON_TAG: reason,
        paths.ROLLED_BACK_FROM_TAG: str(current.version),
        paths.ROLLED_BACK_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        PREVIOUS_TAG: str(current.version),  # a second rollback undoes this one
    }.items():
        client.set_model_version_tag(spec.name, version, tag, value)
    publish_champion_reference(client, spec, target.run_id, ready["storage"].state_root)

    record = {
        "version": version,
        "run_id": target.run_id,
        "metric": spec.evaluation.metric,
        "previous_version": str(current.version),
        "promoted": True,
        "reason": f"rollback by {user}: {reason}",
        "model_uri": f"models:/{spec.name}/{version}",
    }

    @dg.asset(key=key(spec.name, "champion"), group_name=spec.name, io_manager_key="json_io_manager", kinds={"mlflow"})
    def champion(context):
        return dg.Output(record, metadata={"version": version, "previous_version": str(current.version),
                                           "rolled_back_by": user, "rollback_reason": reason})

    wanted = {dg.AssetKey(key(spec.name, s)) for s in ("bento", "image", "endpoint")}
    downstream = [a for a in defs.assets if wanted & set(a.keys)]
    checks = [c for c in defs.asset_checks if {k.asset_key for k in c.check_keys} <= wanted]
    result = dg.materialize(
        [champion, *downstream, *checks],
        selection=dg.AssetSelection.assets(*[key(spec.name, s) for s in ("champion", "bento", "image", "endpoint")]),
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
        tags={"kiln/pipeline": spec.name, "kiln/trigger": "rollback", "kiln/rolled_back_by": user},
    )
    if not result.success:
        raise RollbackError(
            f"{spec.name}: alias '{CHAMPION_ALIAS}' now points at version {version}, but rolling the endpoint failed "
            f"(Dagster run {result.run_id}); fix it and run `kiln serve {spec.name}`"
        )
    endpoint = result.output_for_node(f"{spec.name}__endpoint")
    return {"pipeline": spec.name, "from_version": str(current.version), "to_version": version, "user": user,
            "reason": reason, "endpoint_url": endpoint["url"], "endpoint_model_version": endpoint["model_version"],
            "dagster_run_id": result.run_id}
