"""How a model is judged: the time-ordered holdout, the metrics, and the champion-vs-challenger gate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.spec import EvaluationSpec, PipelineSpec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

CLASSIFICATION_METRICS = ("roc_auc", "average_precision", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")


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


def metric_names(spec: PipelineSpec) -> list[str]:
    """The metrics recorded for a model of this task, the gate's metric included."""
    base = list(CLASSIFICATION_METRICS if spec.task == "classification" else REGRESSION_METRICS)
    return base if spec.evaluation.metric in base else [*base, spec.evaluation.metric]


def metrics(spec: PipelineSpec, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Every metric of :func:`metric_names` on one set of predictions."""
    return {name: score(name, y_true, y_pred) for name in metric_names(spec)}


def gate(challenger: float, champion: float | None, evaluation: EvaluationSpec) -> tuple[bool, str]:
    """Promote the first model, or a challenger that beats the champion by strictly more than ``min_improvement``.

    A tie is never a promotion: a retrain on the same rows gives the same model, and rolling it changes nothing."""
    if champion is None:
        return True, "no champion yet: the first model is promoted"
    gain = challenger - champion if evaluation.higher_is_better else champion - challenger
    if gain > evaluation.min_improvement:
        return True, f"challenger beats champion by {gain:.5f} > {evaluation.min_improvement} on {evaluation.metric}"
    return False, f"challenger gains {gain:.5f}, not more than {evaluation.min_improvement} on {evaluation.metric}: champion kept"


def decide(evaluation: EvaluationSpec, challenger_version: str, challenger_score: float, champion_version: str | None,
           champion_score: float | None) -> tuple[bool, str]:
    """The gate's decision for a registered challenger against the current champion (None before the first promotion)."""
    if champion_version is not None and champion_version == challenger_version:
        return False, "challenger is already the champion"
    return gate(challenger_score, champion_score, evaluation)


def gate_holds(evaluation: EvaluationSpec, served_version: str, served_score: float, challenger_version: str,
               challenger_score: float, previous_version: str | None, promoted: bool) -> bool:
    """What the gate check asserts after the fact: the alias follows the decision and no worse model is served."""
    keeps_challenger = promoted or previous_version == challenger_version
    expected = challenger_version if keeps_challenger or previous_version is None else previous_version
    worse_by = challenger_score - served_score if evaluation.higher_is_better else served_score - challenger_score
    return served_version == expected and worse_by < max(evaluation.min_improvement, 0.0) + 1e-12


def score_model(model_uri: str, spec: PipelineSpec, holdout: pl.DataFrame) -> float:
    """A registered model's gate metric on featurized holdout rows (loaded with whichever trainer logged it)."""
    from kiln.trainers import load_predictor

    return score(spec.evaluation.metric, holdout[spec.target].to_numpy(), load_predictor(model_uri, spec).predict(holdout))
