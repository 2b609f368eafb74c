"""The state store (:mod:`kiln.state`) and the drift objects kept in it (:mod:`kiln.windows`) behave the same on a local
folder and on S3: the steps, the sensors and `kiln status` run in different pods in prod and share only this store.

The S3 case runs against a real S3 API (moto's server on 127.0.0.1), as tests/test_predlog.py does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln import paths
from kiln.state import list_keys, read_json, state_path, time_key, write_json
from kiln.windows import (
    last_drift_retrain_at,
    last_retrain_decision,
    last_window_until,
    load_decisions,
    load_windows,
    read_new_windows,
    record_decisions,
    record_retrain_decision,
    store_window,
)
from tests.conftest import free_port


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this module; yields its URL."""
    import boto3  # noqa: F401  (moto's server needs it; fail here, clearly, when it is missing)
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["folder", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty state root: a local folder, or a prefix of a new bucket on the moto server."""
    if request.param == "folder":
        return str(tmp_path / "state")
    import boto3

    url = request.getfixturevalue("s3_server")
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", url)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/state"


def test_state_path_is_a_plain_path_locally_and_a_upath_on_s3(root: str) -> None:
    path = state_path(root, paths.last_decision_file("p"))
    if root.startswith("s3://"):
        assert getattr(path, "protocol", None) == "s3" and str(path).endswith("/state/drift/p/last_decision.json")
    else:
        assert type(path) is type(Path(root)) and path == Path(root) / "drift" / "p" / "last_decision.json"


def test_json_objects_are_written_whole_and_read_back(root: str) -> None:
    path = state_path(root, paths.realized_file("p"))
    assert read_json(path) is None
    write_json(path, {"windows": {"w": {"rows": 3}}, "updated_at": 1.5})
    write_json(path, {"windows": {}, "updated_at": 2.5})  # replaced, not appended to
    assert read_json(path) == {"windows": {}, "updated_at": 2.5}


def test_list_keys_sorts_strictly_after_the_cursor_and_skips_unfinished_writes(root: str) -> None:
    folder = state_path(root, "some/folder")
    assert list_keys(folder) == []
    for name in ("b.json", "a.json", "c.json", "d.json.tmp"):
        write_json(folder / name, name)
    assert list_keys(folder) == ["a.json", "b.json", "c.json"]
    assert list_keys(folder, "a.json") == ["b.json", "c.json"]
    assert list_keys(folder, "b") == ["b.json", "c.json"]  # a cursor need not be a stored name
    assert list_keys(folder, "c.json") == []


def test_time_keys_sort_in_time_order_and_differ_by_content() -> None:
    times = [0.0, 9.999999, 10.0, 1_767_261_600.25, 1_767_261_600.5]
    keys = [time_key(t, "x") for t in times]
    assert keys == sorted(keys) and all(len(k) == 17 + 1 + 8 for k in keys)
    assert keys[3].startswith("1767261600.250000-")
    assert time_key(5.0, "one") != time_key(5.0, "two") and time_key(5.0, "one") == time_key(5.0, "one")
    with pytest.raises(ValueError, match="does not fit"):
        time_key(-1.0, "x")


def window(name: str, until: float) -> dict[str, Any]:
    return {"window_id": name, "since": until - 1, "until": until, "counts": {"n": 10}}


def test_the_window_cursor_reads_each_window_once_in_time_order(root: str) -> None:
    assert read_new_windows(root, "p", None) == ([], None) and last_window_until(root, "p") == 0.0
    first = store_window(root, "p", window("w1", 1_767_261_600.0))
    store_window(root, "p", window("w0", 1_767_261_000.0))  # an earlier window stored later sorts before it
    new, cursor = read_new_windows(root, "p", None)
    assert [w["window_id"] for w in new] == ["w0", "w1"] and cursor == first
    assert read_new_windows(root, "p", cursor) == ([], first)  # a tick with nothing new reads no window
    third = store_window(root, "p", window("w2", 1_767_262_200.0))
    fourth = store_window(root, "p", window("w3", 1_767_262_800.0))
    new, cursor2 = read_new_windows(root, "p", cursor)
    assert [w["window_id"] for w in new] == ["w2", "w3"] and cursor2 == fourth and third < fourth
    assert last_window_until(root, "p") == 1_767_262_800.0
    assert [w["window_id"] for w in load_windows(root, "p", 2)] == ["w2", "w3"]
    assert [w["window_id"] for w in load_windows(root, "p")] == ["w0", "w1", "w2", "w3"]
    assert load_windows(root, "p", 0) == [] and load_windows(root, "other") == []


def test_decisions_are_one_object_per_tick_and_the_last_ones_are_kept(root: str) -> None:
    assert load_decisions(root, "p") == [] and last_retrain_decision(root, "p") is None
    assert last_drift_retrain_at(root, "p") is None

    def decided(name: str, action: str) -> dict[str, Any]:
        return {"window": name, "action": action, "n": 600, "max_score": 0.3, "share": 0.5, "streak": 1,
                "drifted_columns": ["a"], "scores": {"a": 0.3}}

    record_decisions(root, "p", [decided("w0", "wait"), decided("w1", "retrain")], {"action": "retrain", "decided_at": 100.0})
    record_decisions(root, "p", [decided("w2", "cooldown")], {"action": "cooldown", "decided_at": 160.0})
    history = load_decisions(root, "p")
    assert [(d["window"], d["action"], d["decided_at"]) for d in history] == [
        ("w0", "wait", 100.0), ("w1", "retrain", 100.0), ("w2", "cooldown", 160.0)]
    assert "scores" not in history[0]  # the history keeps the decision fields, not every column's score
    assert [d["window"] for d in load_decisions(root, "p", last_ticks=1)] == ["w2"]
    assert read_json(state_path(root, paths.last_decision_file("p"))) == {"action": "cooldown", "decided_at": 160.0}
    assert last_drift_retrain_at(root, "p") == 100.0
    assert len(list_keys(state_path(root, paths.decisions_dir("p")))) == 2

    record_retrain_decision(root, "p", {"decided_at": 170.0, "launch": False, "reason": "no new labeled data"})
    record_retrain_decision(root, "p", {"decided_at": 230.0, "launch": True, "reason": "drift"})
    assert last_retrain_decision(root, "p") == {"decided_at": 230.0, "launch": True, "reason": "drift"}
    assert len(list_keys(state_path(root, paths.retrain_decisions_dir("p")))) == 2
