"""Which source files are partitions, which are not (and why), and whether a file's content changed.

A daily source holds one file per day, ``YYYY-MM-DD.<ext>``: a real calendar date within [start_date, yesterday]
(days end in UTC, as Dagster's daily partitions do), the extension matched case-insensitively (``.parquet`` or ``.pq``
for parquet, ``.csv`` for csv). Every other file is *rejected* with a reason a person can act on, so one misnamed file
is reported and never stops the others. Change detection uses the content, not the mtime: a content hash the store
already keeps (S3 ETag, ``md5``) or a sha256 of the bytes, recomputed only when the file's stat (size, mtime, ctime,
inode) moved. Pure functions over listings; the sensor and ``kiln.source`` do the I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from upath import UPath

    from kiln.spec import PipelineSpec

EXTENSIONS: dict[str, tuple[str, ...]] = {"parquet": ("parquet", "pq"), "csv": ("csv",)}
DAY_NAME = re.compile(r"\d{4}-\d{2}-\d{2}")
COMPACT_DAY = re.compile(r"(\d{4})(\d{2})(\d{2})")
HASH_CHUNK = 1 << 20  # daily files can be large: hash them 1 MiB at a time
# Object-store metadata that is a digest of the content (s3fs: ETag; gcsfs: md5Hash; adlfs: content_settings md5).
CONTENT_HASH_FIELDS = ("ETag", "etag", "md5Hash", "md5", "content_md5")
IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


@dataclass(frozen=True)
class Rejected:
    """A source file that is not ingested, and why."""

    name: str
    reason: str


@dataclass
class Listing:
    """A source folder sorted out: ``valid`` maps each partition key to its one file; ``rejected`` says why not."""

    valid: dict[str, str] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # today's files: a partition once the day is over


def extensions(fmt: str) -> tuple[str, ...]:
    """The extensions (lower case, no dot) a source of this format reads."""
    return EXTENSIONS[fmt]


def ignored(name: str) -> bool:
    """Hidden files, markers like ``_SUCCESS`` and files still being written are neither ingested nor reported."""
    return name.startswith((".", "_")) or name.lower().endswith(IN_PROGRESS_SUFFIXES)


def has_source_extension(name: str, fmt: str) -> bool:
    """Whether the name ends in one of the format's extensions, in any case (``.PARQUET``, ``.pq``)."""
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and ext.lower() in extensions(fmt)


def today_utc() -> date:
    """The current day as Dagster's daily partitions count it (UTC)."""
    return datetime.now(UTC).date()


def _day_reason(stem: str, fmt: str) -> tuple[date | None, str]:
    if not DAY_NAME.fullmatch(stem):
        compact = COMPACT_DAY.fullmatch(stem)
        hint = f" (rename it to {compact[1]}-{compact[2]}-{compact[3]}.{fmt}?)" if compact else ""
        return None, f"name '{stem}' is not a date: name a day's file YYYY-MM-DD.{fmt}{hint}"
    try:
        return date.fromisoformat(stem), ""
    except ValueError:
        return None, f"'{stem}' is not a calendar date"


def classify(names: Iterable[str], fmt: str, start: date, today: date | None = None) -> Listing:
    """Sort a daily source's file names into partitions (one file per day) and rejected files with a reason each."""
    today = today or today_utc()
    last = today - timedelta(days=1)
    allowed = ", ".join(f".{e}" for e in extensions(fmt))
    out = Listing()
    by_day: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        if ignored(name):
            continue
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem or ext.lower() not in extensions(fmt):
            shown = f"'.{ext}'" if dot and stem else "none"
            out.rejected.append(Rejected(name, f"unknown extension {shown}: this {fmt} source reads {allowed}"))
            continue
        day, reason = _day_reason(stem, fmt)
        if day is None:
            out.rejected.append(Rejected(name, reason))
        elif day < start:
            out.rejected.append(Rejected(name, f"{day} is before the first partition ({start}, source.start_date)"))
        elif day == today:
            out.pending.append(name)
        elif day > last:
            out.rejected.append(Rejected(name, f"{day} is in the future (the last partition is {last})"))
        else:
            by_day.setdefault(day.isoformat(), []).append(name)
    for key, files in sorted(by_day.items()):
        if len(files) == 1:
            out.valid[key] = files[0]
        else:
            out.rejected.extend(Rejected(n, f"two files for {key}: {', '.join(files)}; keep one") for n in files)
    out.rejected.sort(key=lambda r: r.name)
    return out


def partition_file(names: Iterable[str], fmt: str, partition: str) -> list[str]:
    """The files that hold one day, whatever the extension's case or alias (more than one: ambiguous)."""
    return sorted(n for n in names if not ignored(n) and has_source_extension(n, fmt) and n.rpartition(".")[0] == partition)


# ------------------------------------------------------------------------------------------------ fingerprints


def content_hash(info: Mapping[str, Any]) -> str | None:
    """A digest of the content that the store already keeps (S3 ETag, an md5), or None (local files)."""
    for key in CONTENT_HASH_FIELDS:
        value = info.get(key)
        if isinstance(value, bytes | bytearray):
            value = value.hex()
        if value:
            return f"{key.lower()}:{str(value).strip(chr(34))}"
    return None


def stat_key(info: Mapping[str, Any]) -> str:
    """What moves whenever a file is written, replaced or touched (ctime cannot be set back, unlike mtime)."""
    return ":".join(str(info.get(k, "")) for k in ("size", "mtime", "created", "ino", "LastModified", "last_modified"))


def sha256_of(fh: IO[bytes], chunk: int = HASH_CHUNK) -> str:
    """``sha256:<hex>`` of a stream, read in chunks."""
    digest = hashlib.sha256()
    while block := fh.read(chunk):
        digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def fingerprints(infos: Mapping[str, Mapping[str, Any]], seen: Mapping[str, Mapping[str, str]],
                 open_file: Callable[[str], IO[bytes]]) -> dict[str, dict[str, str]]:
    """``{name: {"fp": fingerprint, "stat": stat key}}`` for each listed file.

    The store's content hash when it has one; else the sha256 of the bytes, reused from ``seen`` while the stat key is
    unchanged (so a tick reads only files that were written since the last one)."""
    out = {}
    for name, info in infos.items():
        stat = stat_key(info)
        fp = content_hash(info)
        if fp is None:
            before = seen.get(name) or {}
            if before.get("stat") == stat and before.get("fp"):
                fp = before["fp"]
            else:
                with open_file(name) as fh:
                    fp = sha256_of(fh)
        out[name] = {"fp": fp, "stat": stat}
    return out


def migrate_cursor(cursor: Mapping[str, Any], infos: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """The seen files of a cursor: the current ``{"files": {name: {"fp", "stat"}}}`` form, or the old ``{name: mtime}``.

    An old entry whose file still has that mtime counts as seen (its fingerprint is taken now, marked ``"adopt"``), so
    upgrading does not re-ingest every file; any other old entry is dropped (the file is new or changed)."""
    if "files" in cursor and isinstance(cursor["files"], dict):
        return {str(k): dict(v) for k, v in cursor["files"].items()}
    out = {}
    for name, mtime in cursor.items():
        info = infos.get(name)
        if info is not None and isinstance(mtime, int | float) and info.get("mtime") == mtime:
            out[name] = {"fp": "adopt", "stat": ""}
    return out


def changed_files(current: Mapping[str, Mapping[str, str]], seen: Mapping[str, Mapping[str, str]]) -> dict[str, bool]:
    """Files whose content is new or changed: ``{name: replaces}``, ``replaces`` True when an earlier version was seen."""
    out = {}
    for name, entry in sorted(current.items()):
        before = (seen.get(name) or {}).get("fp")
        if before == "adopt":
            continue
        if before != entry["fp"]:
            out[name] = before is not None
    return out


def rejected_rows(rejected: Iterable[Rejected]) -> list[dict[str, str]]:
    """Rejected files as JSON rows (state store, `kiln status`, sensor metadata)."""
    return [{"file": r.name, "reason": r.reason} for r in rejected]


def sort_source(spec: PipelineSpec, names: list[str], today: date | None = None) -> tuple[dict[str, str], list[Rejected]]:
    """``({file: partition key or "" when unpartitioned}, rejected)`` for a source folder's file names."""
    if spec.source.partitions == "none":
        files = [n for n in names if not ignored(n)]
        allowed = ", ".join(f".{e}" for e in extensions(spec.source.format))
        return ({n: "" for n in files if has_source_extension(n, spec.source.format)},
                [Rejected(n, f"unknown extension: this {spec.source.format} source reads {allowed}")
                 for n in files if not has_source_extension(n, spec.source.format)])
    listing = classify(names, spec.source.format, date.fromisoformat(spec.source.start_date), today)
    return {f: day for day, f in listing.valid.items()}, listing.rejected


def write_source_issues(state_root: str, pipeline: str, folder: str, rows: list[dict[str, str]]) -> Path | UPath:
    """The rejected files of a pipeline's source, for `kiln status` (``kiln.paths.source_issues_file``)."""
    import json
    import time

    from kiln import paths
    from kiln.state import state_path, write_atomic

    path = state_path(state_root, paths.source_issues_file(pipeline))
    write_atomic(path, json.dumps({"folder": folder, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "rejected": rows}, indent=2))  # `kiln status` never reads half a file
    return path
