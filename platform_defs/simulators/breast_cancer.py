"""The Wisconsin diagnostic breast cancer data (569 real biopsies) as a source snapshot, from scikit-learn's bundled copy.

The data ships inside scikit-learn (``sklearn.datasets.load_breast_cancer``): nothing is downloaded.
``drift`` in [0, 1] is a synthetic covariate shift on top of the real rows (cell nuclei measured
larger and rougher, as by a recalibrated scanner); the labels are the real diagnoses.
"""

from __future__ import annotations

from datetime import date
from typing import Any

# Columns whose values a recalibrated scanner would read larger (size and texture measurements).
SHIFTED = ("radius", "texture", "perimeter", "area")


def column_name(feature: str) -> str:
    """scikit-learn's feature name as a spec column: 'mean concave points' -> 'mean_concave_points'."""
    return feature.replace(" ", "_")


def generate_snapshot(day: date, rows: int, seed: int, drift: float = 0.0) -> Any:
    """Up to ``rows`` real samples in a seeded random order, as a polars DataFrame; ``day`` does not change the data."""
    import numpy as np
    import polars as pl
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = np.random.default_rng([seed, int(round(drift * 1000))])
    order = rng.permutation(len(data.target))[: max(1, min(rows, len(data.target)))]
    values = data.data[order]
    if drift:
        scale = np.array([1.0 + 0.35 * drift if any(s in f for s in SHIFTED) else 1.0 for f in data.feature_names])
        values = values * scale * rng.lognormal(0.0, 0.05 * drift, size=values.shape)
    columns: dict[str, Any] = {"sample_id": [f"wdbc-{i:03d}" for i in order]}
    columns |= {column_name(str(f)): np.round(values[:, j], 6) for j, f in enumerate(data.feature_names)}
    # scikit-learn codes benign as 1; the pipeline predicts the probability of malignancy.
    columns["malignant"] = (1 - data.target[order]).astype(np.int64)
    return pl.DataFrame(columns)
