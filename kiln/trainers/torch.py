"""``trainer.kind: torch``: an MLP on standardised features, checkpointed every epoch and resumable.

CUDA when present (mixed precision: ``torch.autocast`` + ``GradScaler``), else CPU (seeded, deterministic).
Early stopping on a validation split carved from the newest training rows. After every epoch the
metrics go to the MLflow run (``step=epoch``) and a checkpoint (model, optimizer, scaler, epoch, early-stopping
state, RNG states) goes to the state store (a folder, or S3 in prod: each step runs in its own pod) as one whole object
``<state root>/checkpoints/<p>/<features data version>-<config>.epoch-<N>.pt``, committed by a ``.latest.json`` pointer
(:class:`kiln.trainers.base.CheckpointStore`, :func:`kiln.paths.checkpoints_dir`); a re-run after a crash, in any
process, resumes from the pointed-to one. The standardisation lives in the
module's buffers, so the logged model (``mlflow.pytorch.log_model``, torch.export ``pt2`` format) maps raw features
to predictions by itself.

torch is imported inside functions only (the MLP class is built on first use): the spec loader imports this module
for :class:`TorchParams` while Dagster definitions load.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator

from kiln.trainers.base import CheckpointStore, Fitted, Params, Session, Trainer

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    import torch
    from upath import UPath

    from kiln.spec import PipelineSpec

CHECKPOINT_FORMAT = 1


class TorchParams(Params):
    """``trainer.params`` of a torch trainer: an MLP on standardised features, early-stopped on a validation split."""

    epochs: int = Field(default=50, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(default=0.0, ge=0, lt=1)
    patience: int = Field(default=10, ge=1)
    min_delta: float = Field(default=0.0, ge=0)
    val_fraction: float = Field(default=0.15, gt=0, lt=0.9)
    pos_weight: float | None = Field(default=None, gt=0)
    seed: int = 0

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError(f"layer sizes must be >= 1, got {value}")
        return value


def torch_params(spec: PipelineSpec) -> TorchParams:
    """The validated parameters of a torch trainer (defaults filled in)."""
    return TorchParams.model_validate(spec.trainer.params)


@cache
def mlp_class() -> type[torch.nn.Module]:
    """The ``StandardizedMLP`` module class (defined on first use, so importing this module never imports torch)."""
    import torch
    from torch import nn

    class StandardizedMLP(nn.Module):
        """Raw feature matrix in, prediction out: numeric columns standardised (missing -> the training mean), categorical
        codes one-hot (unknown or missing -> all zeros), an MLP, then sigmoid (classification) or de-standardisation."""

        mean: torch.Tensor
        scale: torch.Tensor
        target_mean: torch.Tensor
        target_scale: torch.Tensor
        numeric_index: torch.Tensor
        codes: torch.Tensor

        def __init__(self, n_features: int, hidden: list[int], dropout: float, classification: bool,
                     mean: np.ndarray, scale: np.ndarray, target_mean: float = 0.0, target_scale: float = 1.0,
                     categorical: dict[int, int] | None = None) -> None:
            super().__init__()
            self.classification = classification
            self.categorical = sorted((categorical or {}).items())  # (column index, number of categories)
            numeric = [i for i in range(n_features) if i not in dict(self.categorical)]
            self.register_buffer("numeric_index", torch.tensor(numeric, dtype=torch.long))
            self.register_buffer("codes", torch.arange(max([n for _, n in self.categorical], default=1), dtype=torch.float32))
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
            self.register_buffer("target_mean", torch.tensor(float(target_mean)))
            self.register_buffer("target_scale", torch.tensor(float(target_scale)))
            layers: list[nn.Module] = []
            width = len(numeric) + sum(n for _, n in self.categorical)
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                if dropout:
                    layers.append(nn.Dropout(dropout))
                width = size
            layers.append(nn.Linear(width, 1))
            self.net = nn.Sequential(*layers)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            """The raw output the loss sees (before sigmoid / de-standardisation)."""
            x = x.to(self.mean.dtype)
            parts = [torch.nan_to_num((x.index_select(1, self.numeric_index) - self.mean) / self.scale, nan=0.0)]
            for column, size in self.categorical:
                parts.append((x[:, column : column + 1] == self.codes[:size]).to(x.dtype))
            return self.net(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).squeeze(-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.logits(x)
            if self.classification:
                return torch.sigmoid(out)
            return out * self.target_scale + self.target_mean

    return StandardizedMLP


@dataclass
class FitResult:
    """A trained model (best epoch's weights, on CPU, eval mode) and how the training went."""

    model: Any  # the StandardizedMLP
    device: str
    amp: bool
    start_epoch: int
    epochs_run: int
    best_epoch: int
    last_epoch: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples: int = 0


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU (or what the caller asks for)."""
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_threads(cpu: str) -> int:
    """Intra-op threads for a Kubernetes CPU quantity ('2', '1.5', '500m'): torch would otherwise use every core of the node."""
    value = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return max(1, int(value))


def fingerprint(spec: PipelineSpec, features_version: str, feature_names: list[str]) -> str:
    """What a checkpoint must match to be resumed: data version, features, task and trainer parameters."""
    payload = {"data": features_version, "features": feature_names, "task": spec.task, "target": spec.target,
               "params": torch_params(spec).model_dump(mode="json"), "format": CHECKPOINT_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_store(folder: Path | UPath, spec: PipelineSpec, features_version: str, feature_names: list[str]) -> CheckpointStore:
    """The checkpoints ``<folder>/<features data version>-<config hash>.*``; the folder is a state-store folder
    (:func:`kiln.trainers.base.state_location` of :func:`kiln.paths.checkpoints_dir`), local or on S3."""
    return CheckpointStore(folder, f"{features_version}-{fingerprint(spec, features_version, feature_names)[:8]}")


def save_checkpoint(state: dict[str, Any], store: CheckpointStore) -> None:
    """``torch.save`` to a local temporary file, then one atomic write of the whole object and of the pointer to it."""
    import torch

    with tempfile.TemporaryDirectory(prefix="kiln-ckpt-") as tmp:
        local = Path(tmp) / "checkpoint.pt"
        torch.save(state, local)
        payload = local.read_bytes()
    store.save(int(state["epoch"]), payload)


def load_checkpoint(store: CheckpointStore | None, expected_fingerprint: str,
                    log: Callable[[str], Any] = lambda message: None) -> dict[str, Any] | None:
    """The pointed-to checkpoint of ``store`` if there is a complete one written for the same data and config, else None."""
    if store is None:
        return None
    found = store.latest(log)
    if found is None:
        return None
    epoch, payload = found
    import torch

    with tempfile.TemporaryDirectory(prefix="kiln-ckpt-") as tmp:
        local = Path(tmp) / "checkpoint.pt"
        local.write_bytes(payload)
        state = torch.load(local, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint or state.get("format") != CHECKPOINT_FORMAT or state.get("epoch") != epoch:
        log(f"{store}: checkpoint of epoch {epoch} was written for other data, config or format; training from scratch")
        return None
    return state


def categorical_columns(spec: PipelineSpec) -> dict[int, int]:
    """Column index -> number of categories of the spec's categorical features (codes from ``compute_features``)."""
    return {i: len(spec.schema_[n].allowed or []) for i, n in enumerate(spec.feature_names) if n in spec.features.categorical}


def _split_validation(n: int, fraction: float, spec: PipelineSpec) -> int:
    cut = int(round(n * (1 - fraction)))
    if cut < 1 or cut >= n:
        raise ValueError(f"{spec.name}: {n} training rows are too few for a {fraction:.0%} validation split (trainer.params.val_fraction)")
    return cut


def _standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    with np.errstate(all="ignore"):
        mean = np.nanmean(x, axis=0) if x.size else np.zeros(x.shape[1])
        scale = np.nanstd(x, axis=0) if x.size else np.ones(x.shape[1])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
    return mean, scale


def fit(x: np.ndarray, y: np.ndarray, spec: PipelineSpec, checkpoint: CheckpointStore | None = None, checkpoint_id: str = "",
        on_epoch: Callable[[int, dict[str, float]], Any] | None = None, device: str | None = None,
        extra_state: dict[str, Any] | None = None, threads: int | None = None,
        resume: dict[str, Any] | None = None) -> FitResult:
    """Train on a float feature matrix (NaN = missing) and targets; resume from ``checkpoint`` when it matches ``checkpoint_id``.

    ``resume``: a checkpoint state the caller already loaded (:func:`load_checkpoint`), so it is not downloaded twice.

    ``x`` rows are in time order: the newest ``val_fraction`` of them are the early-stopping validation split.
    ``extra_state`` is stored in every checkpoint (the MLflow run id, so a resumed run can name the crashed one).
    CPU training uses ``threads`` intra-op threads (default: the spec's ``trainer.resources.cpu``), restored afterwards.
    """
    import numpy as np
    import torch
    from torch import nn

    from kiln.evaluation import score

    params = torch_params(spec)
    dev = pick_device(device)
    amp = dev.type == "cuda"
    classification = spec.task == "classification"
    cut = _split_validation(len(x), params.val_fraction, spec)
    x_train, y_train, x_val, y_val = x[:cut], y[:cut], x[cut:], y[cut:]
    categorical = categorical_columns(spec)
    mean, scale = _standardisation(x_train[:, [i for i in range(x.shape[1]) if i not in categorical]])
    target_mean, target_scale = (0.0, 1.0) if classification else (float(np.mean(y_train)), float(np.std(y_train) or 1.0))

    deterministic_before, threads_before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads or cpu_threads(spec.trainer.resources.cpu))
    try:
        torch.manual_seed(params.seed)
        model: Any = mlp_class()(x.shape[1], params.hidden, params.dropout, classification, mean, scale, target_mean, target_scale,
                                categorical).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        shuffle = torch.Generator().manual_seed(params.seed)
        if classification:
            pos_weight = torch.tensor(params.pos_weight, device=dev) if params.pos_weight else None
            loss_fn: nn.Module = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        else:
            loss_fn = nn.MSELoss()
        xt = torch.as_tensor(x_train, dtype=torch.float32, device=dev)
        yt = torch.as_tensor((y_train - target_mean) / target_scale, dtype=torch.float32, device=dev)
        xv = torch.as_tensor(x_val, dtype=torch.float32, device=dev)
        yv = torch.as_tensor((y_val - target_mean) / target_scale, dtype=torch.float32, device=dev)

        start_epoch, best_loss, best_epoch, bad_epochs, done = 0, math.inf, -1, 0, False
        best_state: dict[str, torch.Tensor] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history: list[dict[str, float]] = []
        resumed = resume if resume is not None else load_checkpoint(checkpoint, checkpoint_id)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            if amp and resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            shuffle.set_state(resumed["rng"]["shuffle"])
            torch.set_rng_state(resumed["rng"]["torch"])
            if dev.type == "cuda" and resumed["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])
            best_state, best_loss, best_epoch = resumed["best_state"], resumed["best_loss"], resumed["best_epoch"]
            bad_epochs, history, done = resumed["bad_epochs"], list(resumed["history"]), resumed["done"]
            start_epoch = resumed["epoch"] + 1

        started = time.perf_counter()
        samples, epochs_run = 0, 0
        for epoch in range(start_epoch, params.epochs):
            if done:
                break
            epochs_run += 1
            model.train()
            order = torch.randperm(len(xt), generator=shuffle).to(dev)
            total, seen = torch.zeros((), device=dev), 0  # summed on the device: no host sync per step
            for i in range(0, len(order), params.batch_size):
                idx = order[i : i + params.batch_size]
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
                    out = model.logits(xt[idx])
                loss = loss_fn(out.float(), yt[idx])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += loss.detach() * len(idx)
                seen += len(idx)
            samples += seen
            model.eval()
            with torch.no_grad():
                val_out = model.logits(xv).float()
                val_loss = float(loss_fn(val_out, yv))
                val_pred = (torch.sigmoid(val_out) if classification else val_out * target_scale + target_mean).cpu().double().numpy()
            metrics = {"train_loss": float(total) / max(seen, 1), "val_loss": val_loss}
            try:
                metrics[f"val_{spec.evaluation.metric}"] = score(spec.evaluation.metric, y_val, val_pred)
            except ValueError:
                pass  # e.g. a validation split with one class: the loss still drives early stopping
            if val_loss < best_loss - params.min_delta:
                best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            done = bad_epochs >= params.patience or epoch == params.epochs - 1
            metrics |= {"best_val_loss": best_loss, "bad_epochs": float(bad_epochs)}
            history.append({"epoch": float(epoch), **metrics})
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if checkpoint is not None:
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "fingerprint": checkpoint_id, "epoch": epoch, "done": done,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if amp else {},
                    "rng": {"shuffle": shuffle.get_state(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else []},
                    "best_state": best_state, "best_loss": best_loss, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "history": history, "extra": dict(extra_state or {}),
                }, checkpoint)
        seconds = time.perf_counter() - started
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    last = int(history[-1]["epoch"]) if history else -1
    return FitResult(model=model, device=dev.type, amp=amp, start_epoch=start_epoch, epochs_run=epochs_run, best_epoch=best_epoch,
                     last_epoch=last, stopped_early=last < params.epochs - 1, history=history, train_seconds=seconds,
                     train_samples=samples)


def features_matrix(frame: pl.DataFrame, spec: PipelineSpec) -> np.ndarray:
    """The float32 model input for featurized rows (the spec's feature order, NaN for missing)."""
    import numpy as np

    from kiln.trainers.lightgbm import matrix

    return np.ascontiguousarray(matrix(frame, spec), dtype=np.float32)


def predict_module(module: Any, x: np.ndarray) -> np.ndarray:
    """Run a (CPU) module on a float32 matrix; float64 predictions."""
    import numpy as np
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).double().numpy()  # type: ignore[no-any-return]


class TorchPredictor:
    """A torch module that maps the raw float32 feature matrix to predictions (standardisation inside), on CPU."""

    flavor = "pytorch"

    def __init__(self, module: Any, spec: PipelineSpec) -> None:
        self.module, self.spec = module, spec

    def predict(self, features: pl.DataFrame) -> np.ndarray:
        return predict_module(self.module, features_matrix(features, self.spec))

    def importances(self) -> tuple[str, np.ndarray] | None:
        return None


class TorchTrainer(Trainer):
    """An MLP (PyTorch), checkpointed every epoch and resumed after a crash."""

    Params: ClassVar[type[Params]] = TorchParams
    flavor: ClassVar[str] = "pytorch"

    def check(self) -> None:
        """torch is an extra (`kiln[torch]`): say so before training rather than fail deep inside it."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ValueError("kind: torch needs PyTorch, which is not installed: pip install 'kiln[torch]' (make install does)")

    def fit(self, train: pl.DataFrame, session: Session | None = None) -> Fitted:
        """Train (or resume from the session's checkpoint folder); epochs are logged to the session's MLflow run."""
        from kiln.features import feature_columns

        session = session or Session()
        spec = self.spec
        names = feature_columns(spec, train)
        ckpt_id = fingerprint(spec, session.features_version, names)
        ckpt = checkpoint_store(session.checkpoint_dir, spec, session.features_version, names) if session.checkpoint_dir else None
        previous = load_checkpoint(ckpt, ckpt_id, session.log)
        log_steps = _step_logger(session.mlflow_run_id)
        if previous is not None:
            session.log(f"{spec.name}: resuming from checkpoint {ckpt} after epoch {previous['epoch']}")
            _mark_resumed(session.mlflow_run_id, previous)
            log_steps([(int(h["epoch"]), {k: v for k, v in h.items() if k != "epoch"}) for h in previous["history"]])

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            log_steps([(epoch, metrics)])
            if session.on_epoch is not None:
                session.on_epoch(epoch, metrics)

        result = fit(features_matrix(train, spec), train[spec.target].cast(float).to_numpy(), spec, checkpoint=ckpt,
                     checkpoint_id=ckpt_id, on_epoch=on_epoch, resume=previous,
                     extra_state={"mlflow_run_id": session.mlflow_run_id, "dagster_run_id": session.dagster_run_id})
        training: dict[str, Any] = {"start_epoch": result.start_epoch, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                                    "last_epoch": result.last_epoch, "stopped_early": result.stopped_early, "device": result.device,
                                    "mixed_precision": result.amp}
        if previous is not None:
            training["resumed_from_epoch"] = int(previous["epoch"])
        params = {**self.params.model_dump(mode="json"), "device": result.device, "mixed_precision": result.amp,
                  "cpu_threads": cpu_threads(spec.trainer.resources.cpu) if result.device == "cpu" else None}
        return Fitted(model=result.model, predictor=TorchPredictor(result.model, spec), params=params, training=training,
                      checkpoint=ckpt)

    def log_model(self, fitted: Fitted, example: pl.DataFrame, registered_model_name: str, tags: dict[str, str]) -> Any:
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        from kiln.features import feature_columns

        names = feature_columns(self.spec, example)
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(names)))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))
        return mlflow.pytorch.log_model(
            fitted.model,
            name="model",
            signature=signature,
            input_example=features_matrix(example, self.spec),
            registered_model_name=registered_model_name,
            tags=tags,
            serialization_format="pt2",  # torch.export: loads without pickle and without Kiln's classes
            metadata={"feature_names": names, "kiln_trainer": self.spec.trainer.kind},
            # Explicit requirements: MLflow's inference runs a subprocess that costs seconds per retrain.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )

    @classmethod
    def load(cls, folder: Path, spec: PipelineSpec, num_threads: int | None = 0) -> TorchPredictor:
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

    @classmethod
    def serving_packages(cls, spec: PipelineSpec) -> list[str]:
        from importlib.metadata import version

        # The wheel's local tag (+cpu, +cu128) names an index, not a version pip resolves from PyPI.
        return [f"torch=={version('torch').split('+')[0]}", "mlflow>=3,<4"]  # mlflow.pytorch loads models saved without pt2

    @classmethod
    def wants_gpu(cls, spec: PipelineSpec) -> bool:
        return spec.trainer.resources.gpu > 0


def _step_logger(run_id: str | None) -> Callable[[list[tuple[int, dict[str, float]]]], None]:
    """Log (epoch, metrics) pairs to an MLflow run as metric history (a no-op without a run)."""
    if run_id is None:
        return lambda steps: None
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()

    def log(steps: list[tuple[int, dict[str, float]]]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in steps for k, v in values.items()]
        if metrics:
            client.log_batch(run_id, metrics=metrics)

    return log


def _mark_resumed(run_id: str | None, previous: dict[str, Any]) -> None:
    """Tag the run with where it resumed from, and end the crashed run (it never ended by itself) as FAILED."""
    if run_id is None:
        return
    import mlflow

    from kiln.paths import RESUMED_FROM_EPOCH_TAG, RESUMED_FROM_RUN_TAG

    client = mlflow.MlflowClient()
    crashed = previous["extra"].get("mlflow_run_id")
    client.set_tag(run_id, RESUMED_FROM_EPOCH_TAG, str(previous["epoch"]))
    client.set_tag(run_id, RESUMED_FROM_RUN_TAG, str(crashed))
    if crashed:
        client.set_terminated(crashed, status="FAILED")
