"""``trainer.kind: sklearn``: any scikit-learn estimator, named by its import path, on the feature matrix.

    trainer:
      kind: sklearn
      params:
        estimator: sklearn.ensemble.HistGradientBoostingClassifier   # a classifier with predict_proba, or a regressor
        params: {max_iter: 50}                                        # the estimator's own keyword arguments

Classifiers predict the positive-class probability (like LightGBM), regressors the value. An estimator that cannot
take missing values (scikit-learn's ``allow_nan`` tag) gets a median ``SimpleImputer`` in front of it, and
``random_state`` is 0 unless set, so a retrain on the same data gives the same model. Logged with ``mlflow.sklearn``
(plain pickle) and served with the same scikit-learn version.

The spec loader checks the path without importing scikit-learn (the class must be a public name of its module);
that it is an estimator for the spec's task, and its arguments, are checked when the trainer is built.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator

from kiln.trainers.base import Fitted, Params, Session, Trainer

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from kiln.spec import PipelineSpec

PATH_PATTERN = re.compile(r"^sklearn(\.[A-Za-z_][A-Za-z0-9_]*)+[.:][A-Za-z_][A-Za-z0-9_]*$")
EXAMPLE = "sklearn.ensemble.HistGradientBoostingClassifier"
SEED = 0  # random_state when the params do not set one


class SklearnParams(Params):
    """``trainer.params`` of a scikit-learn trainer: which estimator, and its keyword arguments."""

    estimator: str = Field(description=f"import path of a scikit-learn estimator class, e.g. {EXAMPLE}")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the estimator")

    @field_validator("estimator")
    @classmethod
    def _path(cls, value: str) -> str:
        if not PATH_PATTERN.fullmatch(value):
            raise ValueError(f"'{value}' is not the import path of a scikit-learn estimator class (e.g. {EXAMPLE})")
        module, name = split_path(value)
        names = public_names(module)
        if names is None:
            raise ValueError(f"'{value}': scikit-learn has no module {module}")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f" (did you mean {module}.{close[0]}?)" if close else ""
            raise ValueError(f"'{value}': {module} has no class {name}{hint}")
        return f"{module}.{name}"


def split_path(path: str) -> tuple[str, str]:
    """('sklearn.ensemble', 'HistGradientBoostingClassifier') from a dotted or ``module:Class`` path."""
    module, _, name = path.replace(":", ".").rpartition(".")
    return module, name


@cache
def public_names(module: str) -> frozenset[str] | None:
    """Names a scikit-learn module defines or imports, read from its source (scikit-learn itself is not imported).

    None when the installed scikit-learn has no such module."""
    from importlib.util import find_spec

    found = find_spec("sklearn")  # locates the package; importing it would cost a second while definitions load
    if found is None or not found.submodule_search_locations:
        return None
    base = Path(list(found.submodule_search_locations)[0]).joinpath(*module.split(".")[1:])
    source = next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)
    if source is None:
        return None
    names: set[str] = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return frozenset(n for n in names if not n.startswith("_"))


def estimator_class(path: str) -> type:
    """The class an estimator path names (imports scikit-learn)."""
    from importlib import import_module

    module, name = split_path(path)
    cls = getattr(import_module(module), name, None)
    if not isinstance(cls, type):
        raise ValueError(f"params.estimator: '{path}' is not a class")
    return cls


def positive_column(classes: Any) -> int:
    """The ``predict_proba`` column of the positive class (1 / True) of a binary classifier."""
    labels = [int(c) for c in classes]
    if 1 not in labels:
        raise ValueError(f"the classifier was trained without the positive class 1 (classes: {labels})")
    return labels.index(1)


class SklearnPredictor:
    """A fitted scikit-learn estimator (or imputer + estimator pipeline) on the float feature matrix."""

    flavor = "sklearn"

    def __init__(self, estimator: Any, spec: PipelineSpec) -> None:
        self.estimator, self.spec = estimator, spec
        self.column = positive_column(estimator.classes_) if spec.task == "classification" else None

    def predict(self, features: pl.DataFrame) -> np.ndarray:
        import numpy as np

        from kiln.trainers.lightgbm import matrix

        x = matrix(features, self.spec)
        if self.column is None:
            return np.asarray(self.estimator.predict(x), dtype=np.float64)
        return np.asarray(self.estimator.predict_proba(x)[:, self.column], dtype=np.float64)

    def importances(self) -> tuple[str, np.ndarray] | None:
        final = self.estimator.steps[-1][1] if hasattr(self.estimator, "steps") else self.estimator
        values = getattr(final, "feature_importances_", None)
        return None if values is None else ("impurity decrease", values)


class SklearnTrainer(Trainer):
    """Any scikit-learn classifier (with ``predict_proba``) or regressor."""

    Params: ClassVar[type[Params]] = SklearnParams
    flavor: ClassVar[str] = "sklearn"

    def check(self) -> None:
        """The class is a scikit-learn estimator for the spec's task and takes the given arguments."""
        import inspect

        from sklearn.base import BaseEstimator, is_classifier, is_regressor

        path: str = self.params.estimator  # type: ignore[attr-defined]
        cls = estimator_class(path)
        if not issubclass(cls, BaseEstimator):
            raise ValueError(f"params.estimator: {path} is not a scikit-learn estimator (e.g. {EXAMPLE})")
        accepted = list(inspect.signature(cls).parameters)
        for name in self.params.params:  # type: ignore[attr-defined]
            if name not in accepted:
                raise ValueError(f"params.params.{name}: not an argument of {path} (its arguments: {', '.join(accepted)})")
        sample = cls(**self.params.params)  # type: ignore[attr-defined]
        if self.spec.task == "classification" and not (is_classifier(sample) and hasattr(sample, "predict_proba")):
            raise ValueError(f"params.estimator: {path} is not a classifier with predict_proba; the task is classification "
                             f"(e.g. {EXAMPLE})")
        if self.spec.task == "regression" and not is_regressor(sample):
            raise ValueError(f"params.estimator: {path} is not a regressor; the task is regression "
                             "(e.g. sklearn.ensemble.HistGradientBoostingRegressor)")

    def estimator(self) -> Any:
        """A fresh, unfitted estimator: seeded, with a median imputer in front when it cannot take missing values."""
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import make_pipeline

        path: str = self.params.estimator  # type: ignore[attr-defined]
        kwargs = dict(self.params.params)  # type: ignore[attr-defined]
        cls = estimator_class(path)
        estimator = cls(**kwargs)
        if "random_state" in estimator.get_params(deep=False) and "random_state" not in kwargs:
            estimator.set_params(random_state=SEED)
        if _allows_nan(estimator):
            return estimator
        # keep_empty_features: a column that is all missing in training still has its place in the matrix.
        return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), estimator)

    def fit(self, train: pl.DataFrame, session: Session | None = None) -> Fitted:
        from kiln.trainers.lightgbm import matrix

        estimator = self.estimator()
        target = train[self.spec.target]
        y = target.cast(int).to_numpy() if self.spec.task == "classification" else target.cast(float).to_numpy()
        estimator.fit(matrix(train, self.spec), y)
        params = {"estimator": self.params.estimator, **self.params.params}  # type: ignore[attr-defined]
        return Fitted(model=estimator, predictor=SklearnPredictor(estimator, self.spec), params=params)

    def log_model(self, fitted: Fitted, example: pl.DataFrame, registered_model_name: str, tags: dict[str, str]) -> Any:
        import polars as pl

        from kiln.features import feature_columns

        frame = example.select([pl.col(c).cast(pl.Float64) for c in feature_columns(self.spec, example)]).to_pandas()
        # MLflow's generic loader calls predict_proba too, so its output matches the signature and Kiln's predictions.
        method = "predict_proba" if self.spec.task == "classification" else "predict"
        with warnings.catch_warnings():
            # MLflow checks the input example by calling the model on a DataFrame; Kiln always passes the bare matrix.
            warnings.filterwarnings("ignore", message="X has feature names", category=UserWarning)
            return self._log(fitted, frame, method, registered_model_name, tags)

    def _log(self, fitted: Fitted, frame: Any, method: str, registered_model_name: str, tags: dict[str, str]) -> Any:
        from importlib.metadata import version

        import mlflow
        from mlflow.models import infer_signature

        return mlflow.sklearn.log_model(
            fitted.model,
            name="model",
            signature=infer_signature(frame, getattr(fitted.model, method)(frame.to_numpy())),
            input_example=frame,
            registered_model_name=registered_model_name,
            tags=tags,
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_PICKLE,
            pyfunc_predict_fn=method,
            pip_requirements=[f"scikit-learn=={version('scikit-learn')}", f"mlflow=={mlflow.__version__}"],
        )

    @classmethod
    def load(cls, folder: Path, spec: PipelineSpec, num_threads: int | None = 0) -> SklearnPredictor:
        import pickle

        import yaml

        flavor = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("flavors", {}).get("sklearn", {})
        if num_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=num_threads)  # process-wide, like torch.set_num_threads: a served worker owns its cores
        if flavor.get("serialization_format") in ("pickle", "cloudpickle") and flavor.get("pickled_model"):
            with (folder / flavor["pickled_model"]).open("rb") as fh:
                return SklearnPredictor(pickle.load(fh), spec)  # noqa: S301  # our own registry's artifact, checksummed
        import mlflow.sklearn

        return SklearnPredictor(mlflow.sklearn.load_model(str(folder)), spec)

    @classmethod
    def serving_packages(cls, spec: PipelineSpec) -> list[str]:
        from importlib.metadata import version

        return [f"scikit-learn=={version('scikit-learn')}"]  # a pickled estimator loads only in the version that wrote it


def _allows_nan(estimator: Any) -> bool:
    """scikit-learn's own ``allow_nan`` tag (1.6+); older versions: assume not, an imputer is harmless."""
    try:
        from sklearn.utils import get_tags
    except ImportError:
        return False
    return bool(get_tags(estimator).input_tags.allow_nan)
