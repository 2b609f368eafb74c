"""The trainer registry: every kind of model Kiln trains, listed once and imported only when used.

``trainer.kind`` in a spec names a row of :data:`TRAINERS`; its class (a :class:`kiln.trainers.base.Trainer`) owns the
kind's params model, fit, MLflow logging and loading, and serving packages. To add a kind, write one module with a
``Trainer`` subclass and add its row here; nothing else in Kiln names a trainer kind.

:func:`load_predictor` is the one way to load a registered model and predict with it, whatever trained it: the gate
(`<p>/champion`), the endpoint's smoke test and the BentoML service all call it, so offline and online predictions
come from the same code. The trainer is found by the MLflow flavor in the model's own ``MLmodel`` file, not by the
spec: a champion trained before a spec switched trainers still loads.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.spec import PipelineSpec
    from kiln.trainers.base import Params, Predictor, Trainer

# (kind, "module:Class"): one row per trainer, the first is the default kind.
TRAINERS: tuple[tuple[str, str], ...] = (
    ("lightgbm", "kiln.trainers.lightgbm:LightGBMTrainer"),
    ("torch", "kiln.trainers.torch:TorchTrainer"),
    ("sklearn", "kiln.trainers.sklearn:SklearnTrainer"),
)
DEFAULT_KIND = TRAINERS[0][0]


class UnknownTrainer(ValueError):
    """A trainer kind (or an MLflow flavor) that no registered trainer provides."""


def kinds() -> list[str]:
    """The registered trainer kinds, in table order."""
    return [name for name, _ in TRAINERS]


@cache
def trainer_class(kind: str) -> type[Trainer]:
    """The trainer class of a kind, its module imported on first use."""
    paths = dict(TRAINERS)
    if kind not in paths:
        raise UnknownTrainer(f"trainer.kind: {kind!r} is not one of {', '.join(kinds())}")
    module, _, name = paths[kind].partition(":")
    cls: type[Trainer] = getattr(import_module(module), name)
    return cls


def trainer_for(spec: PipelineSpec) -> Trainer:
    """The spec's trainer, its params validated (including checks that import the ML library)."""
    return trainer_class(spec.trainer.kind)(spec)


def params_model(kind: str) -> type[Params]:
    """The pydantic model of ``trainer.params`` for a kind."""
    return trainer_class(kind).Params


def params_error(exc: Exception, kind: str) -> str:
    """``params.<field>: <reason>`` for the first problem of a params validation error."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    item = exc.errors()[0]
    where = ".".join(str(p) for p in item["loc"])
    msg = f"unknown {kind} parameter" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
    return f"params.{where}: {msg}" if where else f"params: {msg}"


def validate_params(kind: str, params: dict[str, Any]) -> Params:
    """``trainer.params`` checked against the kind's params model; ``ValueError("params.<field>: <reason>")`` otherwise."""
    from pydantic import ValidationError

    try:
        return params_model(kind).model_validate(params)
    except ValidationError as exc:
        raise ValueError(params_error(exc, kind)) from None


def kind_of_flavor(flavor: str) -> str:
    """The trainer kind whose models are logged with this MLflow flavor."""
    for kind in kinds():
        if trainer_class(kind).flavor == flavor:
            return kind
    raise UnknownTrainer(f"MLflow flavor {flavor!r} is not logged by any Kiln trainer ({', '.join(kinds())})")


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
    """The flavor of a Kiln trainer named in an MLmodel file (its ``python_function`` flavor is MLflow's own)."""
    import yaml

    flavors = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("flavors", {})
    known = {trainer_class(kind).flavor for kind in kinds()}
    for name in flavors:
        if name in known:
            return str(name)
    raise UnknownTrainer(f"{folder / 'MLmodel'}: flavors {sorted(flavors)} include none Kiln serves ({', '.join(sorted(known))})")


def load_predictor(source: str, spec: PipelineSpec, num_threads: int | None = 0) -> Predictor:
    """A predictor from an MLflow model URI (``models:/<p>/<n>``) or a local folder holding one (e.g. a bento model)."""
    folder = model_dir(source)
    return trainer_class(kind_of_flavor(flavor_of(folder))).load(folder, spec, num_threads)
