"""`<p>/champion`: the champion/challenger gate, and the holdout and metrics both sides are judged on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.keys import key
from kiln.spec import EvaluationSpec, PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import numpy as np
    import polars as pl


def split_holdout(frame: pl.DataFrame, spec: PipelineSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Train on the older rows, hold out the newest ``evaluation.holdout`` share (features are time-sorted)."""
    cut = int(round(frame.height * (1 - spec.evaluation.holdout)))
    if cut < 1 or cut >= frame.height:
        raise ValueError(f"{spec.name}: {frame.height} rows are too few to hold out {spec.evaluation.holdout:.0%}")
    return frame.slice(0, cut), frame.slice(cut)


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """One evaluation metric; classification metrics take the positive-class probability."""
    from sklearn import metrics as m

    if metric in ("roc_auc", "average_precision") and len(set(y_true.tolist())) < 2:
        raise ValueError(f"{metric} needs both classes in the holdout; got only {set(y_true.tolist())}")
    funcs = {
        "roc_auc": m.roc_auc_score,
        "average_precision": m.average_precision_score,
        "log_loss": m.log_loss,
        "rmse": lambda t, p: float(m.mean_squared_error(t, p) ** 0.5),
        "mae": m.mean_absolute_error,
        "r2": m.r2_score,
    }
    return float(funcs[metric](y_true, y_pred))


def gate(challenger: float, champion: float | None, evaluation: EvaluationSpec) -> tuple[bool, str]:
    """Promote the first model, or a challenger that beats the champion by at least ``min_improvement``."""
    if champion is None:
        return True, "no champion yet: the first model is promoted"
    gain = challenger - champion if evaluation.higher_is_better else champion - challenger
    if gain >= evaluation.min_improvement:
        return True, f"challenger beats champion by {gain:.5f} >= {evaluation.min_improvement} on {evaluation.metric}"
    return False, f"challenger gains {gain:.5f} < {evaluation.min_improvement} on {evaluation.metric}: champion kept"


def build(spec: PipelineSpec) -> dg.AssetsDefinition:
    """The `<p>/champion` asset with its champion-vs-challenger gate check."""
    import dagster as dg

    from kiln import steps as k8s
    from resources.mlflow import CHAMPION_ALIAS, MlflowResource
    from resources.retries import service_retry_policy

    champion_key = dg.AssetKey(key(spec.name, "champion"))

    @dg.asset(
        key=champion_key,
        group_name=spec.name,
        op_tags=k8s.op_tags(spec, "champion"),
        pool=k8s.pool(spec, "champion"),
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
        description=f"The MLflow model version holding alias '{CHAMPION_ALIAS}' after the gate.",
    )
    def champion(context, model: Any, features: Any):
        mlflow: MlflowResource = context.resources.mlflow
        from assets.predictors import load_predictor

        client = mlflow.client()
        _, holdout = split_holdout(features, spec)
        y = holdout[spec.target].to_numpy()
        metric = spec.evaluation.metric
        from kiln.features import data_version

        # `model` scored itself on the holdout of these features; rescore only if the features changed since.
        if model.get("features_data_version") == data_version(features):
            challenger_score = float(model["score"])
        else:
            challenger_score = score(metric, y, load_predictor(model["model_uri"], spec).predict(holdout))
        current = mlflow.champion(spec.name)
        champion_score = None
        if current is not None:
            champion_score = score(metric, y, load_predictor(f"models:/{spec.name}/{current.version}", spec).predict(holdout))
        if current is not None and str(current.version) == str(model["version"]):
            promote, reason = False, "challenger is already the champion"
        else:
            promote, reason = gate(challenger_score, champion_score, spec.evaluation)
        if promote:
            from resources.mlflow import verify_checksum

            verify_checksum(mlflow, spec.name, str(model["version"]))  # the alias only ever points at an intact model
            client.set_registered_model_alias(spec.name, CHAMPION_ALIAS, str(model["version"]))
            client.set_model_version_tag(spec.name, str(model["version"]), "kiln.promoted_by", f"dagster run {context.run_id}")
            if current is not None:
                client.set_model_version_tag(spec.name, str(model["version"]), "kiln.previous_champion", str(current.version))
        served = client.get_model_version_by_alias(spec.name, CHAMPION_ALIAS)
        from assets.drift_report import publish_champion_reference

        # Live traffic is compared with what the served model was trained on, whichever side the gate chose.
        publish_champion_reference(client, spec, str(served.run_id), context.resources.storage.state_root)
        served_score = challenger_score if str(served.version) == str(model["version"]) else champion_score
        record = {
            "version": str(served.version),
            "run_id": served.run_id,
            "metric": metric,
            "score": served_score,
            "challenger_version": str(model["version"]),
            "challenger_score": challenger_score,
            "previous_version": str(current.version) if current is not None else None,
            "previous_score": champion_score,
            "promoted": promote,
            "reason": reason,
            "holdout_rows": holdout.height,
            "model_uri": f"models:/{spec.name}/{served.version}",
        }
        context.log.info(f"{spec.name} gate: {reason}")
        yield dg.Output(record, metadata={k: v for k, v in record.items() if v is not None and k != "reason"} | {"reason": reason})
        # The check re-reads the registry: it fails if the alias and the decision disagree, or a worse model is served.
        keeps_challenger = promote or (current is not None and str(current.version) == str(model["version"]))
        expected = str(model["version"]) if keeps_challenger or current is None else str(current.version)
        assert served_score is not None
        worse_by = challenger_score - served_score if spec.evaluation.higher_is_better else served_score - challenger_score
        passed = str(served.version) == expected and worse_by < max(spec.evaluation.min_improvement, 0.0) + 1e-12
        yield dg.AssetCheckResult(
            check_name="champion_gate",
            passed=passed,
            metadata={"champion_version": str(served.version), "champion_score": served_score,
                      "challenger_version": str(model["version"]), "challenger_score": challenger_score,
                      "decision": reason},
        )

    return champion
