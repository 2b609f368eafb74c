"""The model report: evaluation plots, feature importance and a model card, for any trainer.

Rendered once per trained version (matplotlib, Agg backend, no display) and logged to the model's MLflow run under
``report/``; `<p>/model` also shows it in the Dagster UI (markdown with inline PNGs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
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


def importance_figure(names: list[str], gains: np.ndarray, measure: str = "gain", top: int = 20) -> Figure:
    """Horizontal bars of the ``top`` features by importance (``measure``: what the trainer measures, e.g. LightGBM gain)."""
    import numpy as np
    from matplotlib.figure import Figure

    order = np.argsort(gains)[::-1][:top][::-1]
    fig = Figure(figsize=(5, max(2.0, 0.3 * len(order) + 1)), dpi=DPI)
    ax = fig.add_subplot()
    ax.barh([names[i] for i in order], [float(gains[i]) for i in order])
    ax.set(xlabel=measure, title=f"Feature importance ({measure})")
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


@dataclass
class Report:
    """A rendered report: the model card (markdown) and PNG images by name."""

    card: str
    images: dict[str, bytes]

    @property
    def artifacts(self) -> list[str]:
        """Where the report's files live on the MLflow run."""
        return [CARD_FILE, *[f"{REPORT_DIR}/{name}.png" for name in self.images]]


def render(spec: PipelineSpec, record: dict[str, Any], features: pl.DataFrame, holdout_scores: np.ndarray,
           importances: tuple[str, np.ndarray] | None, champion: dict[str, Any] | None) -> Report:
    """The report of a trained version: ``record`` as `<p>/model` returns it, its holdout scores and importances
    (``(measure, values)`` from the trainer), and the current champion (``{"version", "metrics"}``) or None."""
    from kiln.evaluation import split_holdout
    from kiln.features import feature_columns

    _, holdout = split_holdout(features, spec)
    figures = evaluation_figures(spec.task, holdout[spec.target].to_numpy(), holdout_scores)
    if importances is not None:
        measure, values = importances
        figures["feature_importance"] = importance_figure(feature_columns(spec, features), values, measure)
    card = model_card(spec, record, data_window(features, spec), champion)
    return Report(card=card, images={name: png(fig) for name, fig in figures.items()})  # rendered once, for MLflow and the UI


def log_report(client: Any, run_id: str, report: Report) -> None:
    """Upload the report's files to the MLflow run under ``report/`` (one upload for the whole report)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="kiln-report-") as tmp:
        folder = Path(tmp)
        for name, data in report.images.items():
            (folder / f"{name}.png").write_bytes(data)
        (folder / Path(CARD_FILE).name).write_text(report.card)
        client.log_artifacts(run_id, tmp, REPORT_DIR)
