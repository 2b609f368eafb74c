"""Torch checkpoints live in the state store and resume in a new process: on S3 (a real S3 API, moto's server on
127.0.0.1) and in a local folder.

A training runs in a subprocess that is SIGKILLed once the ``latest`` pointer names epoch ``STOP_AFTER`` (it is held in
its ``on_epoch`` hook of the next epoch, before that epoch's checkpoint is written, so the pointer cannot move on).
A torn object for the next epoch is planted with no pointer to it; a fresh Session in this process must resume from
``STOP_AFTER``, ignore the torn object, and end with the same weights as a training that never stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, free_port

SPEC_FILE = REPO / "platform_defs" / "pipelines" / "breast_cancer" / "defs.yaml"
PIPELINE = "breast_cancer"
EPOCHS = 6
STOP_AFTER = 2  # the last epoch whose checkpoint the killed process committed
ROWS = 200
VERSION = "fv-ckpt-test"
RELATIVE = f"checkpoints/{PIPELINE}"
DEADLINE_S = 180.0  # against a hang only: the killed process commits epoch STOP_AFTER within seconds

CHILD = """
import sys, time
from pathlib import Path
import polars as pl
from kiln.spec import load_spec
from kiln.trainers import trainer_for
from kiln.trainers.base import Session, state_location

spec_file, frame_file, root, relative, version, stop_after = sys.argv[1:7]
spec = load_spec(Path(spec_file))
train = pl.read_parquet(frame_file)

def hold(epoch, metrics):
    if epoch == int(stop_after) + 1:  # epoch stop_after is committed; this one's checkpoint is never written
        print("holding", flush=True)
        time.sleep(3600)

trainer_for(spec).fit(train, Session(features_version=version, checkpoint_dir=state_location(root, relative), on_epoch=hold,
                                     log=lambda m: print(m, flush=True)))
print("finished", flush=True)
"""


class S3:
    """A moto S3 server on 127.0.0.1 with one bucket; the endpoint is handed to Kiln through ``KILN_S3_ENDPOINT_URL``."""

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.url = f"http://127.0.0.1:{free_port()}"
        self.bucket = f"kiln-{uuid.uuid4().hex[:12]}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]), verbose=False)
        self.server.start()
        self.client = boto3.client("s3", endpoint_url=self.url)
        self.client.create_bucket(Bucket=self.bucket)
        self.stem = ""  # the training's checkpoint name stem, set by the test

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/state"

    def names(self) -> set[str]:
        """The object names in the checkpoint folder, listed with boto3 (not with the code under test)."""
        prefix = f"state/{RELATIVE}/"
        found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"][len(prefix):] for o in found}

    def get(self, name: str) -> bytes | None:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=f"state/{RELATIVE}/{name}")["Body"].read()
            return body
        except self.client.exceptions.NoSuchKey:
            return None

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"state/{RELATIVE}/{name}", Body=data)


class Folder:
    """The same three operations on a local state root."""

    def __init__(self, root: Path) -> None:
        self.folder = root / RELATIVE
        self.root = str(root)
        self.stem = ""

    def names(self) -> set[str]:
        return set(os.listdir(self.folder)) if self.folder.is_dir() else set()

    def get(self, name: str) -> bytes | None:
        path = self.folder / name
        return path.read_bytes() if path.exists() else None

    def put(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The breast_cancer spec (few epochs, small MLP), a small featurized frame, and an uninterrupted training on it."""
    import polars as pl

    from kiln.features import feature_columns, feature_table
    from kiln.spec import load_spec, spec_data
    from kiln.trainers import trainer_for
    from kiln.trainers.base import Session
    from platform_defs.simulators.breast_cancer import generate_snapshot

    folder = tmp_path_factory.mktemp("torch_ckpt")
    data = spec_data(SPEC_FILE)
    data["trainer"]["params"] |= {"epochs": EPOCHS, "patience": EPOCHS, "hidden": [16], "batch_size": 16, "dropout": 0.1, "seed": 7}
    spec_file = folder / f"{PIPELINE}.yaml"
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(spec_file)
    _, train = feature_table([generate_snapshot(date(2026, 1, 1), ROWS, 3)], spec)
    frame_file = folder / "train.parquet"
    train.write_parquet(frame_file)
    train = pl.read_parquet(frame_file)
    full = trainer_for(spec).fit(train, Session(features_version=VERSION))  # no checkpoint folder: never stops, never resumes
    assert full.training["start_epoch"] == 0 and full.training["epochs_run"] == EPOCHS and full.checkpoint is None
    return {"spec": spec, "spec_file": spec_file, "frame_file": frame_file, "train": train, "full": full,
            "names": feature_columns(spec, train)}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = S3()
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", server.url)
    try:
        yield server
    finally:
        server.server.stop()


def pointed_epoch(store: S3 | Folder) -> int:
    """The epoch the ``latest`` pointer names (-1 without one), read from the store's raw bytes."""
    import json

    raw = store.get(f"{store.stem}.latest.json")
    return -1 if raw is None else int(json.loads(raw)["epoch"])


def kill_after_commit(setup: dict[str, Any], store: S3 | Folder, log: Path) -> None:
    """Run the training in a subprocess and SIGKILL it while it is held in epoch STOP_AFTER + 1 (its pointer names STOP_AFTER)."""
    args = [str(setup["spec_file"]), str(setup["frame_file"]), store.root, RELATIVE, VERSION, str(STOP_AFTER)]
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=dict(os.environ), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None and "holding" not in log.read_text():
            time.sleep(0.05)  # held in epoch STOP_AFTER + 1: epoch STOP_AFTER's save (pointer, cleanup) is complete
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before it was killed:\n{log.read_text()[-3000:]}"
        assert pointed_epoch(store) == STOP_AFTER, f"no pointer for epoch {STOP_AFTER} in {DEADLINE_S}s:\n{log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in log.read_text()


def check_resume(setup: dict[str, Any], store: S3 | Folder, tmp_path: Path) -> None:
    from kiln.trainers import trainer_for
    from kiln.trainers.base import Session, state_location
    from kiln.trainers.torch import checkpoint_store

    spec = setup["spec"]
    stem = checkpoint_store(Path("."), spec, VERSION, setup["names"]).stem
    store.stem = stem
    pointer, committed, torn = f"{stem}.latest.json", f"{stem}.epoch-{STOP_AFTER:06d}.pt", f"{stem}.epoch-{STOP_AFTER + 1:06d}.pt"

    kill_after_commit(setup, store, tmp_path / "killed.log")
    assert store.names() == {pointer, committed}  # earlier epochs' objects are dropped once the pointer moves on
    whole = store.get(committed)
    assert whole is not None and len(whole) > 1000
    store.put(torn, whole[: len(whole) // 2])  # a writer that died mid-object, before any pointer named it

    messages: list[str] = []
    session = Session(features_version=VERSION, checkpoint_dir=state_location(store.root, RELATIVE), log=messages.append)
    fitted = trainer_for(spec).fit(setup["train"], session)
    assert fitted.training["resumed_from_epoch"] == STOP_AFTER
    assert fitted.training["start_epoch"] == STOP_AFTER + 1
    assert fitted.training["epochs_run"] == EPOCHS - STOP_AFTER - 1
    assert fitted.training["last_epoch"] == EPOCHS - 1
    assert any(f"after epoch {STOP_AFTER}" in m for m in messages), messages
    # The resumed training equals one that never stopped: model, optimizer and RNG state all came back.
    full = setup["full"]
    assert fitted.training["best_epoch"] == full.training["best_epoch"]
    resumed_state, full_state = fitted.model.state_dict(), full.model.state_dict()
    assert resumed_state.keys() == full_state.keys()
    for key in full_state:
        np.testing.assert_allclose(resumed_state[key].numpy(), full_state[key].numpy(), rtol=0, atol=1e-6, err_msg=key)
    predictions = fitted.predictor.predict(setup["train"])
    np.testing.assert_allclose(predictions, full.predictor.predict(setup["train"]), rtol=0, atol=1e-6)
    assert predictions.std() > 0.01  # a trained model, not a constant
    # The torn object was overwritten by the real epoch STOP_AFTER + 1 and dropped when the pointer moved past it.
    last = f"{stem}.epoch-{EPOCHS - 1:06d}.pt"
    assert store.names() == {pointer, last} and pointed_epoch(store) == EPOCHS - 1

    # Releasing after registration removes the pointer and every checkpoint object, also ones no pointer named.
    store.put(f"{stem}.epoch-{EPOCHS + 5:06d}.pt", b"orphan")
    assert fitted.checkpoint is not None and str(fitted.checkpoint).endswith(pointer)
    fitted.checkpoint.remove()
    assert store.names() == set()
    again = trainer_for(spec).fit(setup["train"], Session(features_version=VERSION,
                                                          checkpoint_dir=state_location(store.root, RELATIVE)))
    assert again.training["start_epoch"] == 0 and "resumed_from_epoch" not in again.training


def test_s3_checkpoint_resumes_in_a_new_process(setup: dict[str, Any], s3: S3, tmp_path: Path) -> None:
    check_resume(setup, s3, tmp_path)


def test_local_checkpoint_resumes_in_a_new_process(setup: dict[str, Any], tmp_path: Path) -> None:
    check_resume(setup, Folder(tmp_path / "state"), tmp_path)


def test_a_pointer_to_a_torn_or_foreign_object_is_not_resumed(setup: dict[str, Any], tmp_path: Path) -> None:
    import json

    from kiln.trainers.base import CheckpointStore

    folder = tmp_path / "ckpt"
    store = CheckpointStore(folder, "v-abc")
    store.save(4, b"x" * 100)
    assert store.latest() == (4, b"x" * 100)
    messages: list[str] = []
    (folder / "v-abc.epoch-000004.pt").write_bytes(b"x" * 50)  # the pointed-to object cut short
    assert store.latest(messages.append) is None and "do not match its pointer" in messages[-1]
    (folder / "v-abc.epoch-000004.pt").write_bytes(b"y" * 100)  # same size, other bytes
    assert store.latest(messages.append) is None
    (folder / "v-abc.latest.json").write_text(json.dumps({"object": "../elsewhere.pt", "epoch": 4}))
    assert store.latest(messages.append) is None and "not the object of epoch 4" in messages[-1]
    (folder / "v-abc.latest.json").write_text('{"object": ')  # a pointer cut short (a non-atomic writer)
    assert store.latest(messages.append) is None and "unreadable" in messages[-1]
    store.remove()
    assert not list(folder.iterdir())
