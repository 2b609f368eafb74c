"""Endpoint telemetry objects (kiln/telemetry.py): counting, summing deltas over a time window, percentiles, SLIs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kiln import paths
from kiln.state import write_atomic
from kiln.telemetry import (
    LATENCY_EDGES_S,
    TelemetryCounters,
    encode,
    histogram_quantile,
    list_telemetry_objects,
    load_telemetry,
    object_key,
    slis,
)

EDGES = [0.01, 0.1, 1.0]
HOUR = datetime(2026, 3, 1, 10, tzinfo=UTC).timestamp()


def _write(root: Path, pipeline: str, replica: str, seq: int, end: float, ok: int, bad: int, failed: int, rows: int,
           counts: list[int], edges: list[float] = EDGES) -> str:
    delta = {"start": end - 1, "end": end, "requests": {"2xx": ok, "4xx": bad, "5xx": failed}, "rows": rows,
             "latency_edges_s": edges, "latency_counts": counts}
    key, data = encode(delta, pipeline, replica, seq)
    write_atomic(root / paths.telemetry_dir(pipeline) / key, data)
    return key


def test_counters_count_by_class_and_bucket_and_take_resets_them() -> None:
    counters = TelemetryCounters(tuple(EDGES))
    assert counters.empty and counters.take() is None
    counters.request(200, 0.005, rows=3)  # bucket <= 0.01
    counters.request(200, 0.01, count=4, rows=20)  # an edge belongs to its own bucket (Prometheus "le")
    counters.request(400, 0.05)
    counters.request(503, 5.0)  # above the last edge
    counters.request(200, 0.5, count=0, rows=99)  # a combined request answered with an error counts nothing
    delta = counters.take()
    assert delta is not None
    assert delta["requests"] == {"2xx": 5, "4xx": 1, "5xx": 1}
    assert delta["rows"] == 23
    assert delta["latency_counts"] == [5, 1, 0, 1]
    assert delta["start"] <= delta["end"]
    assert counters.take() is None  # reset
    counters.request(200, 0.2)
    counters.restore(delta)  # a delta the store refused goes out with the next one
    again = counters.take()
    assert again is not None and again["requests"] == {"2xx": 6, "4xx": 1, "5xx": 1} and again["latency_counts"] == [5, 1, 1, 1]
    assert again["start"] == delta["start"]


def test_object_keys_name_the_utc_hour_of_the_cut_and_a_padded_seq() -> None:
    assert object_key(HOUR + 125, "host-7", 42) == "2026-03-01/10/host-7-0000000000000042.json"
    with pytest.raises(ValueError, match="replica name"):
        object_key(HOUR, "a/b", 1)


def test_load_sums_deltas_of_every_replica_and_filters_by_window(tmp_path: Path) -> None:
    _write(tmp_path, "p", "a-1", 1, HOUR + 10, ok=10, bad=2, failed=0, rows=50, counts=[8, 4, 0, 0])
    _write(tmp_path, "p", "a-1", 2, HOUR + 3600 + 10, ok=5, bad=0, failed=1, rows=25, counts=[0, 5, 1, 0])  # next hour
    _write(tmp_path, "p", "b-2", 7, HOUR + 20, ok=3, bad=1, failed=0, rows=9, counts=[4, 0, 0, 0])  # another replica
    _write(tmp_path, "other", "a-1", 1, HOUR + 10, ok=100, bad=0, failed=0, rows=1, counts=[100, 0, 0, 0])
    folder = tmp_path / paths.telemetry_dir("p") / "2026-03-01" / "10"
    (folder / "c-3-0000000000000001.json.tmp").write_text("{")  # an unfinished local write is not listed

    everything = load_telemetry(str(tmp_path), "p", None, None)
    assert everything["objects"] == 3 and everything["replicas"] == ["a-1", "b-2"]
    assert everything["requests"] == {"2xx": 18, "4xx": 3, "5xx": 1}
    assert everything["rows"] == 84
    assert everything["latency_counts"] == [12, 9, 1, 0]
    assert everything["start"] == HOUR + 9 and everything["end"] == HOUR + 3610

    first_hour = load_telemetry(str(tmp_path), "p", HOUR, HOUR + 3599)
    assert first_hour["objects"] == 2 and first_hour["requests"] == {"2xx": 13, "4xx": 3, "5xx": 0}
    later = load_telemetry(str(tmp_path), "p", HOUR + 15, None)  # by each object's end, not only its hour folder
    assert later["objects"] == 2 and later["requests"]["2xx"] == 8
    assert list_telemetry_objects(str(tmp_path), "p", HOUR + 3600, None) == ["2026-03-01/11/a-1-0000000000000002.json"]
    assert load_telemetry(str(tmp_path), "missing", None, None)["objects"] == 0


def test_an_unreadable_object_is_skipped_and_counted(tmp_path: Path) -> None:
    _write(tmp_path, "p", "a", 1, HOUR, ok=1, bad=0, failed=0, rows=1, counts=[1, 0, 0, 0])
    key = object_key(HOUR, "a", 2)
    write_atomic(tmp_path / paths.telemetry_dir("p") / key, "not json")
    summary = load_telemetry(str(tmp_path), "p", None, None)
    assert summary["objects"] == 1 and summary["unreadable"] == 1 and summary["requests"]["2xx"] == 1


def test_histograms_on_other_edges_merge_by_upper_edge(tmp_path: Path) -> None:
    _write(tmp_path, "p", "a", 1, HOUR, ok=2, bad=0, failed=0, rows=2, counts=[1, 1, 0, 0])
    _write(tmp_path, "p", "b", 1, HOUR, ok=3, bad=0, failed=0, rows=3, counts=[2, 1, 0], edges=[0.01, 0.5])
    summary = load_telemetry(str(tmp_path), "p", None, None)
    assert summary["latency_edges_s"] == [0.01, 0.1, 0.5, 1.0]
    assert summary["latency_counts"] == [3, 1, 1, 0, 0]


def test_percentiles_interpolate_within_the_bucket_of_the_rank() -> None:
    counts = [50, 40, 10, 0]  # 50 answers in (0, 10 ms], 40 in (10, 100 ms], 10 in (100 ms, 1 s]
    assert histogram_quantile(EDGES, counts, 0.5) == pytest.approx(0.01)  # rank 50: the top of the first bucket
    assert histogram_quantile(EDGES, counts, 0.25) == pytest.approx(0.005)  # rank 25: halfway through it
    assert histogram_quantile(EDGES, counts, 0.95) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert histogram_quantile(EDGES, counts, 0.99) == pytest.approx(0.1 + 0.9 * 9 / 10)
    assert histogram_quantile(EDGES, [0, 0, 0, 7], 0.5) == 1.0  # above the last edge: at least the last edge
    assert histogram_quantile(EDGES, [0, 0, 0, 0], 0.5) is None


def test_slis_of_a_summary(tmp_path: Path) -> None:
    _write(tmp_path, "p", "a", 1, HOUR, ok=90, bad=6, failed=4, rows=450, counts=[50, 40, 10, 0])
    got = slis(load_telemetry(str(tmp_path), "p", None, None))
    assert got == {"requests": 100, "availability": 0.96, "p50_ms": 10.0, "p95_ms": 550.0, "p99_ms": 910.0, "rows": 450,
                   "errors_4xx": 6, "errors_5xx": 4}
    none = slis(load_telemetry(str(tmp_path), "q", None, None))
    assert none["requests"] == 0 and none["availability"] is None and none["p95_ms"] is None


def test_the_object_is_plain_json_with_the_endpoint_buckets() -> None:
    counters = TelemetryCounters()
    counters.request(200, 0.003, rows=1)
    delta = counters.take()
    assert delta is not None
    key, data = encode(delta, "p", "r", 5)
    body = json.loads(data)
    assert key.endswith("/r-0000000000000005.json")
    assert body["version"] == 1 and body["pipeline"] == "p" and body["seq"] == 5
    assert body["latency_edges_s"] == list(LATENCY_EDGES_S) and sum(body["latency_counts"]) == 1
