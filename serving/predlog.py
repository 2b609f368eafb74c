"""Shipping an endpoint's prediction log to the state store as whole Parquet objects (one replica, one shipper).

Design
------
- **Buffer.** :meth:`PredictionShipper.append` puts the scored batch's frame (request rows + ``_prediction``,
  ``_model_version``, ``_logged_at``) on an in-memory list under a lock and returns: no encoding, no disk, no network, and
  it never raises. Memory is bounded by ``max_buffer_rows`` (default 10 x ``flush_rows``); only a flusher stuck in a
  network call lets the buffer reach it, and then the oldest buffered frames are dropped and counted.
- **Flush.** A background thread cuts objects of ``flush_rows`` rows from the buffer as soon as it holds that many, and
  all of it (in objects of at most ``flush_rows``) once its oldest row has waited ``flush_seconds``; each object is
  encoded once as Parquet (zstd) with its counts in the footer's key-value metadata (``kiln.rows``, ``kiln.replica``,
  ``kiln.seq``, ``kiln.first_logged_at``, ``kiln.last_logged_at``, ``kiln.pipeline``, ``kiln.key``) and
  written as one object: one PUT on S3, a temporary sibling renamed over it in a folder. Nothing else is written next to
  the data objects.
- **Object layout** (:mod:`kiln.predlog`): ``<root>/predictions/<p>/<YYYY-MM-DD>/<HH>/<replica>-<seq>.parquet``, the UTC
  hour of the object's first ``_logged_at``; ``seq`` is zero-padded to 16 digits and grows by one per object. A replica
  without saved state starts at the current epoch milliseconds, so a replica name reused after its spill folder was lost
  still never overwrites an earlier object; the next seq is saved in ``<spill_dir>/next_seq`` before each object is named.
- **Spill.** A batch whose write fails, and every batch cut while the store is failing, goes to
  ``<spill_dir>/<seq>.parquet`` (the same bytes, name and key it would have had), so memory stays small during an outage.
  Retries back off exponentially (``retry_initial`` doubling to ``retry_max`` seconds, jittered); the first retry that
  works ships the spilled objects oldest first, then new batches go straight to the store again. A retried object keeps
  its key, so a PUT that worked but whose answer was lost is not duplicated. Spill files survive a restart: a shipper on
  the same ``spill_dir`` ships them and continues the seq. With ``adopt_dead=True`` (one shipper per worker process, its
  folder named ``<replica>-<pid>``) a new worker also takes over the spill files of sibling folders whose process is gone
  (:func:`adopt_dead_spills`), so a killed worker's spilled rows are shipped, under their own keys, by its successor.
- **Drop policy: oldest first.** Spilled rows are bounded by ``max_spill_rows``: before a batch is spilled, the oldest spill
  files are deleted until it fits (a batch alone larger than the bound is dropped itself). Recent rows are the ones drift
  and performance windows still need; every dropped row is counted.
- **Shutdown.** :meth:`flush` ships (or spills) what is buffered now, trying the store even during a backoff;
  :meth:`close` stops the thread and flushes within its timeout, spilling without a network try while the store is failing.
- **Telemetry** (:mod:`kiln.telemetry`): :attr:`PredictionShipper.telemetry` counts the worker's ``/predict`` answers
  (by status class, rows served, a latency histogram); the flusher writes what was counted since its last write as one
  JSON object under ``<root>/telemetry/<p>/<YYYY-MM-DD>/<HH>/<replica>-<seq>.json`` with each flush of rows, and at least
  every ``flush_seconds`` while anything was counted (so failed requests, which log no row, are written too); nothing is
  written when nothing was counted. Its ``seq`` starts at the epoch milliseconds of the shipper's start and grows by one
  per object. While the store fails (the same backoff as the rows), the one object that failed is kept in memory and
  retried under its key (an unanswered PUT that did land is not counted twice), and new answers keep adding to the
  counters, which go out as the next object: memory stays bounded, nothing is counted twice. What is still in memory
  when a worker exits while the store is down is lost (telemetry has no spill file).
- **Counters** (``prometheus_client``, label ``pipeline``): ``kiln_prediction_log_rows_total`` (appended),
  ``kiln_prediction_log_flushed_rows_total`` (in the store), ``kiln_prediction_log_dropped_rows_total``,
  ``kiln_prediction_log_spilled_rows`` (gauge, on disk now) and ``kiln_prediction_log_flush_errors_total`` (failed writes).
  In one process, rows appended = flushed + dropped + spilled + buffered (less any spill inherited from an earlier one).
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.predlog import (
    META_FIRST,
    META_KEY,
    META_LAST,
    META_PIPELINE,
    META_REPLICA,
    META_ROWS,
    META_SEQ,
    REPLICA,
    SEQ_DIGITS,
    log_prefix,
    object_key,
)
from kiln.state import write_atomic
from kiln.telemetry import TelemetryCounters, telemetry_prefix
from kiln.telemetry import encode as encode_telemetry

if TYPE_CHECKING:
    import polars as pl

LOGGED_AT = "_logged_at"
SEQ_FILE = "next_seq"
log = logging.getLogger(__name__)


@dataclass
class _Spilled:
    path: Path
    key: str
    rows: int


class _Metrics:
    """The shipper's series on one registry (created once per registry: two shippers in a process share them)."""

    _by_registry: weakref.WeakKeyDictionary[Any, _Metrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: Any) -> None:
        import prometheus_client as prom

        labels = ["pipeline"]
        self.rows = prom.Counter("kiln_prediction_log_rows", "Prediction-log rows appended", labels, registry=registry)
        self.flushed = prom.Counter("kiln_prediction_log_flushed_rows", "Prediction-log rows written to the store", labels,
                                    registry=registry)
        self.dropped = prom.Counter("kiln_prediction_log_dropped_rows", "Prediction-log rows dropped (bounds exceeded)", labels,
                                    registry=registry)
        self.spilled = prom.Gauge("kiln_prediction_log_spilled_rows", "Prediction-log rows waiting on local disk", labels,
                                  registry=registry, multiprocess_mode="livesum")
        self.errors = prom.Counter("kiln_prediction_log_flush_errors", "Failed writes of prediction-log objects", labels,
                                   registry=registry)

    @classmethod
    def on(cls, registry: Any) -> _Metrics:
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


def _epoch_bounds(frame: pl.DataFrame, fallback: float) -> tuple[float, float]:
    """First and last ``_logged_at`` (epoch seconds; a datetime column is converted), ``fallback`` when there is none."""
    import polars as pl

    if LOGGED_AT not in frame.columns or frame.height == 0:
        return fallback, fallback
    column = frame.get_column(LOGGED_AT)
    if column.dtype == pl.Datetime:
        column = column.dt.epoch("us").cast(pl.Float64) / 1e6
    elif column.dtype.is_numeric():
        column = column.cast(pl.Float64)
    else:
        return fallback, fallback
    low, high = column.min(), column.max()
    if low is None or high is None:
        return fallback, fallback
    return float(low), float(high)  # type: ignore[arg-type]


class PredictionShipper:
    """Buffers logged prediction rows and ships them as Parquet objects; spills to ``spill_dir`` while the store is down."""

    def __init__(
        self,
        root: str,
        pipeline: str,
        replica: str,
        flush_rows: int = 10_000,
        flush_seconds: float = 10.0,
        spill_dir: str | Path = "",
        max_spill_rows: int = 1_000_000,
        *,
        max_buffer_rows: int | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        registry: Any = None,
        start: bool = True,
        adopt_dead: bool = False,
    ) -> None:
        if not spill_dir:
            raise ValueError(f"prediction log of {pipeline!r}: a spill_dir is required (local disk for rows the store cannot take)")
        if not REPLICA.match(replica):
            raise ValueError(f"prediction log of {pipeline!r}: replica name {replica!r} must be letters, digits, '.', '_' or '-'")
        if flush_rows < 1 or flush_seconds <= 0 or max_spill_rows < 0:
            raise ValueError(f"prediction log of {pipeline!r}: flush_rows >= 1, flush_seconds > 0 and max_spill_rows >= 0, "
                             f"got {flush_rows}, {flush_seconds}, {max_spill_rows}")
        if registry is None:
            import prometheus_client as prom

            registry = prom.REGISTRY
        self.root, self.pipeline, self.replica = root, pipeline, replica
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.max_spill_rows = max_spill_rows
        self.max_buffer_rows = max_buffer_rows if max_buffer_rows is not None else 10 * flush_rows
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.prefix = log_prefix(root, pipeline)
        self.spill_dir = Path(spill_dir)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        metrics = _Metrics.on(registry)
        self._rows = metrics.rows.labels(pipeline=pipeline)
        self._flushed = metrics.flushed.labels(pipeline=pipeline)
        self._dropped = metrics.dropped.labels(pipeline=pipeline)
        self._spilled_rows = metrics.spilled.labels(pipeline=pipeline)
        self._errors = metrics.errors.labels(pipeline=pipeline)

        self._lock = threading.Lock()  # the buffer (append is called from serving threads)
        self._work = threading.Lock()  # one flush at a time: the thread, flush() and close()
        self._frames: deque[pl.DataFrame] = deque()
        self._buffered = 0
        self._since = 0.0  # monotonic time of the oldest buffered row
        self._spill: dict[int, _Spilled] = {}
        self._retry_at = 0.0  # monotonic; > now: the store failed recently, batches go to spill
        self._delay = retry_initial
        self._failing = False
        self._closed = False
        if adopt_dead:
            adopt_dead_spills(self.spill_dir)
        self._next_seq = self._recover()
        self.telemetry = TelemetryCounters()  # the worker's /predict answers, written as deltas by the flusher
        self._telemetry_prefix = telemetry_prefix(root, pipeline)
        self._telemetry_seq = int(time.time() * 1000)  # a restarted worker's names never repeat an earlier one's
        self._telemetry_pending: tuple[str, bytes] | None = None  # an object the store did not take; retried as is
        self._telemetry_at = time.monotonic()  # last telemetry write (or try)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"kiln-predlog-{pipeline}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------ the serving side

    def append(self, frame: pl.DataFrame) -> None:
        """Buffer a scored batch's rows for the next object; returns at once and never raises."""
        try:
            rows = frame.height
            if rows == 0:
                return
            self._rows.inc(rows)
            if self._closed:
                self._dropped.inc(rows)
                return
            dropped = 0
            with self._lock:
                if not self._frames:
                    self._since = time.monotonic()
                self._frames.append(frame)
                self._buffered += rows
                while self._buffered > self.max_buffer_rows and len(self._frames) > 1:  # only when the flusher is stuck
                    oldest = self._frames.popleft()
                    self._buffered -= oldest.height
                    dropped += oldest.height
                full = self._buffered >= self.flush_rows
            if dropped:
                self._dropped.inc(dropped)
            if full:
                self._wake.set()
        except Exception:  # noqa: BLE001 - logging must never fail a prediction
            log.exception("prediction log of %s: could not buffer a batch", self.pipeline)

    @property
    def buffered_rows(self) -> int:
        """Rows in memory, not yet in an object or a spill file."""
        return self._buffered

    @property
    def spilled_rows(self) -> int:
        """Rows in spill files, waiting for the store."""
        return sum(s.rows for s in self._spill.values())

    @property
    def next_seq(self) -> int:
        """The seq the next object gets."""
        return self._next_seq

    def flush(self) -> bool:
        """Ship what is buffered now (spilled objects first), trying the store even during a backoff; True when
        nothing is left in memory or on disk."""
        self._cycle(force=True, network=True)
        return self._buffered == 0 and not self._spill

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread and flush within ``timeout`` seconds; while the store is failing, buffered rows are spilled
        without a network try. Spill files stay for the next shipper on this ``spill_dir``. True when nothing is left."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._work.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("prediction log of %s: still writing after %.1fs; %d buffered rows are lost", self.pipeline, timeout,
                        self._buffered)
            self._closed = True
            return False
        try:
            self._closed = True
            self._cycle_locked(force=True, network=time.monotonic() >= self._retry_at)
        finally:
            self._work.release()
        return self._buffered == 0 and not self._spill

    # ------------------------------------------------------------------------------------------ the flusher

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._wait_seconds())
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._cycle(force=False, network=False)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("prediction log of %s: flush cycle failed", self.pipeline)
                time.sleep(min(self.flush_seconds, 1.0))

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        wait = self.flush_seconds
        if self._buffered:
            wait = self._since + self.flush_seconds - now
        if self._spill:
            wait = min(wait, self._retry_at - now)
        if self._telemetry_pending is not None or not self.telemetry.empty:
            wait = min(wait, max(self._telemetry_at + self.flush_seconds, self._retry_at) - now)
        return min(max(wait, 0.005), self.flush_seconds)

    def _cycle(self, force: bool, network: bool) -> None:
        with self._work:
            self._cycle_locked(force, network)

    def _cycle_locked(self, force: bool, network: bool) -> None:
        """Cut the buffer when due; ship spilled objects when a retry is due; ship or spill the batch.
        ``network``: try the store even during a backoff (flush and close)."""
        now = time.monotonic()
        chunks = self._cut(force, now)
        try_store = network or now >= self._retry_at
        if self._spill and try_store:
            self._drain()
        for chunk in chunks:
            rows, key, data = self._encode(chunk)
            if self._spill or not try_store:  # keep ship order: nothing overtakes a spilled object
                self._to_spill(rows, key, data)
            elif not self._put(key, data, rows):
                self._to_spill(rows, key, data)
        # telemetry: to the store unless a write failed in this cycle or the store is in its backoff
        self._ship_telemetry(force or bool(chunks), (network and not self._failing) or time.monotonic() >= self._retry_at)

    def _ship_telemetry(self, flushed: bool, try_store: bool) -> None:
        """Write the telemetry counted since the last write, with a flush of rows (``flushed``) or when ``flush_seconds``
        have passed since the last write; a kept object first. Never raises."""
        try:
            now = time.monotonic()
            if not try_store or not (flushed or now - self._telemetry_at >= self.flush_seconds - 0.01):
                return
            self._telemetry_at = now
            if self._telemetry_pending is not None:
                key, data = self._telemetry_pending
                if not self._put_telemetry(key, data):
                    return
                self._telemetry_pending = None
            delta = self.telemetry.take()
            if delta is None:
                return
            seq = self._telemetry_seq
            self._telemetry_seq += 1
            key, data = encode_telemetry(delta, self.pipeline, self.replica, seq)
            if not self._put_telemetry(key, data):
                self._telemetry_pending = (key, data)
        except Exception:  # noqa: BLE001 - telemetry must never stop the flusher or a shutdown
            log.exception("prediction log of %s: could not write telemetry", self.pipeline)

    def _put_telemetry(self, key: str, data: bytes) -> bool:
        """One telemetry object to the store; on failure back off as for rows."""
        try:
            write_atomic(self._telemetry_prefix / key, data)
        except Exception as exc:  # noqa: BLE001 - any failure of the store: keep it and retry later
            self._failed(key, self._telemetry_prefix, exc)
            return False
        self._succeeded()
        return True

    def _cut(self, force: bool, now: float) -> list[pl.DataFrame]:
        """The objects due now, each of at most ``flush_rows`` rows: all buffered rows when forced or when the oldest has
        waited ``flush_seconds``, else whole ``flush_rows`` objects (the rest waits for more rows or for its time)."""
        import polars as pl

        with self._lock:
            if not self._buffered:
                return []
            if force or now - self._since >= self.flush_seconds:
                take = self._buffered
            else:
                take = self._buffered // self.flush_rows * self.flush_rows
            if take == 0:
                return []
            frames: list[pl.DataFrame] = []
            need = take
            while need:
                frame = self._frames.popleft()
                if frame.height > need:  # the boundary falls inside this frame: its tail stays, oldest first
                    self._frames.appendleft(frame.slice(need))
                    frame = frame.head(need)
                frames.append(frame)
                need -= frame.height
            self._buffered -= take
            # The rows left keep the oldest one's waiting time (conservative: they flush no later than that).
        frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
        return [frame.slice(start, self.flush_rows) for start in range(0, frame.height, self.flush_rows)]

    def _encode(self, frame: pl.DataFrame) -> tuple[int, str, bytes]:
        """One object's key and Parquet bytes (its counts in the footer); takes the next seq."""
        first, last = _epoch_bounds(frame, time.time())
        seq = self._take_seq()
        key = object_key(first, self.replica, seq)
        metadata = {META_ROWS: str(frame.height), META_REPLICA: self.replica, META_SEQ: str(seq), META_FIRST: repr(first),
                    META_LAST: repr(last), META_PIPELINE: self.pipeline, META_KEY: key}
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd", metadata=metadata)
        return frame.height, key, buffer.getvalue()

    def _put(self, key: str, data: bytes, rows: int) -> bool:
        """One object to the store; on failure count it and back off (the caller spills)."""
        try:
            write_atomic(self.prefix / key, data)
        except Exception as exc:  # noqa: BLE001 - any failure of the store means: spill and retry later
            self._failed(key, self.prefix, exc)
            return False
        self._succeeded()
        self._flushed.inc(rows)
        return True

    def _failed(self, key: str, prefix: Any, exc: Exception) -> None:
        """A write failed: count it and back off (exponentially, jittered)."""
        self._errors.inc()
        jitter = 0.5 + random.random() / 2
        self._retry_at = time.monotonic() + self._delay * jitter
        if not self._failing:
            log.warning("prediction log of %s: could not write %s under %s (%s: %s); spilling to %s and retrying",
                        self.pipeline, key, prefix, type(exc).__name__, exc, self.spill_dir)
        self._failing = True
        self._delay = min(self._delay * 2, self.retry_max)

    def _succeeded(self) -> None:
        """A write worked: the store is back, no backoff."""
        if self._failing:
            log.warning("prediction log of %s: the store under %s takes writes again", self.pipeline, self.prefix)
        self._failing = False
        self._delay = self.retry_initial
        self._retry_at = 0.0

    # ------------------------------------------------------------------------------------------ the spill folder

    def _to_spill(self, rows: int, key: str, data: bytes) -> None:
        """Keep an object on local disk; delete the oldest spill files first when it would exceed the bound."""
        if rows > self.max_spill_rows:
            self._dropped.inc(rows)
            return
        while self._spill and self.spilled_rows + rows > self.max_spill_rows:
            oldest = min(self._spill)
            gone = self._spill.pop(oldest)
            gone.path.unlink(missing_ok=True)
            self._dropped.inc(gone.rows)
        seq = int(key.rsplit("-", 1)[1].removesuffix(".parquet"))
        path = self.spill_dir / f"{seq:0{SEQ_DIGITS}d}.parquet"
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            log.exception("prediction log of %s: could not spill %d rows to %s; they are dropped", self.pipeline, rows, path)
            self._dropped.inc(rows)
            return
        self._spill[seq] = _Spilled(path, key, rows)
        self._spilled_rows.set(self.spilled_rows)

    def _drain(self) -> None:
        """Ship spilled objects oldest first; stop at the first failure (the backoff decides the next try)."""
        for seq in sorted(self._spill):
            spilled = self._spill[seq]
            try:
                data = spilled.path.read_bytes()
            except OSError:
                log.exception("prediction log of %s: spill file %s is unreadable; its rows are dropped", self.pipeline,
                              spilled.path)
                self._spill.pop(seq)
                self._dropped.inc(spilled.rows)
                continue
            if not self._put(spilled.key, data, spilled.rows):
                break
            self._spill.pop(seq)
            spilled.path.unlink(missing_ok=True)
        self._spilled_rows.set(self.spilled_rows)

    def _take_seq(self) -> int:
        """The next object's seq, saved before it is used so that a restart never names two objects alike."""
        seq = self._next_seq
        self._next_seq = seq + 1
        path = self.spill_dir / SEQ_FILE
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(str(self._next_seq))
            os.replace(tmp, path)
        except OSError:
            log.exception("prediction log of %s: could not save the next seq in %s", self.pipeline, path)
        return seq

    def _recover(self) -> int:
        """Index spill files left by an earlier shipper on this folder and return the seq to continue from."""
        import pyarrow.parquet as pq

        for stale in self.spill_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        floor = 0
        for path in sorted(self.spill_dir.glob("*.parquet")):
            try:
                meta = {k.decode(): v.decode() for k, v in (pq.read_metadata(path).metadata or {}).items()}
                seq, key, rows = int(meta[META_SEQ]), meta[META_KEY], int(meta[META_ROWS])
            except Exception:  # noqa: BLE001 - a damaged file cannot be shipped; keep the rest
                log.exception("prediction log of %s: spill file %s is unreadable; it is removed", self.pipeline, path)
                path.unlink(missing_ok=True)
                continue
            while seq in self._spill:  # a file taken over from another worker may share a seq with one of ours
                seq += 1
            self._spill[seq] = _Spilled(path, key, rows)
            floor = max(floor, seq + 1)
        self._spilled_rows.set(self.spilled_rows)
        saved = self.spill_dir / SEQ_FILE
        if saved.exists():
            try:
                return max(floor, int(saved.read_text().strip()))
            except ValueError:
                log.warning("prediction log of %s: %s is not a number; starting from the clock", self.pipeline, saved)
        return max(floor, int(time.time() * 1000))  # no state: epoch ms never repeats an earlier start's names


def adopt_dead_spills(spill_dir: Path) -> int:
    """Move the spill files of dead sibling workers into ``spill_dir`` (ours); returns how many files were taken.

    Siblings are the folders beside ours named like it, ``<replica>-<pid>`` with the same ``<replica>`` (this host or
    pod), whose pid no longer runs here. Each file keeps its bytes, so it is shipped under the key its writer gave it.
    A rename is atomic: two workers starting at once never both take a file. An emptied folder is removed."""
    from kiln.process import pid_alive

    match = re.fullmatch(r"(.+)-(\d+)", spill_dir.name)
    if match is None or not spill_dir.parent.is_dir():
        return 0
    prefix, own_pid = match.group(1), int(match.group(2))
    spill_dir.mkdir(parents=True, exist_ok=True)
    taken = 0
    for sibling in spill_dir.parent.iterdir():
        found = re.fullmatch(re.escape(prefix) + r"-(\d+)", sibling.name)
        if found is None or not sibling.is_dir() or int(found.group(1)) == own_pid or pid_alive(int(found.group(1))):
            continue
        for path in sorted(sibling.glob("*.parquet")):
            try:
                os.replace(path, spill_dir / f"{sibling.name}-{path.name}")
                taken += 1
            except OSError:  # another worker took it first, or it is being removed
                continue
        try:
            for rest in sibling.iterdir():  # its seq file and unfinished writes
                rest.unlink(missing_ok=True)
            sibling.rmdir()
        except OSError:
            pass
    if taken:
        log.warning("prediction log: took over %d spill file(s) of dead workers beside %s", taken, spill_dir)
    return taken

