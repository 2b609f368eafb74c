"""One way to load a registered model and predict with it, whatever trained it (LightGBM or torch).

The gate (`<p>/champion`), the endpoint's smoke test and the BentoML service all call
:func:`load_predictor`, so offline and online predictions come from the same code. The flavor is read
from the MLflow model itself (its ``MLmodel`` file), not from the spec: a champion trained before a
spec switched trainers still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

FLAVORS = ("lightgbm", "pytorch")


class Predictor(Protocol):
    """Predictions for featurized rows (the output of ``compute_features``)."""

    flavor: str

    def predict(self, features: pl.DataFrame) -> np.ndarray: ...


class LightGBMPredictor:
    """A native LightGBM booster; ``num_threads`` None leaves the booster's own setting."""

    flavor = "lightgbm"

    def __init__(self, booster: Any, spec: PipelineSpec, num_threads: int | None = 0) -> None:
        self.booster, self.spec, self.num_threads = booster, spec, num_threads

    def predict(self, features: pl.DataFrame) -> np.ndarray:
        from assets.model import matrix

        if self.num_threads is None:
            return self.booster.predict(matrix(features, self.spec))
        return self.booster.predict(matrix(features, self.spec), num_threads=self.num_threads)


class TorchPredictor:
    """A torch module that maps the raw float32 feature matrix to predictions (standardisation inside), on CPU."""

    flavor = "pytorch"

    def __init__(self, module: Any, spec: PipelineSpec) -> None:
        self.module, self.spec = module, spec

    def predict(self, features: pl.DataFrame) -> np.ndarray:
        from assets.train_torch import features_matrix, predict_module

        return predict_module(self.module, features_matrix(features, self.spec))


def model_dir(source: str) -> Path:
    """The local folder holding an MLflow model's ``MLmodel``: downloaded for ``models:/``/``runs:/`` URIs, searched in a folder."""
    if "://" in source or source.startswith(("models:/", "runs:/")):
        import mlflow.artifacts

        source = mlflow.artifacts.download_artifacts(artifact_uri=source)
    root = Path(source)
    if (root / "MLmodel").exists():
        return root
    found = sorted(root.rglob("MLmodel"))
    if not found:
        raise FileNotFoundError(f"no MLflow model (MLmodel file) under {source}")
    return found[0].parent


def flavor_of(folder: Path) -> str:
    """'lightgbm' or 'pytorch', from the MLmodel file."""
    import yaml

    flavors = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("flavors", {})
    for name in FLAVORS:
        if name in flavors:
            return name
    raise ValueError(f"{folder / 'MLmodel'}: flavors {sorted(flavors)} include none Kiln serves ({', '.join(FLAVORS)})")


def load_predictor(source: str, spec: PipelineSpec, num_threads: int | None = 0) -> Predictor:
    """A predictor from an MLflow model URI (``models:/<p>/<n>``) or a local folder holding one (e.g. a bento model)."""
    folder = model_dir(source)
    flavor = flavor_of(folder)
    if flavor == "lightgbm":
        import lightgbm as lgb

        return LightGBMPredictor(lgb.Booster(model_file=str(next(folder.rglob("model.lgb")))), spec, num_threads)
    import torch

    if num_threads is not None and num_threads > 0:
        torch.set_num_threads(num_threads)
    exported = next(folder.rglob("model.pt2"), None)
    if exported is not None:
        module = torch.export.load(str(exported)).module()
    else:
        import mlflow.pytorch

        module = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    return TorchPredictor(module, spec)
