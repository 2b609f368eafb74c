"""The reference-vs-current drift report of one window: PSI/JS per column, a histogram PNG, a JSON table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.reference import bin_labels
from kiln.spec import PipelineSpec


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
        ax.set_xticklabels(bin_labels(kind, spec), rotation=60, fontsize=6)
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
