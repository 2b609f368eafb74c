"""Prediction logs shipped as objects: :mod:`serving.predlog` writes them, :mod:`kiln.predlog` reads them.

The S3 cases run against a real S3 API (moto's server on 127.0.0.1), stopped and started again to make an outage.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prometheus_client import CollectorRegistry

from kiln.predlog import hour_cursor, list_log_objects, log_object_stats, object_key, parse_key, read_log_objects
from serving.predlog import PredictionShipper
from tests.conftest import free_port

PIPELINE = "fraud"
T0 = datetime(2026, 3, 1, 10, 15, tzinfo=UTC).timestamp()  # 2026-03-01 10:15 UTC
HOUR = 3600.0


class S3:
    """A moto S3 server on a fixed 127.0.0.1 port that a test can stop and start again (its buckets live on)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = f"kiln-{uuid.uuid4().hex[:12]}"
        self.server: Any = None
        self.made = False

    def start(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        if not self.made:
            boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=self.bucket)
            self.made = True

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/state"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A moto server, not started: the test starts it (some begin with the store down)."""
    server = S3()
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", server.url)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    try:
        yield server
    finally:
        server.stop()


def rows(start: int, count: int, logged_at: float) -> pl.DataFrame:
    """``count`` logged rows with ids from ``start``: request columns plus what the service adds."""
    ids = list(range(start, start + count))
    return pl.DataFrame({
        "id": ids,
        "amount": [i * 1.5 for i in ids],
        "merchant": [f"m{i % 7}" for i in ids],
        "_logged_at": [logged_at + i * 0.001 for i in range(count)],
        "_model_version": ["3"] * count,
        "_prediction": [(i % 100) / 100 for i in ids],
    })


def value(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name, {"pipeline": PIPELINE}) or 0.0


def wait_for(condition: Callable[[], bool], seconds: float = 15.0, what: str = "") -> None:
    """Poll until true; fail naming what never happened (a deadline against hangs, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"not within {seconds}s: {what}")


def shipper(root: str, spill: Path, registry: CollectorRegistry, **kwargs: Any) -> PredictionShipper:
    options: dict[str, Any] = {"flush_rows": 10_000, "flush_seconds": 60.0, "retry_initial": 0.1, "retry_max": 0.5}
    return PredictionShipper(root, PIPELINE, "pod-a", spill_dir=spill, registry=registry, **(options | kwargs))


def check_round_trip(root: str, spill: Path) -> None:
    """Three flushes over three hours and two days: time-ordered keys, the same rows back, footers that count them."""
    registry = CollectorRegistry()
    log = shipper(root, spill, registry)
    batches = [rows(0, 40, T0), rows(40, 25, T0 + HOUR), rows(65, 35, T0 + 14 * HOUR)]  # 10h, 11h, next day 00h
    for batch in batches:
        log.append(batch.head(10))
        log.append(batch.tail(batch.height - 10))
        assert log.flush()
    assert log.close()

    keys = list_log_objects(root, PIPELINE, None)
    assert [parse_key(k)[:2] for k in keys] == [("2026-03-01", "10"), ("2026-03-01", "11"), ("2026-03-02", "00")]
    seqs = [parse_key(k)[3] for k in keys]
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2] and keys == sorted(keys)
    assert list_log_objects(root, PIPELINE, keys[0]) == keys[1:]
    assert list_log_objects(root, PIPELINE, keys[-1]) == []
    assert list_log_objects(root, PIPELINE, hour_cursor(T0 + HOUR + 1800)) == keys[1:]  # from 11:45's hour on
    assert list_log_objects(root, PIPELINE, hour_cursor(T0 + 15 * HOUR)) == []

    back = read_log_objects(root, PIPELINE, keys)
    expected = pl.concat(batches)
    assert back.height == 100
    assert back.sort("id").equals(expected)

    stats = log_object_stats(root, PIPELINE, keys)
    assert [s["rows"] for s in stats] == [40, 25, 35]
    assert [s["seq"] for s in stats] == seqs and {s["replica"] for s in stats} == {"pod-a"}
    assert stats[1]["first_logged_at"] == pytest.approx(T0 + HOUR)
    assert stats[1]["last_logged_at"] == pytest.approx(T0 + HOUR + 0.024)
    assert value(registry, "kiln_prediction_log_rows_total") == 100
    assert value(registry, "kiln_prediction_log_flushed_rows_total") == 100
    assert value(registry, "kiln_prediction_log_dropped_rows_total") == 0


def test_rows_appended_across_flushes_land_in_time_ordered_s3_objects_and_read_back_equal(s3: S3, tmp_path: Path) -> None:
    s3.start()
    check_round_trip(s3.root, tmp_path / "spill")


def test_a_local_folder_root_works_the_same_and_hides_unfinished_writes(tmp_path: Path) -> None:
    root = str(tmp_path / "state")
    check_round_trip(root, tmp_path / "spill")
    hour = tmp_path / "state" / "predictions" / PIPELINE / "2026-03-01" / "10"
    (hour / "pod-b-0000000000000001.parquet.tmp").write_bytes(b"half an object")
    assert len(list_log_objects(root, PIPELINE, None)) == 3
    assert [p.name for p in tmp_path.rglob("*.tmp")] == ["pod-b-0000000000000001.parquet.tmp"]  # the shipper left none


def test_keys_sort_in_time_order() -> None:
    keys = [object_key(T0 + h * HOUR, "pod-a", 99 - h) for h in range(30)]  # seq falling while time rises
    assert sorted(keys) == keys
    assert object_key(T0, "pod-a", 7) == "2026-03-01/10/pod-a-0000000000000007.parquet"
    with pytest.raises(ValueError, match="replica name 'a/b'"):
        object_key(T0, "a/b", 1)


def test_a_full_buffer_flushes_by_size_and_an_old_one_by_time(s3: S3, tmp_path: Path) -> None:
    s3.start()
    registry = CollectorRegistry()
    by_size = shipper(s3.root, tmp_path / "spill-size", registry, flush_rows=100, flush_seconds=60.0)
    for i in range(5):
        by_size.append(rows(i * 50, 50, T0))  # 250 rows: two objects of 100, 50 rows left below the size
    wait_for(lambda: value(registry, "kiln_prediction_log_flushed_rows_total") == 200, what="two size flushes")
    keys = list_log_objects(s3.root, PIPELINE, None)
    assert [s["rows"] for s in log_object_stats(s3.root, PIPELINE, keys)] == [100, 100]
    assert by_size.buffered_rows == 50
    by_size.close()
    assert len(list_log_objects(s3.root, PIPELINE, None)) == 3  # close flushed the rest

    registry = CollectorRegistry()
    by_time = PredictionShipper(s3.root, "churn", "pod-t", flush_rows=10_000, flush_seconds=0.3,
                                spill_dir=tmp_path / "spill-time", registry=registry)
    by_time.append(rows(0, 30, T0 + 5 * HOUR))
    wait_for(lambda: len(list_log_objects(s3.root, "churn", None)) == 1, what="a time flush")
    keys = list_log_objects(s3.root, "churn", None)
    assert parse_key(keys[0])[:3] == ("2026-03-01", "15", "pod-t")
    assert read_log_objects(s3.root, "churn", keys).sort("id").equals(rows(0, 30, T0 + 5 * HOUR))
    by_time.close()


def test_an_s3_outage_spills_without_blocking_and_ships_everything_when_s3_is_back(s3: S3, tmp_path: Path) -> None:
    s3.start()
    registry = CollectorRegistry()
    spill = tmp_path / "spill"
    log = shipper(s3.root, spill, registry, flush_rows=50, flush_seconds=0.2)
    log.append(rows(0, 100, T0))
    wait_for(lambda: value(registry, "kiln_prediction_log_flushed_rows_total") == 100, what="flushes before the outage")

    s3.stop()
    slowest = 0.0
    for i in range(30):  # 300 rows while S3 is down
        started = time.perf_counter()
        log.append(rows(100 + i * 10, 10, T0 + 60 + i))
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.02)
    assert slowest < 0.5, f"append blocked {slowest:.3f}s while S3 was down"
    wait_for(lambda: log.spilled_rows == 300 and log.buffered_rows == 0, what="300 rows spilled")
    assert value(registry, "kiln_prediction_log_spilled_rows") == 300
    assert value(registry, "kiln_prediction_log_flush_errors_total") >= 1
    assert sum(1 for _ in spill.glob("*.parquet")) >= 1
    assert value(registry, "kiln_prediction_log_flushed_rows_total") == 100

    s3.start()
    wait_for(lambda: value(registry, "kiln_prediction_log_flushed_rows_total") == 400, what="spilled rows shipped")
    assert log.spilled_rows == 0 and value(registry, "kiln_prediction_log_spilled_rows") == 0
    assert not list(spill.glob("*.parquet"))
    log.close()
    appended = value(registry, "kiln_prediction_log_rows_total")
    flushed = value(registry, "kiln_prediction_log_flushed_rows_total")
    dropped = value(registry, "kiln_prediction_log_dropped_rows_total")
    assert (appended, flushed, dropped) == (400, 400, 0)
    keys = list_log_objects(s3.root, PIPELINE, None)
    back = read_log_objects(s3.root, PIPELINE, keys)
    assert sorted(back.get_column("id").to_list()) == list(range(400))
    seqs = [parse_key(k)[3] for k in keys]
    assert sorted(seqs) == list(range(seqs[0], seqs[0] + len(keys)))  # no seq lost or reused across the outage


def test_the_spill_bound_drops_the_oldest_rows_and_counts_them(s3: S3, tmp_path: Path) -> None:
    registry = CollectorRegistry()  # S3 is down from the start
    log = shipper(s3.root, tmp_path / "spill", registry, max_spill_rows=100)
    for i in range(10):
        log.append(rows(i * 30, 30, T0 + i))
        assert not log.flush()
    assert log.spilled_rows == 90  # three batches of 30 fit under 100
    assert value(registry, "kiln_prediction_log_dropped_rows_total") == 210
    assert value(registry, "kiln_prediction_log_flush_errors_total") >= 10

    s3.start()
    assert log.flush()
    log.close()
    back = read_log_objects(s3.root, PIPELINE, list_log_objects(s3.root, PIPELINE, None))
    assert sorted(back.get_column("id").to_list()) == list(range(210, 300))  # the newest rows were kept
    assert value(registry, "kiln_prediction_log_flushed_rows_total") + value(registry, "kiln_prediction_log_dropped_rows_total") == 300


def test_a_restarted_shipper_continues_the_seq_and_ships_what_the_last_one_spilled(s3: S3, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    first = shipper(s3.root, spill, CollectorRegistry())  # S3 down: both batches spill
    first.append(rows(0, 20, T0))
    first.flush()
    first.append(rows(20, 30, T0 + HOUR))
    assert not first.close(timeout=5.0)
    assert first.spilled_rows == 50
    start = first.next_seq - 2

    registry = CollectorRegistry()
    second = shipper(s3.root, spill, registry)
    assert second.spilled_rows == 50 and second.next_seq == start + 2
    assert value(registry, "kiln_prediction_log_spilled_rows") == 50
    second.append(rows(50, 10, T0 + 2 * HOUR))
    s3.start()
    assert second.flush()
    second.close()
    keys = list_log_objects(s3.root, PIPELINE, None)
    assert [parse_key(k)[1:] for k in keys] == [("10", "pod-a", start), ("11", "pod-a", start + 1), ("12", "pod-a", start + 2)]
    assert sorted(read_log_objects(s3.root, PIPELINE, keys).get_column("id").to_list()) == list(range(60))
    assert value(registry, "kiln_prediction_log_flushed_rows_total") == 60  # what it shipped, the earlier spill included

    third = shipper(s3.root, spill, CollectorRegistry())  # nothing spilled: the saved seq alone carries on
    assert third.next_seq == start + 3
    third.close()


def test_a_shipper_refuses_a_replica_name_that_would_break_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replica name 'pod/1'"):
        PredictionShipper(str(tmp_path), PIPELINE, "pod/1", spill_dir=tmp_path / "spill", registry=CollectorRegistry(), start=False)


def test_a_new_worker_ships_what_a_killed_sibling_spilled_under_its_keys(s3: S3, tmp_path: Path) -> None:
    """Workers log to ``<spill root>/<replica>-<pid>``; a worker whose process died leaves its spill files behind. A new
    worker with ``adopt_dead=True`` takes them over and ships them under the dead worker's keys; a live sibling's
    folder is left alone."""
    import subprocess
    import sys

    from serving.predlog import adopt_dead_spills

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(done.stdout)  # exited: no process has this pid now
    root = tmp_path / "spill"
    dead = PredictionShipper(s3.root, PIPELINE, f"pod-a-{dead_pid}", spill_dir=root / f"pod-a-{dead_pid}",
                             registry=CollectorRegistry(), flush_rows=10_000, flush_seconds=60.0, retry_initial=0.1,
                             retry_max=0.5)  # S3 is down: what it flushes is spilled
    dead.append(rows(0, 30, T0))
    dead.flush()
    dead.append(rows(30, 12, T0 + HOUR))
    dead.flush()
    assert dead.spilled_rows == 42
    dead.close(timeout=1.0)
    live = root / f"pod-a-{os.getppid()}"  # a running process: its folder is not taken
    live.mkdir()
    (live / "1.parquet").write_bytes(b"not ours")
    other_host = root / f"pod-b-{dead_pid}"  # another replica's folder (another pod's name): not ours to take
    other_host.mkdir()

    registry = CollectorRegistry()
    heir = PredictionShipper(s3.root, PIPELINE, f"pod-a-{os.getpid()}", spill_dir=root / f"pod-a-{os.getpid()}",
                             registry=registry, flush_rows=10_000, flush_seconds=60.0, retry_initial=0.1, retry_max=0.5,
                             adopt_dead=True)
    assert heir.spilled_rows == 42 and not (root / f"pod-a-{dead_pid}").exists()
    assert (live / "1.parquet").read_bytes() == b"not ours" and other_host.is_dir()
    s3.start()
    assert heir.flush()
    heir.close()
    keys = list_log_objects(s3.root, PIPELINE, None)
    assert {parse_key(k)[2] for k in keys} == {f"pod-a-{dead_pid}"}  # shipped under the dead worker's own keys
    assert sorted(read_log_objects(s3.root, PIPELINE, keys).get_column("id").to_list()) == list(range(42))
    assert value(registry, "kiln_prediction_log_flushed_rows_total") == 42
    assert adopt_dead_spills(root / f"pod-a-{os.getpid()}") == 0  # nothing left to take
