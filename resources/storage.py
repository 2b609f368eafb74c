"""Where Kiln keeps data: source files, asset values (parquet / JSON) and per-pipeline state.

The local profile uses folders under ``KILN_HOME``; paths are UPath-based so the same
IO managers work on ``s3://`` prefixes in the prod profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from upath import UPath

from kiln.settings import s3_endpoint_url

if TYPE_CHECKING:
    import polars as pl

class StorageError(RuntimeError):
    """An object store operation failed; the message names the bucket and key."""


def storage_path(path: str) -> UPath:
    """A folder or ``s3://bucket/prefix`` as a UPath; S3 paths get the endpoint from the environment (moto, MinIO)."""
    if path.startswith(("s3://", "s3a://")):
        endpoint = s3_endpoint_url()
        options: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        # Fail within seconds, not minutes, when the endpoint is down; the caller's RetryPolicy retries.
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}
        return UPath(path, **options)
    return UPath(path)


def describe(path: UPath) -> str:
    """``bucket 'b', key 'k'`` for object store paths, the path itself otherwise."""
    if path.protocol in ("s3", "s3a"):
        bucket, _, key = str(path).split("://", 1)[1].partition("/")
        return f"bucket '{bucket}', key '{key}'"
    return str(path)


def _failed(action: str, path: UPath, exc: Exception) -> StorageError:
    return StorageError(f"storage: could not {action} {describe(path)}: {type(exc).__name__}: {exc}")


class ParquetIOManager(dg.UPathIOManager):
    """polars DataFrames as one parquet file per asset (and per partition).

    A step over several partitions (a single-run backfill) outputs a dict ``{partition: frame}``: one file each."""

    extension = ".parquet"

    def __init__(self, base_path: UPath) -> None:
        super().__init__(base_path=base_path)
        self.root = base_path

    def partition_paths(self, context: dg.InputContext | dg.OutputContext) -> dict[str, UPath]:
        """The file of each partition in the context (the layout UPathIOManager uses for one partition)."""
        asset = self.root / self.get_asset_relative_path(context)
        paths = {key: self.get_path_for_partition(context, asset, key) for key in context.asset_partition_keys}
        return {key: path.with_name(path.name + self.extension) for key, path in paths.items()}

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        keys = context.asset_partition_keys if context.has_asset_partitions else []
        if len(keys) <= 1:
            return super().handle_output(context, obj)
        if not isinstance(obj, dict) or set(obj) != set(keys):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise TypeError(f"{context.asset_key.to_user_string()}: a step over {len(keys)} partitions must output "
                            f"{{partition: frame}} for exactly those partitions; got {got}")
        for key, path in self.partition_paths(context).items():
            self.dump_to_path(context, obj[key], path)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(self.root / self.get_asset_relative_path(context)))})
        return None

    def dump_to_path(self, context: dg.OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if path.protocol in ("s3", "s3a"):  # an S3 PUT is atomic: readers never see half an object
            try:
                with path.open("wb") as fh:
                    obj.write_parquet(fh)
            except Exception as exc:
                if path.protocol in ("s3", "s3a"):
                    raise _failed("write", path, exc) from exc
                raise
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            obj.write_parquet(fh)
        tmp.rename(path)  # a reader never sees a half-written file

    def load_partitions(self, context: dg.InputContext) -> Any:
        """Load many partitions; with ``allow_missing_partitions`` only those that exist (daily sources have gaps)."""
        if len(context.asset_partition_keys) <= 1 or not (context.definition_metadata or {}).get("allow_missing_partitions"):
            return super().load_partitions(context)
        paths = self.partition_paths(context)
        return {k: self.load_from_path(context, p) for k, p in sorted(paths.items()) if p.exists()}

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pl.DataFrame:
        import polars as pl

        try:
            with path.open("rb") as fh:
                return pl.read_parquet(fh)
        except Exception as exc:
            if path.protocol in ("s3", "s3a"):
                raise _failed("read", path, exc) from exc
            raise


class JsonIOManager(dg.UPathIOManager):
    """Small records (model versions, endpoint state) as JSON, readable by people and `kiln status`."""

    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        try:
            if path.protocol not in ("s3", "s3a"):
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        except Exception as exc:
            if path.protocol in ("s3", "s3a"):
                raise _failed("write", path, exc) from exc
            raise

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        try:
            return json.loads(path.read_text())
        except Exception as exc:
            if path.protocol in ("s3", "s3a"):
                raise _failed("read", path, exc) from exc
            raise


class ParquetIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Configurable front of :class:`ParquetIOManager`: ``base_path`` is a folder or ``s3://`` prefix."""

    base_path: str

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetIOManager:
        return ParquetIOManager(base_path=storage_path(self.base_path))


class JsonIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Configurable front of :class:`JsonIOManager`."""

    base_path: str

    def create_io_manager(self, context: dg.InitResourceContext) -> JsonIOManager:
        return JsonIOManager(base_path=storage_path(self.base_path))


class KilnStorage(dg.ConfigurableResource):
    """Source files and Kiln's own state folders."""

    source_root: str
    state_root: str
    # Where `<p>/bento` exports bentos for image builds (``<bento_root>/bentos/<p>/...``); empty: no export (local).
    bento_root: str = ""

    def source_dir(self, relative_or_absolute: str) -> UPath:
        """The source folder of a spec: absolute paths and URLs as given, others under ``source_root``."""
        if "://" in relative_or_absolute or Path(relative_or_absolute).is_absolute():
            return storage_path(relative_or_absolute)
        return storage_path(self.source_root) / relative_or_absolute


def upload_file(local: Path, dest: UPath, sha256: str) -> None:
    """Copy a local file to ``dest`` in one PUT (readers never see half an object), its sha256 as object metadata."""
    try:
        if dest.protocol in ("s3", "s3a"):
            dest.fs.put_file(str(local), dest.path, Metadata={"sha256": sha256})
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(local.read_bytes())
            tmp.rename(dest)
    except Exception as exc:
        raise _failed("upload to", dest, exc) from exc


def stored_sha256(dest: UPath) -> str | None:
    """The sha256 metadata :func:`upload_file` stored with an S3 object; None when the object is missing or has none."""
    if dest.protocol not in ("s3", "s3a"):
        return None
    try:
        head = dest.fs.call_s3("head_object", Bucket=dest.path.partition("/")[0], Key=dest.path.partition("/")[2])
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _failed("read the metadata of", dest, exc) from exc
    return (head.get("Metadata") or {}).get("sha256")


def check_reachable(path: UPath) -> None:
    """For an ``s3://`` path, fail with a clear error naming bucket and key when the S3 API cannot be reached."""
    if getattr(path, "protocol", "") not in ("s3", "s3a"):  # plain Paths from callers are local
        return
    bucket = str(path).split("://", 1)[1].partition("/")[0]
    try:
        path.fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as exc:
        endpoint = s3_endpoint_url() or "AWS S3"
        raise StorageError(f"storage: S3 at {endpoint} unreachable or bucket missing for {describe(path)}: "
                           f"{type(exc).__name__}: {exc}") from exc
