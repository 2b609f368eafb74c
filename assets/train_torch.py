"""`<p>/model` for ``trainer.kind: torch``: an MLP on standardised features, checkpointed every epoch and resumable.

CUDA when present (mixed precision: ``torch.autocast`` + ``GradScaler``), else CPU (seeded, deterministic).
Early stopping on a validation split carved from the newest training rows. After every epoch the
metrics go to MLflow (``step=epoch``) and a checkpoint (model, optimizer, scaler, epoch, early-stopping
state, RNG states) is written atomically to ``<state root>/checkpoints/<p>/<features data version>-<config>.pt``;
a re-run after a crash resumes from it. The standardisation lives in the module's buffers, so the logged
model (``mlflow.pytorch.log_model``, torch.export ``pt2`` format) maps raw features to predictions by itself.

Only the model asset (and :mod:`assets.predictors`) import this module, so loading definitions never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    import polars as pl

    from resources.mlflow import MlflowResource
    from resources.storage import KilnStorage

CHECKPOINT_KIND = "checkpoints"
CHECKPOINT_FORMAT = 1


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


@dataclass
class FitResult:
    """A trained model (best epoch's weights, on CPU, eval mode) and how the training went."""

    model: StandardizedMLP
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
               "params": spec.trainer.torch_params.model_dump(mode="json"), "format": CHECKPOINT_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(storage: KilnStorage, spec: PipelineSpec, features_version: str, feature_names: list[str]) -> Path:
    """``<state root>/checkpoints/<p>/<features data version>-<config hash>.pt``."""
    return storage.state_dir(spec.name, CHECKPOINT_KIND) / f"{features_version}-{fingerprint(spec, features_version, feature_names)[:8]}.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a reader never sees half a checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path | None, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and was written for the same data and config, else None."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint or state.get("format") != CHECKPOINT_FORMAT:
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
    with np.errstate(all="ignore"):
        mean = np.nanmean(x, axis=0) if x.size else np.zeros(x.shape[1])
        scale = np.nanstd(x, axis=0) if x.size else np.ones(x.shape[1])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
    return mean, scale


def fit(x: np.ndarray, y: np.ndarray, spec: PipelineSpec, checkpoint: Path | None = None, checkpoint_id: str = "",
        on_epoch: Callable[[int, dict[str, float]], Any] | None = None, device: str | None = None,
        extra_state: dict[str, Any] | None = None, threads: int | None = None) -> FitResult:
    """Train on a float feature matrix (NaN = missing) and targets; resume from ``checkpoint`` when it matches ``checkpoint_id``.

    ``x`` rows are in time order: the newest ``val_fraction`` of them are the early-stopping validation split.
    ``extra_state`` is stored in every checkpoint (the MLflow run id, so a resumed run can name the crashed one).
    CPU training uses ``threads`` intra-op threads (default: the spec's ``trainer.resources.cpu``), restored afterwards.
    """
    from assets.champion import score

    params = spec.trainer.torch_params
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
        model = StandardizedMLP(x.shape[1], params.hidden, params.dropout, classification, mean, scale, target_mean, target_scale,
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
        resumed = load_checkpoint(checkpoint, checkpoint_id)
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
    from assets.model import matrix

    return np.ascontiguousarray(matrix(frame, spec), dtype=np.float32)


def predict_module(module: Any, x: np.ndarray) -> np.ndarray:
    """Run a (CPU) module on a float32 matrix; float64 predictions."""
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).double().numpy()


def train_and_register(context: Any, features: pl.DataFrame, spec: PipelineSpec, mlflow: MlflowResource,
                       storage: KilnStorage) -> dg.Output:
    """The body of `<p>/model` for a torch trainer: train (or resume), log, register; same tags and record as LightGBM."""
    import dagster as dg
    import mlflow as mlf
    from mlflow.entities import Metric
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from assets.champion import score, split_holdout
    from assets.model import _metrics
    from kiln.features import data_version, feature_columns

    train, holdout = split_holdout(features, spec)
    names = feature_columns(spec, train)
    version_of_data = data_version(features)
    ckpt = checkpoint_path(storage, spec, version_of_data, names)
    ckpt_id = fingerprint(spec, version_of_data, names)
    previous = load_checkpoint(ckpt, ckpt_id)
    experiment_id = mlflow.experiment_id(spec.name)
    client = mlflow.client()
    tags = {
        "dagster_run_id": context.run_id,
        "features_data_version": version_of_data,
        "kiln_pipeline": spec.name,
    }
    run_tags = dict(tags)
    if previous is not None:
        crashed = previous["extra"].get("mlflow_run_id")
        run_tags |= {"kiln.resumed_from_epoch": str(previous["epoch"]), "kiln.resumed_from_run": str(crashed)}
        if crashed:
            client.set_terminated(crashed, status="FAILED")  # the crashed run never ended by itself
        context.log.info(f"{spec.name}: resuming from checkpoint {ckpt.name} after epoch {previous['epoch']}")
    with mlf.start_run(experiment_id=experiment_id, tags=run_tags) as run:
        if previous is not None and previous["history"]:
            # The curve stays whole: epochs before the crash are copied from the checkpoint into this run.
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, int(h["epoch"]))
                                                       for h in previous["history"] for k, v in h.items() if k != "epoch"])
        params = spec.trainer.torch_params
        x = features_matrix(train, spec)
        y = train[spec.target].cast(float).to_numpy()
        result = fit(x, y, spec, checkpoint=ckpt, checkpoint_id=ckpt_id,
                     on_epoch=lambda epoch, metrics: mlf.log_metrics(metrics, step=epoch),
                     extra_state={"mlflow_run_id": run.info.run_id, "dagster_run_id": context.run_id})
        y_pred = predict_module(result.model, features_matrix(holdout, spec))
        y_true = holdout[spec.target].to_numpy()
        metrics = {m: score(m, y_true, y_pred) for m in _metrics(spec)}
        training: dict[str, Any] = {"start_epoch": result.start_epoch, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                    "last_epoch": result.last_epoch, "stopped_early": result.stopped_early, "device": result.device,
                    "mixed_precision": result.amp}
        mlf.log_params({**params.model_dump(mode="json"), "train_rows": train.height, "holdout_rows": holdout.height,
                        "device": result.device, "mixed_precision": result.amp,
                        "cpu_threads": cpu_threads(spec.trainer.resources.cpu) if result.device == "cpu" else None})
        mlf.log_metrics(metrics)
        mlf.set_tags({f"kiln.{k}": str(v) for k, v in training.items()})
        mlf.log_dict(spec.model_dump(mode="json", by_alias=True), "kiln/spec.json")
        example = features_matrix(holdout.head(5), spec)
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(names)))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))
        info = mlf.pytorch.log_model(
            result.model,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=spec.name,
            tags=tags,
            serialization_format="pt2",  # torch.export: loads without pickle and without Kiln's classes
            metadata={"feature_names": names, "kiln_trainer": "torch"},
            # Explicit requirements: MLflow's inference runs a subprocess that costs seconds per retrain.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlf.__version__}"],
        )
    version = str(info.registered_model_version)
    from assets.model import complete_registration

    record = complete_registration(mlflow, spec, version, run.info.run_id, context.run_id, metrics, version_of_data,
                                   train.height, holdout.height) | {"training": training}
    ckpt.unlink(missing_ok=True)  # registered: a later run on the same data trains afresh
    return dg.Output(
        record,
        metadata={
            "model_version": version,
            "mlflow_run_id": run.info.run_id,
            "features_data_version": version_of_data,
            **{f"metric/{k}": v for k, v in metrics.items()},
            "train_rows": train.height,
            "holdout_rows": holdout.height,
            **{f"training/{k}": v for k, v in training.items()},
            "checkpoint": str(ckpt),
        },
    )
