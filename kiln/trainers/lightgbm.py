"""``trainer.kind: lightgbm``: a gradient-boosted LightGBM booster on the feature matrix, categoricals declared as such.

``trainer.params`` are LightGBM's own booster parameters (``learning_rate``, ``num_leaves``, ...) plus
``num_boost_round``; the objective follows the spec's task. Logged with ``mlflow.lightgbm``; loaded as a native booster.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict, Field

from kiln.trainers.base import Fitted, Params, Session, Trainer

if TYPE_CHECKING:
    import lightgbm as lgb
    import numpy as np
    import polars as pl

    from kiln.spec import PipelineSpec

SMALL_FRAME_ROWS = 4096  # matrix() of up to this many rows is filled on the calling thread
SERVING_REQUIREMENT = "lightgbm>=4,<5"


class LightGBMParams(Params):
    """``trainer.params`` of a LightGBM trainer: booster parameters are passed through to ``lightgbm.train``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    num_boost_round: int = Field(default=200, ge=1, le=100_000)
    learning_rate: float | None = Field(default=None, gt=0)
    num_leaves: int | None = Field(default=None, ge=2)
    seed: int | None = None

    def booster_params(self) -> dict[str, Any]:
        """What ``lightgbm.train`` gets as ``params`` (everything but ``num_boost_round``; unset fields left out)."""
        return {k: v for k, v in self.model_dump(exclude={"num_boost_round"}).items() if v is not None}


def matrix(frame: pl.DataFrame, spec: PipelineSpec) -> np.ndarray:
    """Features as a float matrix in the spec's order (nulls become NaN, LightGBM's missing)."""
    import numpy as np
    import polars as pl

    from kiln.features import feature_columns

    cols = feature_columns(spec, frame)
    if cols == frame.columns and all(dtype.is_numeric() for dtype in frame.dtypes):
        # Already the features in order (compute_features' output): numpy's cast of the whole frame is the same
        # float64 matrix, nulls as NaN, ~8x cheaper than a polars select per call (serving calls this per batch).
        if frame.height > SMALL_FRAME_ROWS:
            return frame.to_numpy().astype(np.float64, copy=False)
        # A served batch of a few rows: filled column by column on this thread (the same values; the frame's
        # to_numpy hands the columns to polars' thread pool, whose wake-ups cost more than the copy).
        out = np.empty((frame.height, frame.width), dtype=np.float64)
        for i, column in enumerate(frame.iter_columns()):
            out[:, i] = column.to_numpy()
        return out
    return frame.select([pl.col(c).cast(pl.Float64) for c in cols]).to_numpy()


def train_lightgbm(train: pl.DataFrame, spec: PipelineSpec) -> lgb.Booster:
    """Fit a LightGBM booster on the training rows, categoricals declared as such."""
    import lightgbm as lgb

    from kiln.features import feature_columns

    params = LightGBMParams.model_validate(spec.trainer.params)
    objective = "binary" if spec.task == "classification" else "regression"
    booster_params = {"objective": objective, "verbosity": -1, "num_threads": 0, "deterministic": True, **params.booster_params()}
    names = feature_columns(spec, train)
    dataset = lgb.Dataset(
        matrix(train, spec),
        label=train[spec.target].cast(float).to_numpy(),
        feature_name=names,
        categorical_feature=[n for n in names if n in spec.features.categorical],
        free_raw_data=True,
    )
    return lgb.train(booster_params, dataset, num_boost_round=params.num_boost_round)


def predict(booster: lgb.Booster, frame: pl.DataFrame, spec: PipelineSpec) -> np.ndarray:
    """Positive-class probability (classification) or value (regression) for featurized rows."""
    return booster.predict(matrix(frame, spec), num_threads=0)  # type: ignore[return-value]  # a 1-d array for one model


def load_booster(model_uri: str) -> lgb.Booster:
    """Load a registered LightGBM model from MLflow as a native booster."""
    import mlflow.lightgbm

    return mlflow.lightgbm.load_model(model_uri)


class LightGBMPredictor:
    """A native LightGBM booster; ``num_threads`` None leaves the booster's own setting."""

    flavor = "lightgbm"

    def __init__(self, booster: Any, spec: PipelineSpec, num_threads: int | None = 0) -> None:
        self.booster, self.spec, self.num_threads = booster, spec, num_threads

    def predict(self, features: pl.DataFrame) -> np.ndarray:
        if self.num_threads is None:
            return self.booster.predict(matrix(features, self.spec))  # type: ignore[no-any-return]
        return self.booster.predict(matrix(features, self.spec), num_threads=self.num_threads)  # type: ignore[no-any-return]

    def importances(self) -> tuple[str, np.ndarray] | None:
        return "LightGBM gain", self.booster.feature_importance("gain")


class LightGBMTrainer(Trainer):
    """Gradient-boosted trees (LightGBM)."""

    Params: ClassVar[type[Params]] = LightGBMParams
    flavor: ClassVar[str] = "lightgbm"
    starter_params: ClassVar[dict[str, Any]] = {"num_boost_round": 200, "learning_rate": 0.05, "num_leaves": 31, "seed": 7}

    def fit(self, train: pl.DataFrame, session: Session | None = None) -> Fitted:
        # Through the module-level function: tests stop a training mid-way by wrapping it.
        booster = train_lightgbm(train, self.spec)
        params = {"num_boost_round": self.params.num_boost_round, **self.params.booster_params()}  # type: ignore[attr-defined]
        return Fitted(model=booster, predictor=LightGBMPredictor(booster, self.spec), params=params)

    def log_model(self, fitted: Fitted, example: pl.DataFrame, registered_model_name: str, tags: dict[str, str]) -> Any:
        import lightgbm as lgb
        import mlflow
        import polars as pl
        from mlflow.models import infer_signature

        from kiln.features import feature_columns

        # The booster sees floats (NaN for missing), so the signature says so too.
        frame = example.select([pl.col(c).cast(pl.Float64) for c in feature_columns(self.spec, example)]).to_pandas()
        return mlflow.lightgbm.log_model(
            fitted.model,
            name="model",
            signature=infer_signature(frame, fitted.predictor.predict(example)),
            input_example=frame,
            registered_model_name=registered_model_name,
            tags=tags,
            # Explicit requirements: MLflow's inference runs a subprocess that costs seconds per retrain.
            pip_requirements=[f"lightgbm=={lgb.__version__}", f"mlflow=={mlflow.__version__}"],
        )

    @classmethod
    def load(cls, folder: Path, spec: PipelineSpec, num_threads: int | None = 0) -> LightGBMPredictor:
        import lightgbm as lgb

        return LightGBMPredictor(lgb.Booster(model_file=str(next(folder.rglob("model.lgb")))), spec, num_threads)

    @classmethod
    def serving_packages(cls, spec: PipelineSpec) -> list[str]:
        return [SERVING_REQUIREMENT]
