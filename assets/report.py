"""The model report on `<p>/model`: evaluation plots, feature importance and a model card.

Rendered once per trained version (matplotlib, Agg backend), logged to the model's MLflow run under
``report/`` and attached to the materialization as metadata the Dagster UI renders (markdown with
inline PNGs). Works for any trainer: holdout scores come from the trainer or :func:`assets.predictors.load_predictor`.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import numpy as np
    import polars as pl
    from matplotlib.figure import Figure

REPORT_DIR = "report"
CARD_FILE = f"{REPORT_DIR}/model_card.md"
DPI = 80  # small PNGs: they travel inline in Dagster metadata


def evaluation_figures(task: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Figure]:
    """ROC, precision-recall and calibration for classifiers; residuals for regressors."""
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn import metrics as m

    figures: dict[str, Figure] = {}
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if task == "classification":
        fpr, tpr, _ = m.roc_curve(y_true, y_pred)
        fig = Figure(figsize=(4, 4), dpi=DPI)
        ax = fig.add_subplot()
        ax.plot(fpr, tpr, label=f"AUC {m.roc_auc_score(y_true, y_pred):.3f}")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        ax.legend(loc="lower right")
        figures["roc"] = fig
        precision, recall, _ = m.precision_recall_curve(y_true, y_pred)
        fig = Figure(figsize=(4, 4), dpi=DPI)
        ax = fig.add_subplot()
        ax.plot(recall, precision, label=f"AP {m.average_precision_score(y_true, y_pred):.3f}")
        ax.axhline(float(y_true.mean()), linestyle="--", color="grey")
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        ax.legend(loc="upper right")
        figures["pr"] = fig
        from sklearn.calibration import calibration_curve

        observed, predicted = calibration_curve(y_true, np.clip(y_pred, 0, 1), n_bins=10, strategy="quantile")
        fig = Figure(figsize=(4, 4), dpi=DPI)
        ax = fig.add_subplot()
        ax.plot(predicted, observed, "o-")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Calibration")
        figures["calibration"] = fig
    else:
        residuals = y_true - y_pred
        fig = Figure(figsize=(8, 4), dpi=DPI)
        left, right = fig.subplots(1, 2)
        left.scatter(y_pred, residuals, s=4, alpha=0.4)
        left.axhline(0, color="grey", linestyle="--")
        left.set(xlabel="prediction", ylabel="residual", title="Residuals vs prediction")
        right.hist(residuals, bins=40)
        right.set(xlabel="residual", title="Residual distribution")
        figures["residuals"] = fig
    return figures


def importance_figure(names: list[str], gains: np.ndarray, top: int = 20) -> Figure:
    """Horizontal bars of the ``top`` features by gain."""
    import numpy as np
    from matplotlib.figure import Figure

    order = np.argsort(gains)[::-1][:top][::-1]
    fig = Figure(figsize=(5, max(2.0, 0.3 * len(order) + 1)), dpi=DPI)
    ax = fig.add_subplot()
    ax.barh([names[i] for i in order], [float(gains[i]) for i in order])
    ax.set(xlabel="total gain", title="Feature importance (LightGBM gain)")
    fig.tight_layout()
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def model_card(spec: PipelineSpec, record: dict[str, Any], window: dict[str, Any], champion: dict[str, Any] | None) -> str:
    """The model card: what the model is for, what it was trained on, how it scores against the champion, its limits."""
    metric = spec.evaluation.metric
    lines = [
        f"# Model card: {spec.name} v{record['version']}",
        "",
        f"**Intended use.** {spec.description or 'No description in the spec.'}",
        "",
        f"**Owner.** {spec.owner or 'not set in the spec'}",
        f"**Task.** {spec.task} of `{spec.target}` with a {spec.trainer.kind} model (MLflow run `{record['run_id']}`).",
        "",
        "## Data window",
        f"- rows: {window['rows']} (train {record['train_rows']}, holdout {record['holdout_rows']}, newest {spec.evaluation.holdout:.0%})",
    ]
    if window.get("start"):
        lines.append(f"- time: {window['start']} to {window['end']} ({window['days']} days)")
    lines.append(f"- features data version: `{record['features_data_version']}`")
    lines += ["", "## Metrics on the holdout", "", "| metric | this model | champion |", "|---|---|---|"]
    theirs = (champion or {}).get("metrics", {})
    for name, value in record["metrics"].items():
        other = theirs.get(name)
        lines.append(f"| {name}{' (gate)' if name == metric else ''} | {value:.4f} | {'' if other is None else f'{other:.4f}'} |")
    if champion:
        lines += ["", f"Champion: version {champion['version']}. The gate promotes this model only if it beats the champion's "
                      f"{metric} by at least {spec.evaluation.min_improvement} (champion scored on its own holdout here)."]
    else:
        lines += ["", "No champion yet: the gate promotes the first model."]
    lines += [
        "",
        "## Limitations",
        f"- Trained on {window['rows']} rows of the simulated/observed window above only; behaviour outside it (new "
        "categories, ranges beyond the data contract) is not measured.",
        f"- Inputs must satisfy the data contract of `{spec.name}/validated`; the endpoint rejects rows outside it.",
        f"- Drift is watched with {spec.drift.method} > {spec.drift.threshold}; a drifted population triggers a retrain, "
        "not a guarantee of quality in between.",
        "- Scores are from a time-ordered holdout of the same window, not from live outcomes.",
    ]
    return "\n".join(lines) + "\n"


def data_window(features: pl.DataFrame, spec: PipelineSpec) -> dict[str, Any]:
    """Rows and time span the model was trained and evaluated on."""
    ts = spec.source.timestamp_column
    window: dict[str, Any] = {"rows": features.height}
    if ts and ts in features.columns and features.height:
        start, end = features[ts].min(), features[ts].max()
        window.update(start=str(start), end=str(end), days=features[ts].dt.date().n_unique())
    return window


def _inline(name: str, data: bytes) -> str:
    return f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})"


def inline_png(name: str, data: bytes) -> str:
    """Markdown that embeds a PNG, so the Dagster UI renders the image inside the metadata."""
    return _inline(name, data)


def attach(output: dg.Output, spec: PipelineSpec, features: pl.DataFrame, mlflow: Any,
           holdout_scores: np.ndarray | None = None, gains: np.ndarray | None = None) -> dg.Output:
    """Render the report for the model in ``output``, log it to its MLflow run and return the output with report metadata.

    ``holdout_scores`` and ``gains``: the trainer's own holdout predictions and LightGBM gain importances, when it has
    them in memory; without scores the registered model is loaded to score the holdout (and give gains if LightGBM).
    """
    import tempfile
    from pathlib import Path

    import dagster as dg

    from assets.champion import split_holdout
    from assets.predictors import load_predictor
    from kiln.features import feature_columns

    record = output.value
    client = mlflow.client()
    _, holdout = split_holdout(features, spec)
    if holdout_scores is None:
        predictor = load_predictor(record["model_uri"], spec)
        holdout_scores = predictor.predict(holdout)
        if predictor.flavor == "lightgbm":
            gains = predictor.booster.feature_importance("gain")  # type: ignore[attr-defined]
    figures = evaluation_figures(spec.task, holdout[spec.target].to_numpy(), holdout_scores)
    if gains is not None:
        figures["feature_importance"] = importance_figure(feature_columns(spec, features), gains)
    champion = None
    current = mlflow.champion(spec.name)
    if current is not None and str(current.version) != record["version"]:
        champion = {"version": str(current.version), "metrics": dict(client.get_run(current.run_id).data.metrics)}
    card = model_card(spec, record, data_window(features, spec), champion)
    images = {name: png(fig) for name, fig in figures.items()}  # rendered once, for MLflow and the UI alike
    with tempfile.TemporaryDirectory(prefix="kiln-report-") as tmp:
        folder = Path(tmp)
        for name, data in images.items():
            (folder / f"{name}.png").write_bytes(data)
        (folder / Path(CARD_FILE).name).write_text(card)
        client.log_artifacts(record["run_id"], tmp, REPORT_DIR)  # one upload for the whole report
    metadata = {
        "model_card": dg.MetadataValue.md(card),
        **{f"plot/{name}": dg.MetadataValue.md(_inline(name, data)) for name, data in images.items()},
        "report_artifacts": dg.MetadataValue.text(", ".join([CARD_FILE, *[f"{REPORT_DIR}/{n}.png" for n in images]])),
    }
    return dg.Output(output.value, metadata={**(output.metadata or {}), **metadata})
