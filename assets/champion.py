"""`<p>/champion`: the champion/challenger gate (kiln.evaluation) moving the MLflow alias `champion`, with its check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/champion` asset with its champion-vs-challenger gate check."""
    import dagster as dg

    from assets.stage import asset_args
    from kiln import paths
    from resources.mlflow import MlflowResource
    from resources.retries import service_retry_policy

    champion_key = dg.AssetKey(key(spec.name, "champion"))

    @dg.asset(
        **asset_args(spec, "champion"),
        ins={
            "model": dg.AssetIn(key(spec.name, "model"), input_manager_key="json_io_manager"),
            "features": dg.AssetIn(key(spec.name, "features")),
        },
        io_manager_key="json_io_manager",
        kinds={"mlflow"},
        required_resource_keys={"mlflow", "storage"},
        retry_policy=service_retry_policy(),
        check_specs=[dg.AssetCheckSpec("champion_gate", asset=champion_key, blocking=True,
                                       description="The served champion is never worse than the challenger.")],
        description=f"The MLflow model version holding alias '{paths.CHAMPION_ALIAS}' after the gate.",
    )
    def champion(context, model: Any, features: Any):
        mlflow: MlflowResource = context.resources.mlflow
        from kiln.evaluation import decide, gate_holds, score_model, split_holdout
        from kiln.features import data_version
        from kiln.reference import publish_champion_reference
        from resources.mlflow import verify_checksum

        client = mlflow.client()
        _, holdout = split_holdout(features, spec)
        challenger = str(model["version"])
        # `model` scored itself on the holdout of these features; rescore only if the features changed since.
        fresh = model.get("features_data_version") == data_version(features)
        challenger_score = float(model["score"]) if fresh else score_model(model["model_uri"], spec, holdout)
        current = mlflow.champion(spec.name)
        previous = str(current.version) if current is not None else None
        champion_score = score_model(f"models:/{spec.name}/{previous}", spec, holdout) if previous is not None else None
        promote, reason = decide(spec.evaluation, challenger, challenger_score, previous, champion_score)
        if promote:
            verify_checksum(mlflow, spec.name, challenger)  # the alias only ever points at an intact model
            client.set_registered_model_alias(spec.name, paths.CHAMPION_ALIAS, challenger)
            client.set_model_version_tag(spec.name, challenger, paths.PROMOTED_TAG, f"dagster run {context.run_id}")
            if previous is not None:
                client.set_model_version_tag(spec.name, challenger, paths.PREVIOUS_CHAMPION_TAG, previous)
        served = client.get_model_version_by_alias(spec.name, paths.CHAMPION_ALIAS)
        # Live traffic is compared with what the served model was trained on, whichever side the gate chose.
        publish_champion_reference(client, spec, str(served.run_id), context.resources.storage.state_root)
        served_score = challenger_score if str(served.version) == challenger else champion_score
        assert served_score is not None
        record = {
            "version": str(served.version), "run_id": served.run_id, "metric": spec.evaluation.metric, "score": served_score,
            "challenger_version": challenger, "challenger_score": challenger_score, "previous_version": previous,
            "previous_score": champion_score, "promoted": promote, "reason": reason, "holdout_rows": holdout.height,
            "model_uri": f"models:/{spec.name}/{served.version}",
        }
        context.log.info(f"{spec.name} gate: {reason}")
        yield dg.Output(record, metadata={k: v for k, v in record.items() if v is not None and k != "reason"} | {"reason": reason})
        # The check re-reads the registry: it fails if the alias and the decision disagree, or a worse model is served.
        yield dg.AssetCheckResult(
            check_name="champion_gate",
            passed=gate_holds(spec.evaluation, str(served.version), served_score, challenger, challenger_score, previous, promote),
            metadata={"champion_version": str(served.version), "champion_score": served_score, "challenger_version": challenger,
                      "challenger_score": challenger_score, "decision": reason},
        )

    return champion
