"""What every trainer kind implements: its params model, fit, MLflow logging and loading, and its serving packages.

A trainer module keeps its heavy imports (lightgbm, torch, sklearn, mlflow, numpy, polars) inside functions: the spec
loader validates ``trainer.params`` against :attr:`Trainer.Params` while Dagster definitions load.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    from upath import UPath

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


def state_location(state_root: str, relative: str) -> Path | UPath:
    """A folder of the state store: a Path under a local root, an S3 UPath (endpoint from :mod:`kiln.settings`) under
    ``s3://bucket/prefix``, so what one pod writes there a retry pod reads."""
    from kiln.state import state_upath

    return state_upath(state_root) / relative


class CheckpointStore:
    """The checkpoints of one training in a state-store folder (local or S3), committed by a pointer.

    Each checkpoint is one whole object ``<stem>.epoch-<NNNNNN>.pt`` (one PUT on S3, a rename locally); after it,
    ``<stem>.latest.json`` is rewritten (atomically too) to name it with its size and SHA-256. A reader only takes the
    pointed-to object, and only when its bytes match: an object of a writer that died mid-epoch (or mid-upload) has no
    pointer and is never resumed. Once the pointer moves on, the previous object is deleted.
    """

    def __init__(self, folder: Path | UPath, stem: str) -> None:
        self.folder, self.stem = folder, stem
        self.current: str | None = None  # the object the pointer names, as far as this process knows

    @property
    def pointer(self) -> Path | UPath:
        """The ``latest`` pointer (JSON: object, epoch, bytes, sha256)."""
        return self.folder / f"{self.stem}.latest.json"

    def object_name(self, epoch: int) -> str:
        return f"{self.stem}.epoch-{epoch:06d}.pt"

    def save(self, epoch: int, payload: bytes) -> None:
        """Write the checkpoint of ``epoch`` whole, then point ``latest`` at it, then drop the previous one."""
        from kiln.state import write_atomic

        name = self.object_name(epoch)
        write_atomic(self.folder / name, payload)
        pointer = {"object": name, "epoch": epoch, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        write_atomic(self.pointer, json.dumps(pointer, sort_keys=True))
        previous, self.current = self.current, name
        if previous is not None and previous != name:
            (self.folder / previous).unlink(missing_ok=True)

    def latest(self, log: Callable[[str], Any] = lambda message: None) -> tuple[int, bytes] | None:
        """(epoch, bytes) of the pointed-to checkpoint; None without a pointer or when its object is missing or differs."""
        try:
            pointer = json.loads(self.pointer.read_bytes())
            name, epoch = str(pointer["object"]), int(pointer["epoch"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log(f"{self.pointer}: unreadable checkpoint pointer ({exc}); training from scratch")
            return None
        if name != self.object_name(epoch):
            log(f"{self.pointer}: names {name!r}, not the object of epoch {epoch}; training from scratch")
            return None
        try:
            payload = (self.folder / name).read_bytes()
        except FileNotFoundError:
            log(f"{self.pointer}: checkpoint {name} is gone; training from scratch")
            return None
        if len(payload) != pointer.get("bytes") or hashlib.sha256(payload).hexdigest() != pointer.get("sha256"):
            log(f"{self.folder / name}: {len(payload)} bytes that do not match its pointer; training from scratch")
            return None
        self.current = name
        return epoch, payload

    def remove(self) -> None:
        """Delete the pointer, then every checkpoint object of this training (also ones no pointer ever named)."""
        self.pointer.unlink(missing_ok=True)
        try:
            names = [str(entry.name) for entry in self.folder.iterdir()]
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(f"{self.stem}.epoch-") and name.endswith(".pt"):
                (self.folder / name).unlink(missing_ok=True)
        self.current = None

    def __str__(self) -> str:
        return str(self.pointer)


@dataclass
class Session:
    """Where a fit runs. Without an MLflow run or a checkpoint folder a trainer simply fits (unit tests, previews).

    ``checkpoint_dir`` is a state-store folder (:func:`state_location`), so a retry in another pod resumes.
    ``on_epoch(epoch, metrics)``, when set, is called after each epoch is scored and before its checkpoint is written
    (progress reporting; a test stops a training there)."""

    features_version: str = ""
    dagster_run_id: str = ""
    mlflow_run_id: str | None = None
    checkpoint_dir: Path | UPath | None = None
    log: Callable[[str], Any] = lambda message: None
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None


@dataclass
class Fitted:
    """A trained model and how the training went."""

    model: Any  # the native object: a LightGBM booster, a torch module, a scikit-learn estimator
    predictor: Predictor
    params: dict[str, Any]  # logged as the MLflow run's params
    training: dict[str, Any] = field(default_factory=dict)  # facts (epochs, device): run tags `kiln.<k>`, the record's "training"
    checkpoint: CheckpointStore | None = None  # removed once the model version is registered


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
