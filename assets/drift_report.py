"""Drift profiles tied to model versions, and the reference-vs-current drift report.

Owns: the training reference of a model (feature bins plus the bins of the model's own prediction score), stored as
the MLflow artifact ``drift/reference.json`` on the model's run; publishing the champion's reference where
`<p>/predictions` and `<p>_drift` read it; the per-feature histogram image and PSI table of a window. The math lives in
:mod:`kiln.drift`; this module only shapes, stores and draws.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import numpy as np
    import polars as pl

PREDICTION = "_prediction"  # the prediction-score column, named as in the endpoint's prediction log
REFERENCE_ARTIFACT = "drift/reference.json"


def reference_id(reference: Mapping[str, Any]) -> str:
    """A content hash of a reference profile: windows binned against another reference are not comparable."""
    return hashlib.sha256(json.dumps(reference, sort_keys=True).encode()).hexdigest()[:16]


def training_reference(spec: PipelineSpec, features: pl.DataFrame, predictions: np.ndarray) -> dict[str, Any]:
    """The reference of a model: its features' bins plus the bins of its prediction score on the same rows."""
    import polars as pl

    from kiln.drift import build_reference
    from kiln.features import profile_frame

    if len(predictions) != features.height:
        raise ValueError(f"{spec.name}: {len(predictions)} predictions for {features.height} feature rows")
    # Categoricals are profiled as raw values (so `other` is visible); the features frame holds their codes.
    decoded = features.select(
        [
            pl.col(c).replace_strict(list(range(len(spec.schema_[c].allowed or []))), list(spec.schema_[c].allowed or []),
                                     default=None, return_dtype=pl.String).alias(c)
            for c in spec.features.categorical
        ]
    )
    profile_input, numeric, categorical = profile_frame(spec, decoded, features)
    profile_input = profile_input.with_columns(pl.Series(PREDICTION, predictions, dtype=pl.Float64))
    return build_reference(profile_input, numeric=[*numeric, PREDICTION], categorical=categorical, bins=spec.drift.bins)


def reference_path(state_root: str, pipeline: str) -> Path:
    """Where the served champion's reference lives (read by `<p>/predictions` and `<p>_drift`)."""
    return Path(state_root) / "reference" / pipeline / "reference.json"


def publish_champion_reference(client: Any, spec: PipelineSpec, run_id: str, state_root: str) -> dict[str, Any] | None:
    """Copy the champion's ``drift/reference.json`` from its MLflow run to the reference drift is judged against.

    Returns the reference, or None when the run has none (a model logged before references were stored): the
    features reference written by `<p>/features` then stays in place.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, REFERENCE_ARTIFACT, tmp)
        except (MlflowException, OSError):
            return None
        reference = json.loads(Path(local).read_text())
    path = reference_path(state_root, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(reference))
    tmp_path.rename(path)  # the sensor never reads half a file
    return reference


def reference_table(reference: Mapping[str, Any]) -> dg.MetadataValue:
    """The reference profile as a Dagster table: one row per column with its bins and reference proportions."""
    import dagster as dg

    records = []
    for kind in ("numeric", "categorical"):
        for col, spec in reference.get(kind, {}).items():
            counts = spec["counts"]
            total = sum(counts) or 1
            labels = _bin_labels(kind, spec)
            records.append(
                dg.TableRecord(
                    {
                        "column": col,
                        "kind": kind,
                        "bins": len(counts),
                        "bins_detail": ", ".join(labels)[:500],
                        "proportions": ", ".join(f"{c / total:.3f}" for c in counts),
                    }
                )
            )
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("column", "string"),
            dg.TableColumn("kind", "string"),
            dg.TableColumn("bins", "int"),
            dg.TableColumn("bins_detail", "string"),
            dg.TableColumn("proportions", "string"),
        ]
    )
    return dg.MetadataValue.table(records=records, schema=schema)


def psi_rows(reference: Mapping[str, Any], counts: Mapping[str, Any], decision: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per column: PSI and Jensen-Shannon of the window against the reference, and whether it counted as drifted."""
    from kiln.drift import column_scores

    psi = column_scores(reference, counts, "psi")
    js = column_scores(reference, counts, "js")
    drifted = set((decision or {}).get("drifted_columns", []))
    rows = [{"column": c, "psi": round(psi[c], 5), "js": round(js[c], 5), "drifted": c in drifted} for c in psi]
    return sorted(rows, key=lambda r: -r["psi"])


def psi_markdown(rows: list[dict[str, Any]]) -> str:
    """The PSI table as markdown (Dagster renders it in the materialization's metadata)."""
    lines = ["| column | PSI | JS | drifted |", "|---|---:|---:|:---:|"]
    lines += [f"| {r['column']} | {r['psi']:.4f} | {r['js']:.4f} | {'yes' if r['drifted'] else ''} |" for r in rows]
    return "\n".join(lines)


def histogram_image(reference: Mapping[str, Any], counts: Mapping[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    """Draw reference-vs-current bin proportions for every column (one panel each, PSI in the title) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in a Dagster run process
    import matplotlib.pyplot as plt
    import numpy as np

    psi = {r["column"]: r["psi"] for r in rows}
    columns = [(kind, col, spec) for kind in ("numeric", "categorical") for col, spec in reference.get(kind, {}).items()]
    ncols = 4
    nrows = max(1, -(-len(columns) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    for ax, (kind, col, spec) in zip(axes.flat, columns):
        ref = np.asarray(spec["counts"], dtype=float)
        cur = np.asarray(counts[kind][col], dtype=float)
        ref = ref / ref.sum() if ref.sum() else ref
        cur = cur / cur.sum() if cur.sum() else cur
        x = np.arange(len(ref))
        ax.bar(x - 0.2, ref, width=0.4, label="reference", color="#4c72b0")
        ax.bar(x + 0.2, cur, width=0.4, label="current", color="#dd8452")
        ax.set_xticks(x)
        ax.set_xticklabels(_bin_labels(kind, spec), rotation=60, fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{col}  PSI={psi.get(col, 0.0):.3f}", fontsize=9, color="#c44e52" if psi.get(col, 0.0) > 0.2 else "black")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"reference (n={reference.get('n')}) vs current window (n={counts.get('n')})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(
    spec: PipelineSpec, reference: Mapping[str, Any], window: Mapping[str, Any], folder: Path,
    decision: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of one window: PSI rows, a PNG and a JSON table in ``folder``; returns paths and rows."""
    rows = psi_rows(reference, window["counts"], decision)
    safe = str(window["window_id"]).replace(".", "_")
    image = histogram_image(reference, window["counts"], rows, folder / f"report-{safe}.png")
    table = folder / f"psi-{safe}.json"
    table.write_text(json.dumps({"pipeline": spec.name, "window": window["window_id"], "n": window["counts"]["n"], "columns": rows}))
    return {"image": image, "table": table, "rows": rows}


def log_report(client: Any, run_id: str, report: Mapping[str, Any], window_id: str) -> str:
    """Attach a report's image and PSI table to an MLflow run (the champion's) under ``drift/<window>``."""
    artifact_path = f"drift/{str(window_id).replace('.', '_')}"
    client.log_artifact(run_id, str(report["image"]), artifact_path)
    client.log_artifact(run_id, str(report["table"]), artifact_path)
    return artifact_path


def _bin_labels(kind: str, spec: Mapping[str, Any]) -> list[str]:
    if kind == "categorical":
        return [*spec["categories"], "other", "null"]
    edges = [f"{e:.3g}" for e in spec["edges"]]
    if not edges:
        return ["all", "null"]
    return [f"<{edges[0]}", *[f"[{a},{b})" for a, b in zip(edges, edges[1:])], f">={edges[-1]}", "null"]
