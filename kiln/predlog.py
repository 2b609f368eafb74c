"""Prediction logs as objects: the layout the endpoints ship (:mod:`serving.predlog`) and the reader the monitoring steps use.

A replica writes whole Parquet objects under the pipeline's log prefix (``<root>/predictions/<p>/``)::

    <YYYY-MM-DD>/<HH>/<replica>-<seq>.parquet

date and hour are the UTC time of the object's first row (``_logged_at``), ``seq`` is zero-padded (16 digits) and grows by
one per object of a replica, so the lexicographic key order is time order (by hour) and, within a replica, ship order.
An object appears whole (one PUT on S3, a rename in a folder) and is never rewritten; a reader lists keys after a cursor
(:func:`list_log_objects`), reads them (:func:`read_log_objects`) or only their Parquet footers (:func:`log_object_stats`:
each object's counts travel in its key-value metadata, ``kiln.*``).

Late objects: a replica that spilled rows while the store was down ships them later under their (older) hour, and two
replicas write the same hour at once, so a key can appear *before* a cursor already taken. A consumer that must see every
object keeps its cursor a settle time behind the newest hour (e.g. the longest outage it wants to recover, one hour by
default) and remembers the keys it has read after that cursor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import paths
from kiln.state import state_upath

if TYPE_CHECKING:
    import polars as pl
    from upath import UPath

SUFFIX = ".parquet"
SEQ_DIGITS = 16
REPLICA = re.compile(r"^[A-Za-z0-9._-]+$")
KEY = re.compile(r"^(\d{4}-\d{2}-\d{2})/(\d{2})/([A-Za-z0-9._-]+)-(\d{16})\.parquet$")
# Parquet key-value metadata of each object (strings): what SLIs need without reading the rows.
META_ROWS, META_REPLICA, META_SEQ = "kiln.rows", "kiln.replica", "kiln.seq"
META_FIRST, META_LAST, META_PIPELINE, META_KEY = "kiln.first_logged_at", "kiln.last_logged_at", "kiln.pipeline", "kiln.key"


def log_prefix(root: str, pipeline: str) -> Path | UPath:
    """The folder (or prefix) of a pipeline's prediction-log objects."""
    return state_upath(root) / paths.predictions_dir(pipeline)


def object_key(first_logged_at: float, replica: str, seq: int) -> str:
    """``<YYYY-MM-DD>/<HH>/<replica>-<seq>.parquet`` for an object whose first row was logged at ``first_logged_at``."""
    if not REPLICA.match(replica):
        raise ValueError(f"prediction log: replica name {replica!r} must be letters, digits, '.', '_' or '-'")
    if not 0 <= seq < 10**SEQ_DIGITS:
        raise ValueError(f"prediction log: seq {seq} of replica {replica!r} does not fit {SEQ_DIGITS} digits")
    when = datetime.fromtimestamp(first_logged_at, tz=UTC)
    return f"{when:%Y-%m-%d}/{when:%H}/{replica}-{seq:0{SEQ_DIGITS}d}{SUFFIX}"


def hour_cursor(logged_at: float) -> str:
    """A cursor for :func:`list_log_objects` that lists every object whose first row was logged in ``logged_at``'s UTC
    hour or later (``YYYY-MM-DD/HH/`` sorts before every key of that hour). A reader that filters rows by ``_logged_at``
    lists from ``hour_cursor(since - settle)``, ``settle`` covering ``flush_seconds`` and the lateness it accepts."""
    when = datetime.fromtimestamp(logged_at, tz=UTC)
    return f"{when:%Y-%m-%d}/{when:%H}/"


def parse_key(key: str) -> tuple[str, str, str, int]:
    """``(date, hour, replica, seq)`` of an object key; ValueError naming the key when it is not one."""
    found = KEY.match(key)
    if not found:
        raise ValueError(f"prediction log: {key!r} is not a '<YYYY-MM-DD>/<HH>/<replica>-<seq>.parquet' key")
    return found.group(1), found.group(2), found.group(3), int(found.group(4))


def _names(folder: Any) -> list[str]:
    """Names in a folder or prefix; none when it does not exist."""
    try:
        return sorted(p.name for p in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def list_log_objects(root: str, pipeline: str, after: str | None = None) -> list[str]:
    """Keys of a pipeline's log objects (relative to its prefix), sorted, strictly after ``after``.

    Walks only the days and hours at or after the cursor's, so a tick costs the same at any log size; unfinished local
    writes (``*.tmp``) and anything not named like an object are skipped."""
    base = log_prefix(root, pipeline)
    since_day, since_hour = ("", "")
    if after:
        cut = re.match(r"^(\d{4}-\d{2}-\d{2})/(\d{2})/", after)
        if not cut:
            raise ValueError(f"prediction log: cursor {after!r} is neither an object key nor an hour_cursor")
        since_day, since_hour = cut.group(1), cut.group(2)
    keys: list[str] = []
    for day in _names(base):
        if day < since_day or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            continue
        for hour in _names(base / day):
            if (day == since_day and hour < since_hour) or not re.fullmatch(r"\d{2}", hour):
                continue
            for name in _names(base / day / hour):
                key = f"{day}/{hour}/{name}"
                if KEY.match(key) and (after is None or key > after):
                    keys.append(key)
    return sorted(keys)


def read_log_objects(root: str, pipeline: str, keys: Iterable[str]) -> pl.DataFrame:
    """The rows of the given objects, in key order, as one frame (columns unioned, types relaxed; empty for no keys)."""
    import polars as pl

    base = log_prefix(root, pipeline)
    frames = []
    for key in keys:
        path = base / key
        try:
            with path.open("rb") as fh:
                frames.append(pl.read_parquet(fh))
        except Exception as exc:
            raise OSError(f"prediction log: could not read object {key!r} under {base}: {type(exc).__name__}: {exc}") from exc
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed")


def footer_stats(metadata: Any, key: str) -> dict[str, Any]:
    """The counts of one object from its Parquet footer (a pyarrow FileMetaData)."""
    values = {k.decode(): v.decode() for k, v in (metadata.metadata or {}).items()}
    first, last = values.get(META_FIRST), values.get(META_LAST)
    return {
        "key": key,
        "rows": int(metadata.num_rows),
        "replica": values.get(META_REPLICA),
        "seq": int(values[META_SEQ]) if META_SEQ in values else None,
        "first_logged_at": float(first) if first else None,
        "last_logged_at": float(last) if last else None,
    }


def log_object_stats(root: str, pipeline: str, keys: Iterable[str]) -> list[dict[str, Any]]:
    """Rows, replica, seq and first/last ``_logged_at`` of each object, from its footer only (a few KiB per object)."""
    import pyarrow.parquet as pq

    base = log_prefix(root, pipeline)
    stats = []
    for key in keys:
        path = base / key
        try:
            if isinstance(path, Path) and "://" not in root:
                metadata = pq.read_metadata(str(path))
            else:  # an object store: range reads of the object's tail, not the whole object
                from upath import UPath

                assert isinstance(path, UPath)
                with path.fs.open(path.path, "rb", block_size=64 * 1024, cache_type="readahead") as fh:
                    metadata = pq.read_metadata(fh)
        except Exception as exc:
            raise OSError(f"prediction log: could not read the footer of {key!r} under {base}: {type(exc).__name__}: {exc}") from exc
        stats.append(footer_stats(metadata, key))
    return stats
