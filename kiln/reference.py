"""Drift references tied to model versions: a model's training profile and the served champion's reference.

A model's reference (feature bins plus the bins of its own prediction score) is stored as the MLflow artifact
``drift/reference.json`` on its run; the served champion's is published to the state store, where `<p>/predictions`
and `<p>_drift` read it. The math lives in :mod:`kiln.drift`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import paths
from kiln.spec import PipelineSpec
from kiln.state import state_path, write_atomic

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    from upath import UPath

PREDICTION = "_prediction"  # the prediction-score column, named as in the endpoint's prediction log


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


def reference_path(state_root: str, pipeline: str) -> Path | UPath:
    """Where the served champion's reference lives (read by `<p>/predictions` and `<p>_drift`)."""
    return state_path(state_root, paths.reference_file(pipeline))


def load_reference(state_root: str, pipeline: str) -> dict[str, Any] | None:
    """The served champion's reference, or None before any was published."""
    path = reference_path(state_root, pipeline)
    return json.loads(path.read_text()) if path.exists() else None


def publish_champion_reference(client: Any, spec: PipelineSpec, run_id: str, state_root: str) -> dict[str, Any] | None:
    """Copy the champion's ``drift/reference.json`` from its MLflow run to the reference drift is judged against.

    Returns the reference, or None when the run has none (a model logged before references were stored): the
    features reference written by `<p>/features` then stays in place.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, paths.REFERENCE_ARTIFACT, tmp)
        except (MlflowException, OSError):
            return None
        reference = json.loads(Path(local).read_text())
    write_atomic(reference_path(state_root, spec.name), json.dumps(reference))  # the sensor never reads half a file
    return reference


def publish_features_reference(state_root: str, pipeline: str, data_version: str, reference: Mapping[str, Any],
                               sample: list[dict[str, Any]]) -> Path | UPath:
    """Store a training set's reference and sample request rows; until a champion publishes its own reference
    (features + prediction score), drift is judged against the first training set's. Returns the reference's path."""
    path = state_path(state_root, paths.features_reference_file(pipeline, data_version))
    write_atomic(path, json.dumps(reference))
    if not reference_path(state_root, pipeline).exists():
        write_atomic(reference_path(state_root, pipeline), json.dumps(reference))
    write_atomic(state_path(state_root, paths.sample_rows_file(pipeline)), json.dumps(sample))
    return path


def load_sample_rows(state_root: str, pipeline: str) -> list[dict[str, Any]]:
    """The request rows stored from the training source (for smoke tests and the demo's sample request)."""
    return json.loads(state_path(state_root, paths.sample_rows_file(pipeline)).read_text())


def bin_edges_labels(reference: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per profiled column: kind, bin count, bin labels and reference proportions (for tables in the UI)."""
    rows = []
    for kind in ("numeric", "categorical"):
        for col, spec in reference.get(kind, {}).items():
            counts = spec["counts"]
            total = sum(counts) or 1
            rows.append({"column": col, "kind": kind, "bins": len(counts), "bins_detail": ", ".join(bin_labels(kind, spec))[:500],
                         "proportions": ", ".join(f"{c / total:.3f}" for c in counts)})
    return rows


def bin_labels(kind: str, spec: Mapping[str, Any]) -> list[str]:
    if kind == "categorical":
        return [*spec["categories"], "other", "null"]
    edges = [f"{e:.3g}" for e in spec["edges"]]
    if not edges:
        return ["all", "null"]
    return [f"<{edges[0]}", *[f"[{a},{b})" for a, b in zip(edges, edges[1:])], f">={edges[-1]}", "null"]
