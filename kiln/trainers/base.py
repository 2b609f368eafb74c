"""What every trainer kind implements: its params model, fit, MLflow logging and loading, and its serving packages.

A trainer module keeps its heavy imports (lightgbm, torch, sklearn, mlflow, numpy, polars) inside functions: the spec
loader validates ``trainer.params`` against :attr:`Trainer.Params` while Dagster definitions load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from kiln.spec import PipelineSpec


class Params(BaseModel):
    """Base of a trainer's ``trainer.params`` model: unknown fields are errors unless a trainer allows them."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Predictor(Protocol):
    """Predictions for featurized rows (the output of ``kiln.features.compute_features``)."""

    flavor: str

    def predict(self, features: pl.DataFrame) -> np.ndarray: ...

    def importances(self) -> tuple[str, np.ndarray] | None:
        """(what is measured, one value per feature in the spec's order), or None when the model has none."""
        ...


@dataclass
class Session:
    """Where a fit runs. Without an MLflow run or a checkpoint folder a trainer simply fits (unit tests, previews)."""

    features_version: str = ""
    dagster_run_id: str = ""
    mlflow_run_id: str | None = None
    checkpoint_dir: Path | None = None
    log: Callable[[str], Any] = lambda message: None


@dataclass
class Fitted:
    """A trained model and how the training went."""

    model: Any  # the native object: a LightGBM booster, a torch module, a scikit-learn estimator
    predictor: Predictor
    params: dict[str, Any]  # logged as the MLflow run's params
    training: dict[str, Any] = field(default_factory=dict)  # facts (epochs, device): run tags `kiln.<k>`, the record's "training"
    checkpoint: Path | None = None  # removed once the model version is registered


class Trainer(ABC):
    """One kind of model. Instances are built from a spec whose ``trainer.kind`` names the trainer."""

    Params: ClassVar[type[Params]]
    flavor: ClassVar[str]  # the MLflow flavor its models are logged with (read back from the MLmodel file to load them)
    starter_params: ClassVar[dict[str, Any]] = {}  # what `kiln new` and `dg scaffold defs` write for this kind

    def __init__(self, spec: PipelineSpec) -> None:
        from kiln.trainers import params_error

        self.spec = spec
        try:
            self.params = self.Params.model_validate(spec.trainer.params)
            self.check()
        except ValueError as exc:
            raise ValueError(f"{spec.name}: trainer: {params_error(exc, spec.trainer.kind)}") from None

    def check(self) -> None:
        """Checks too slow for spec loading (they import the ML library); raise ``ValueError("params.<field>: reason")``."""
        return None  # most trainers say everything in their params model

    @abstractmethod
    def fit(self, train: pl.DataFrame, session: Session | None = None) -> Fitted:
        """Train on featurized rows (time-ordered, the target column included)."""

    @abstractmethod
    def log_model(self, fitted: Fitted, example: pl.DataFrame, registered_model_name: str, tags: dict[str, str]) -> Any:
        """Log the model to the active MLflow run as artifact ``model`` and register it; returns MLflow's ModelInfo."""

    @classmethod
    @abstractmethod
    def load(cls, folder: Path, spec: PipelineSpec, num_threads: int | None = 0) -> Predictor:
        """A predictor from a local MLflow model folder of this trainer's flavor. ``num_threads`` None: the library's default."""

    @classmethod
    def serving_packages(cls, spec: PipelineSpec) -> list[str]:
        """pip requirements the served model needs besides Kiln's serving runtime."""
        return []

    @classmethod
    def wants_gpu(cls, spec: PipelineSpec) -> bool:
        """Whether the served model should get the GPU image (e.g. a torch model trained on GPUs)."""
        return False
