"""The key index: which keys already reached `<p>/validated`, per partition, so a key repeated in another day's file is
caught (rule ``key_in_other_partition``) without reading every stored partition's rows.

One parquet file per validated partition under :func:`kiln.paths.key_index_dir`: for each key column ``c`` the 64-bit
polars hash ``_hash_c`` and the key itself. A check reads only the hash columns of the other partitions; a row whose
hash matches is confirmed against the stored keys of that partition (read only when some hash matched), so a hash
collision never quarantines a row. Polars hashes are stable within one polars version only: each file records the
version that hashed it, and a file from another version is re-hashed from its keys.

``folder`` is a :class:`pathlib.Path` or a ``UPath`` (``s3://``): anything with ``/``, ``glob``, ``open``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

__all__ = ["HASH_META", "key_hashes", "repeated_keys", "write_key_index"]

HASH_META = "kiln.key_hash"  # parquet metadata: the hash scheme the file's hashes were made with
_SEED = 0


def _scheme() -> str:
    import polars as pl

    return f"polars-{pl.__version__}-seed-{_SEED}"


def key_hashes(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """The index rows of a frame: each key column and its ``_hash_<column>``."""
    import polars as pl

    hashed = [pl.col(c).hash(seed=_SEED).alias(f"_hash_{c}") for c in columns]
    return frame.select([e for pair in zip([pl.col(c) for c in columns], hashed, strict=True) for e in pair])


def write_key_index(folder: Any, partition: str, frame: pl.DataFrame, columns: list[str]) -> None:
    """Store the keys of the rows of ``partition`` that reached `<p>/validated` (replacing that partition's index)."""
    import io

    from kiln.state import write_atomic

    buffer = io.BytesIO()
    key_hashes(frame, columns).write_parquet(buffer, metadata={HASH_META: _scheme()})
    write_atomic(folder / f"{partition}.parquet", buffer.getvalue())  # readers never see half an index


def _read(path: Any, columns: list[str]) -> tuple[pl.DataFrame, str | None]:
    import polars as pl

    with path.open("rb") as fh:
        scheme = pl.read_parquet_metadata(fh).get(HASH_META)
        fh.seek(0)
        return pl.read_parquet(fh, columns=columns), scheme


def repeated_keys(folder: Any, partition: str, frame: pl.DataFrame, columns: list[str],
                  pending: Mapping[str, pl.DataFrame] | None = None) -> dict[str, pl.Series]:
    """Per key column, a boolean per row of ``frame``: True where its key is stored for another partition than
    ``partition`` (its own index is what re-validating it replaces).

    ``pending``: rows of other partitions validated earlier in the same run and not stored yet (a single-run backfill);
    they count instead of those partitions' stored index."""
    import polars as pl

    found = {c: pl.Series(c, [False] * frame.height, dtype=pl.Boolean) for c in columns}
    if not columns or frame.height == 0:
        return found
    pending = {p: rows for p, rows in (pending or {}).items() if p != partition}
    for rows in pending.values():
        for c in columns:
            found[c] = found[c] | frame[c].is_in(rows[c].implode()).fill_null(False)
    if not folder.exists():
        return found
    others = sorted(p for p in folder.glob("*.parquet") if p.stem != partition and p.stem not in pending)
    if not others:
        return found
    new = key_hashes(frame, columns)
    scheme = _scheme()
    for path in others:
        stored, stored_scheme = _read(path, [f"_hash_{c}" for c in columns])
        if stored_scheme != scheme:  # hashed by another polars version: hash its keys again
            stored = key_hashes(_read(path, columns)[0], columns).select([f"_hash_{c}" for c in columns])
        keys: pl.DataFrame | None = None
        for c in columns:
            suspects = new[f"_hash_{c}"].is_in(stored[f"_hash_{c}"].implode())
            if not suspects.any():
                continue
            keys = keys if keys is not None else _read(path, columns)[0]
            confirmed = suspects & frame[c].is_in(keys[c].implode()).fill_null(False)
            found[c] = found[c] | confirmed
    return found
