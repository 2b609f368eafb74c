"""The trainer registry (kiln.trainers) without Dagster: lazy loading, spec validation errors, and every kind fitted,
logged to MLflow, loaded back by its flavor and served the same predictions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import FRAUD_SPEC, REPO

PARAMS = {
    "lightgbm": {"num_boost_round": 30, "learning_rate": 0.1, "seed": 1},
    "torch": {"epochs": 3, "seed": 1},
    "sklearn": {"estimator": "sklearn.ensemble.HistGradientBoostingClassifier", "params": {"max_iter": 30}},
}


def _fraud_data(**trainer: Any) -> dict[str, Any]:
    from kiln.spec import spec_data

    data = spec_data(FRAUD_SPEC)
    if trainer:
        data["trainer"] = {**data["trainer"], **trainer}
    return data


def _spec(kind: str, params: dict[str, Any] | None = None, task_data: dict[str, Any] | None = None) -> Any:
    from kiln.spec import PipelineSpec

    data = _fraud_data(kind=kind, params=PARAMS[kind] if params is None else params) | (task_data or {})
    return PipelineSpec.model_validate(data)


def _load_error(tmp_path: Path, **trainer: Any) -> str:
    from kiln.spec import SpecError, load_spec

    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(_fraud_data(**trainer), sort_keys=False))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return str(caught.value)


@pytest.fixture(scope="module")
def frames() -> tuple[Any, Any]:
    """Train and holdout rows of two simulated fraud days (categoricals and nulls included)."""
    from kiln.evaluation import split_holdout
    from kiln.features import feature_table
    from platform_defs.simulators.fraud import generate_day

    spec = _spec("lightgbm")
    _, features = feature_table([generate_day(date(2026, 1, d), 2000, 7) for d in (1, 2)], spec)
    return split_holdout(features, spec)


def test_kinds_come_from_the_table_and_modules_load_only_when_used() -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kiln.spec import load_spec\n"
        "import kiln.trainers as t\n"
        f"for name in ('fraud', 'breast_cancer'):\n"
        f"    load_spec(Path({str(REPO)!r}) / 'platform_defs' / 'pipelines' / name / 'defs.yaml')\n"
        "heavy = [m for m in ('torch', 'lightgbm', 'sklearn', 'mlflow', 'numpy', 'polars') if m in sys.modules]\n"
        "print('heavy', heavy)\n"
        "print('loaded', sorted(m for m in sys.modules if m.startswith('kiln.trainers.')))\n"
        "t.trainer_class('sklearn')\n"
        "print('after', 'kiln.trainers.sklearn' in sys.modules, 'sklearn' in sys.modules)\n"
        "print('kinds', t.kinds())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["heavy"] == "[]"  # validating a torch spec's params imports neither torch nor any ML library
    # Only the kinds the shipped specs name are imported (and their base), never sklearn.
    assert lines["loaded"] == "['kiln.trainers.base', 'kiln.trainers.lightgbm', 'kiln.trainers.torch']"
    assert lines["after"] == "True False"  # the sklearn trainer module, not scikit-learn itself
    assert lines["kinds"] == "['lightgbm', 'torch', 'sklearn']"


def test_unknown_kind_is_rejected_with_the_registered_kinds(tmp_path: Path) -> None:
    from kiln.trainers import UnknownTrainer, trainer_class

    assert "fraud.yaml: trainer.kind: 'xgboost' is not one of lightgbm, torch, sklearn" in _load_error(tmp_path, kind="xgboost")
    with pytest.raises(UnknownTrainer, match="'xgboost' is not one of lightgbm, torch, sklearn"):
        trainer_class("xgboost")


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"kind": "lightgbm", "params": {"num_boost_round": 0}},
         "trainer: params.num_boost_round: Input should be greater than or equal to 1"),
        ({"kind": "torch", "params": {"hiden": [8]}}, "trainer: params.hiden: unknown torch parameter"),
        ({"kind": "torch", "params": {"hidden": [8, 0]}}, "trainer: params.hidden: layer sizes must be >= 1, got [8, 0]"),
        ({"kind": "sklearn", "params": {}}, "trainer: params.estimator: Field required"),
        ({"kind": "sklearn", "params": {"estimator": "sklearn.ensemble.HistGradientBoostingClassifier", "max_iter": 5}},
         "trainer: params.max_iter: unknown sklearn parameter"),
        ({"kind": "sklearn", "params": {"estimator": "os.path.join"}},
         "trainer: params.estimator: 'os.path.join' is not the import path of a scikit-learn estimator class"),
        ({"kind": "sklearn", "params": {"estimator": "sklearn.ensemble.HistGradientBoostingClasifier"}},
         "trainer: params.estimator: 'sklearn.ensemble.HistGradientBoostingClasifier': sklearn.ensemble has no class "
         "HistGradientBoostingClasifier (did you mean sklearn.ensemble.HistGradientBoostingClassifier?)"),
        ({"kind": "sklearn", "params": {"estimator": "sklearn.ensembles.RandomForestClassifier"}},
         "trainer: params.estimator: 'sklearn.ensembles.RandomForestClassifier': scikit-learn has no module sklearn.ensembles"),
    ],
)
def test_params_are_validated_by_the_trainers_own_model(tmp_path: Path, trainer: dict[str, Any], message: str) -> None:
    assert f"fraud.yaml: {message}" in _load_error(tmp_path, **trainer)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"estimator": "sklearn.preprocessing.StandardScaler"},
         "fraud: trainer: params.estimator: sklearn.preprocessing.StandardScaler is not a classifier with predict_proba"),
        ({"estimator": "sklearn.ensemble.RandomForestRegressor"},
         "params.estimator: sklearn.ensemble.RandomForestRegressor is not a classifier with predict_proba"),
        ({"estimator": "sklearn.ensemble.HistGradientBoostingClassifier", "params": {"max_iterr": 3}},
         "fraud: trainer: params.params.max_iterr: not an argument of sklearn.ensemble.HistGradientBoostingClassifier"),
    ],
)
def test_sklearn_estimator_is_checked_against_the_task_when_the_trainer_is_built(params: dict[str, Any], message: str) -> None:
    from kiln.trainers import trainer_for

    spec = _spec("sklearn", params)  # passes spec loading: the path names a real scikit-learn class
    with pytest.raises(ValueError, match=None) as caught:
        trainer_for(spec)
    assert message in str(caught.value)


@pytest.fixture(scope="module")
def cancer() -> tuple[dict[str, Any], Any, Any]:
    """The breast_cancer spec (as data) and its real rows, split into train and holdout: a signal every kind must find."""
    from kiln.evaluation import split_holdout
    from kiln.features import feature_table
    from kiln.spec import PipelineSpec, spec_data
    from platform_defs.simulators.breast_cancer import generate_snapshot

    data = spec_data(REPO / "platform_defs" / "pipelines" / "breast_cancer" / "defs.yaml")
    spec = PipelineSpec.model_validate(data)
    _, features = feature_table([generate_snapshot(date(2026, 1, 1), 569, 3)], spec)
    return (data, *split_holdout(features, spec))


@pytest.mark.parametrize("kind", ["lightgbm", "torch", "sklearn"])
def test_each_kind_fits_and_predicts_positive_class_probabilities(kind: str, cancer: tuple[dict[str, Any], Any, Any]) -> None:
    from kiln.evaluation import score
    from kiln.spec import PipelineSpec
    from kiln.trainers import trainer_for

    data, train, holdout = cancer
    params = PARAMS[kind] | ({"epochs": 30} if kind == "torch" else {})
    spec = PipelineSpec.model_validate(data | {"trainer": {"kind": kind, "params": params}})
    fitted = trainer_for(spec).fit(train)
    scores = fitted.predictor.predict(holdout)
    assert scores.shape == (holdout.height,) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0.01
    assert score("roc_auc", holdout[spec.target].to_numpy(), scores) > 0.95  # malignant vs benign separates well
    assert fitted.params and fitted.predictor.flavor


def test_sklearn_estimator_without_missing_value_support_gets_an_imputer(frames: tuple[Any, Any]) -> None:
    from kiln.trainers import trainer_for

    train, holdout = frames
    assert holdout["customer_age"].null_count() > 0  # the fraud features have nulls
    spec = _spec("sklearn", {"estimator": "sklearn.neighbors.KNeighborsClassifier", "params": {"n_neighbors": 15}})
    fitted = trainer_for(spec).fit(train)
    assert [name for name, _ in fitted.model.steps] == ["simpleimputer", "kneighborsclassifier"]
    assert np.isfinite(fitted.predictor.predict(holdout)).all()
    native = trainer_for(_spec("sklearn")).fit(train)  # HistGradientBoosting takes NaN itself
    assert type(native.model).__name__ == "HistGradientBoostingClassifier" and native.model.random_state == 0


def test_sklearn_regressor_predicts_values() -> None:
    from kiln.evaluation import split_holdout
    from kiln.features import feature_table
    from kiln.trainers import trainer_for
    from platform_defs.simulators.fraud import generate_day

    spec = _spec("sklearn", {"estimator": "sklearn.ensemble.RandomForestRegressor", "params": {"n_estimators": 10}},
                 {"task": "regression", "target": "amount", "evaluation": {"metric": "rmse"}, "validation": {},
                  "features": {"passthrough": ["txns_last_24h", "customer_age"], "categorical": ["merchant_category"]}})
    _, features = feature_table([generate_day(date(2026, 1, 1), 1000, 7)], spec)
    train, holdout = split_holdout(features, spec)
    fitted = trainer_for(spec).fit(train)
    predictions = fitted.predictor.predict(holdout)
    assert predictions.max() > 1.0  # amounts, not probabilities
    measure, values = fitted.predictor.importances()  # type: ignore[misc]
    assert measure == "impurity decrease" and len(values) == len(spec.feature_names)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway MLflow registry (SQLite); the process-wide tracking URI is restored afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before)
    mlflow.set_registry_uri(before)


@pytest.mark.parametrize("kind", ["lightgbm", "torch", "sklearn"])
def test_logged_model_loads_back_by_its_flavor_with_the_same_predictions(kind: str, frames: tuple[Any, Any], registry: str) -> None:
    import mlflow

    from kiln.trainers import flavor_of, kind_of_flavor, load_predictor, model_dir, trainer_for

    train, holdout = frames
    spec = _spec(kind)
    trainer = trainer_for(spec)
    fitted = trainer.fit(train)
    with mlflow.start_run():
        info = trainer.log_model(fitted, holdout.head(5), registered_model_name=f"t_{kind}", tags={"kiln_pipeline": "t"})
    uri = f"models:/t_{kind}/{info.registered_model_version}"
    assert kind_of_flavor(flavor_of(model_dir(uri))) == kind
    loaded = load_predictor(uri, spec, num_threads=None)
    assert loaded.flavor == fitted.predictor.flavor
    np.testing.assert_allclose(loaded.predict(holdout), fitted.predictor.predict(holdout), rtol=0, atol=1e-6)
