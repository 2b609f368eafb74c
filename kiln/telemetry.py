"""Endpoint telemetry as objects: per-interval deltas of ``/predict`` counters, and the reader `kiln slo` uses.

The live ``/metrics`` of an endpoint reset at every roll or restart and are split across replicas and workers; SLIs
computed from them cover whatever the current processes happened to see. So each endpoint worker also counts its
``/predict`` answers (:class:`TelemetryCounters`) and writes what it counted since its last write as one JSON object
(:mod:`serving.predlog` writes them next to its flushes) under ``<state root>/telemetry/<p>/``::

    <YYYY-MM-DD>/<HH>/<replica>-<seq>.json

date and hour are the UTC time the object was cut (its ``end``); ``seq`` is zero-padded (16 digits) and grows by one per
object of a replica. An object holds::

    {"version": 1, "pipeline": "p", "replica": "host-123", "seq": 17, "start": <epoch s>, "end": <epoch s>,
     "requests": {"2xx": 40, "4xx": 5, "5xx": 0}, "rows": 200,
     "latency_edges_s": [0.001, ..., 2.5], "latency_counts": [<one per edge>, <above the last edge>]}

``requests`` counts answers by HTTP status class, ``rows`` the rows answered with predictions, and the latency histogram
counts each answer once in the first bucket whose upper edge is >= its seconds (not cumulative; the last count is
above the last edge). Objects are deltas, never rewritten: a reader sums the objects whose ``end`` falls in its window
(:func:`load_telemetry`) and derives the SLIs from the sum (:func:`slis`), so a roll, a restart or several replicas
change nothing in the totals.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kiln import paths
from kiln.state import state_upath

VERSION = 1
SUFFIX = ".json"
SEQ_DIGITS = 16
KEY = re.compile(r"^(\d{4}-\d{2}-\d{2})/(\d{2})/([A-Za-z0-9._-]+)-(\d{16})\.json$")
# The latency bucket edges, seconds: those of the live kiln_request_duration_seconds histogram (serving/metrics.py).
LATENCY_EDGES_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CLASSES = ("2xx", "4xx", "5xx")
log = logging.getLogger(__name__)


def status_class(status: int) -> str:
    """``"2xx"``, ``"4xx"``, ``"5xx"`` (or ``"1xx"``/``"3xx"``) of an HTTP status."""
    return f"{status // 100}xx"


def telemetry_prefix(root: str, pipeline: str) -> Any:
    """The folder (or prefix) of a pipeline's telemetry objects."""
    return state_upath(root) / paths.telemetry_dir(pipeline)


def object_key(end: float, replica: str, seq: int) -> str:
    """``<YYYY-MM-DD>/<HH>/<replica>-<seq>.json`` for an object cut at ``end`` (epoch seconds, UTC hour)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", replica):
        raise ValueError(f"telemetry: replica name {replica!r} must be letters, digits, '.', '_' or '-'")
    if not 0 <= seq < 10**SEQ_DIGITS:
        raise ValueError(f"telemetry: seq {seq} of replica {replica!r} does not fit {SEQ_DIGITS} digits")
    when = datetime.fromtimestamp(end, tz=UTC)
    return f"{when:%Y-%m-%d}/{when:%H}/{replica}-{seq:0{SEQ_DIGITS}d}{SUFFIX}"


class TelemetryCounters:
    """One worker's ``/predict`` counters since the last :meth:`take`: answers by status class, rows answered with
    predictions, and a latency histogram on fixed edges. Thread-safe; :meth:`request` is a few hundred nanoseconds."""

    def __init__(self, edges: tuple[float, ...] = LATENCY_EDGES_S) -> None:
        self.edges = tuple(float(e) for e in edges)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.requests: dict[str, int] = {}
        self.rows = 0
        self.latency = [0] * (len(self.edges) + 1)
        self.start: float | None = None  # epoch seconds of the first answer counted since the last take

    @property
    def empty(self) -> bool:
        """Nothing counted since the last take."""
        return self.start is None

    def request(self, status: int, seconds: float, count: int = 1, rows: int = 0) -> None:
        """``count`` answers of ``status``, each in ``seconds``, that served ``rows`` rows together (0 counts nothing)."""
        if count < 1:
            return
        cls = status_class(status)
        bucket = bisect.bisect_left(self.edges, seconds)  # first edge >= seconds (Prometheus' "le")
        with self._lock:
            if self.start is None:
                self.start = time.time()
            self.requests[cls] = self.requests.get(cls, 0) + count
            self.rows += rows
            self.latency[bucket] += count

    def take(self) -> dict[str, Any] | None:
        """The counts since the last take (and reset them), or None when nothing was counted."""
        with self._lock:
            if self.start is None:
                return None
            delta = {"start": self.start, "end": time.time(), "requests": self.requests, "rows": self.rows,
                     "latency_edges_s": list(self.edges), "latency_counts": self.latency}
            self._reset()
        return delta

    def restore(self, delta: dict[str, Any]) -> None:
        """Add back a delta that could not be written (it goes out with the next take instead)."""
        with self._lock:
            self.start = delta["start"] if self.start is None else min(self.start, delta["start"])
            for cls, n in delta["requests"].items():
                self.requests[cls] = self.requests.get(cls, 0) + n
            self.rows += delta["rows"]
            self.latency = [a + b for a, b in zip(self.latency, delta["latency_counts"], strict=True)]


def encode(delta: dict[str, Any], pipeline: str, replica: str, seq: int) -> tuple[str, bytes]:
    """The key and JSON bytes of one telemetry object for a delta from :meth:`TelemetryCounters.take`."""
    key = object_key(delta["end"], replica, seq)
    body = {"version": VERSION, "pipeline": pipeline, "replica": replica, "seq": seq, **delta}
    return key, json.dumps(body, separators=(",", ":")).encode()


def _names(folder: Any) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _hour(at: float | None, default: str) -> str:
    return default if at is None else f"{datetime.fromtimestamp(at, tz=UTC):%Y-%m-%d/%H}"


def list_telemetry_objects(root: str, pipeline: str, since: float | None = None, until: float | None = None) -> list[str]:
    """Keys of the telemetry objects cut in the UTC hours from ``since``'s to ``until``'s (all when None), sorted.

    Walks only those date and hour folders; unfinished local writes (``*.tmp``) and other names are skipped."""
    base = telemetry_prefix(root, pipeline)
    low, high = _hour(since, ""), _hour(until, "9999-99-99/99")
    keys: list[str] = []
    for day in _names(base):
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day) or not low[:10] <= day <= high[:10]:
            continue
        for hour in _names(base / day):
            if not re.fullmatch(r"\d{2}", hour) or not low <= f"{day}/{hour}" <= high:
                continue
            keys.extend(f"{day}/{hour}/{n}" for n in _names(base / day / hour) if KEY.match(f"{day}/{hour}/{n}"))
    return sorted(keys)


def empty_summary() -> dict[str, Any]:
    """A summary of no objects (what :func:`load_telemetry` returns when there are none): no latency edge yet, the
    first object merged brings its own."""
    return {"objects": 0, "unreadable": 0, "replicas": [], "start": None, "end": None,
            "requests": {c: 0 for c in CLASSES}, "rows": 0, "latency_edges_s": [], "latency_counts": [0]}


def merge(summary: dict[str, Any], obj: dict[str, Any]) -> None:
    """Add one object's (or delta's) counts to a summary, in place. Histograms on other edges are folded in by upper
    edge (every Kiln writer uses :data:`LATENCY_EDGES_S`, so in practice the edges are the same)."""
    for cls, n in obj["requests"].items():
        summary["requests"][cls] = summary["requests"].get(cls, 0) + int(n)
    summary["rows"] += int(obj.get("rows", 0))
    edges, counts = [float(e) for e in obj["latency_edges_s"]], [int(c) for c in obj["latency_counts"]]
    if len(counts) != len(edges) + 1:
        raise ValueError(f"telemetry: {len(counts)} latency counts for {len(edges)} edges (want one more than edges)")
    if edges == summary["latency_edges_s"]:
        summary["latency_counts"] = [a + b for a, b in zip(summary["latency_counts"], counts, strict=True)]
    else:
        by_edge = dict(zip([*summary["latency_edges_s"], float("inf")], summary["latency_counts"], strict=True))
        for edge, n in zip([*edges, float("inf")], counts, strict=True):
            by_edge[edge] = by_edge.get(edge, 0) + n
        ordered = sorted(by_edge)
        summary["latency_edges_s"] = ordered[:-1]
        summary["latency_counts"] = [by_edge[e] for e in ordered]
    for field, pick in (("start", min), ("end", max)):
        if obj.get(field) is not None:
            summary[field] = obj[field] if summary[field] is None else pick(summary[field], obj[field])


def load_telemetry(state_root: str, pipeline: str, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """The sum of a pipeline's telemetry objects cut (``end``) within ``[since, until]`` (epoch seconds; None: open).

    Returns the summed ``requests`` by class, ``rows``, the merged latency histogram (``latency_edges_s``,
    ``latency_counts``), the first ``start`` and last ``end`` seen, the ``objects`` summed, the ``replicas`` that wrote
    them, and how many objects were ``unreadable`` (skipped, with a warning)."""
    base = telemetry_prefix(state_root, pipeline)
    summary = empty_summary()
    replicas: set[str] = set()
    for key in list_telemetry_objects(state_root, pipeline, since, until):
        try:
            obj = json.loads((base / key).read_text())
            end = float(obj["end"])
            if (since is not None and end < since) or (until is not None and end > until):
                continue
            merge(summary, obj)
        except FileNotFoundError:
            continue  # removed between listing and reading
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("telemetry of %s: skipping %s under %s (%s: %s)", pipeline, key, base, type(exc).__name__, exc)
            summary["unreadable"] += 1
            continue
        summary["objects"] += 1
        replicas.add(str(obj.get("replica")))
    summary["replicas"] = sorted(replicas)
    return summary


def histogram_quantile(edges: list[float], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram (non-cumulative ``counts``, one per upper edge plus one above the last), or None
    when it is empty.

    Interpolation: the quantile's rank ``q * total`` falls in one bucket; the value is interpolated linearly between that
    bucket's lower edge (the previous edge, 0 for the first bucket) and its upper edge, as if its answers were spread
    evenly across it (Prometheus' ``histogram_quantile``). A rank in the bucket above the last edge returns the last
    edge: the histogram only says the value is at least that."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for upper, n in zip([*edges, float("inf")], counts, strict=True):
        if n and below + n >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * max(0.0, rank - below) / n
        lower, below = upper, below + n
    return lower


def slis(summary: dict[str, Any]) -> dict[str, Any]:
    """Requests, availability (share of answers that are not 5xx; None without requests), p50/p95/p99 latency in
    milliseconds (:func:`histogram_quantile`), rows served, and the 4xx and 5xx answers of a :func:`load_telemetry` sum."""
    requests = sum(int(n) for n in summary["requests"].values())
    errors_5xx = int(summary["requests"].get("5xx", 0))
    edges, counts = summary["latency_edges_s"], summary["latency_counts"]

    def ms(q: float) -> float | None:
        value = histogram_quantile(edges, counts, q)
        return None if value is None else round(value * 1000, 3)

    return {"requests": requests, "availability": (requests - errors_5xx) / requests if requests else None,
            "p50_ms": ms(0.50), "p95_ms": ms(0.95), "p99_ms": ms(0.99), "rows": int(summary["rows"]),
            "errors_4xx": int(summary["requests"].get("4xx", 0)), "errors_5xx": errors_5xx}
