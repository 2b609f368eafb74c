"""The state store: what crosses a process (an asset step, a sensor, an endpoint replica) lives under ``KILN_STATE_ROOT``.

A local folder in dev, ``s3://bucket/prefix`` in prod, where each of those runs in its own pod: so nothing here appends
to a file or relies on a local path. A value is one whole object, written by a single PUT (S3) or a rename over it
(a folder), so a reader never sees half of one; a history is a folder of such objects whose keys sort in time order
(:func:`time_key`), read by listing after a cursor (:func:`list_keys`). Names are in :mod:`kiln.paths`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import settings

if TYPE_CHECKING:
    from upath import UPath

TMP_SUFFIX = ".tmp"  # a local write in progress (write_atomic's sibling): never listed


def state_upath(root: str) -> Path | UPath:
    """The state root (a folder or ``s3://bucket/prefix``): a UPath for S3, with the endpoint from :mod:`kiln.settings`,
    a plain Path for a folder (an endpoint that logs locally needs no universal_pathlib).

    Short timeouts and one attempt: a shipper that cannot reach the store spills and retries on its own schedule, and a
    reader's step has its own retries. Listings are not cached (other processes add objects all the time)."""
    if "://" not in root:
        return Path(root)
    from upath import UPath

    if root.startswith(("s3://", "s3a://")):
        endpoint = settings.s3_endpoint_url()
        options: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        options["config_kwargs"] = {"connect_timeout": 3, "read_timeout": 20, "retries": {"max_attempts": 1}}
        options["use_listings_cache"] = False
        return UPath(root, **options)
    return UPath(root)


def state_path(state_root: str, relative: str) -> Path | UPath:
    """An object (or folder) of the state store: a plain Path under a local folder, a UPath under ``s3://``.

    ``relative`` is a POSIX name from :mod:`kiln.paths`."""
    return state_upath(state_root) / relative


def is_remote(path: Any) -> bool:
    """Whether ``path`` is on an object store (no folders, no rename, no append)."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


def write_atomic(path: Any, data: str | bytes) -> None:
    """Write a whole file so that readers never see half of it: a sibling renamed over it locally, one PUT on S3."""
    payload = data.encode() if isinstance(data, str) else data
    if getattr(path, "protocol", "") in ("s3", "s3a"):  # an object store has no rename; a single PUT is atomic
        path.write_bytes(payload)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(payload)
    tmp.rename(path)


def read_json(path: Any) -> Any | None:
    """The JSON value of a state object, or None when there is none (not written yet, or removed)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except Exception as exc:  # an unreachable store: say which object, not only the client library's words
        raise OSError(f"state store: could not read {path}: {type(exc).__name__}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"state store: {path} is not JSON ({exc})") from exc


def write_json(path: Any, value: Any) -> None:
    """Replace a state object with ``value`` as JSON, whole (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(value))


def list_keys(folder: Any, after: str | None = None) -> list[str]:
    """Names of the objects in ``folder`` (a folder or prefix), sorted, strictly after ``after``; unfinished local
    writes (``*.tmp``) are skipped, and a folder that does not exist has none. One listing, no object is read."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except Exception as exc:  # an unreachable store: say which bucket and prefix, not only the client library's words
        raise OSError(f"state store: could not list {folder}: {type(exc).__name__}: {exc}") from exc
    names = sorted({p.name for p in entries if p.name and not p.name.endswith(TMP_SUFFIX)})
    return [n for n in names if after is None or n > after]


KEY_TIME_WIDTH = 17  # 10 digits of Unix seconds, a point, 6 decimals: fixed width, so the names sort in time order


def time_key(at: float, content: str) -> str:
    """``<at, zero-padded, 6 decimals>-<8 hex of content's sha256>``: names that sort in time order and differ for
    different content written at the same time (two writers never replace each other's object)."""
    if not 0 <= at < 10**10:
        raise ValueError(f"state store: time {at!r} does not fit a {KEY_TIME_WIDTH}-character key")
    return f"{at:0{KEY_TIME_WIDTH}.6f}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"
