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

if TYPE_CHECKING:
    import polars as pl


class ParquetIOManager(dg.UPathIOManager):
    """polars DataFrames as one parquet file per asset (and per partition)."""

    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            obj.write_parquet(fh)
        tmp.rename(path)  # a reader never sees a half-written file

    def load_partitions(self, context: dg.InputContext) -> Any:
        """Load many partitions; with ``allow_missing_partitions`` only those that exist (daily sources have gaps)."""
        if len(context.asset_partition_keys) <= 1 or not (context.definition_metadata or {}).get("allow_missing_partitions"):
            return super().load_partitions(context)
        paths = self._get_paths_for_partitions(context)
        return {k: self.load_from_path(context, p) for k, p in sorted(paths.items()) if p.exists()}

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pl.DataFrame:
        import polars as pl

        with path.open("rb") as fh:
            return pl.read_parquet(fh)


class JsonIOManager(dg.UPathIOManager):
    """Small records (model versions, endpoint state) as JSON, readable by people and `kiln status`."""

    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        return json.loads(path.read_text())


class ParquetIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Configurable front of :class:`ParquetIOManager`: ``base_path`` is a folder or ``s3://`` prefix."""

    base_path: str

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetIOManager:
        return ParquetIOManager(base_path=UPath(self.base_path))


class JsonIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Configurable front of :class:`JsonIOManager`."""

    base_path: str

    def create_io_manager(self, context: dg.InitResourceContext) -> JsonIOManager:
        return JsonIOManager(base_path=UPath(self.base_path))


class KilnStorage(dg.ConfigurableResource):
    """Source files and Kiln's own state folders."""

    source_root: str
    state_root: str

    def source_dir(self, relative_or_absolute: str) -> UPath:
        """The source folder of a spec: absolute paths and URLs as given, others under ``source_root``."""
        if "://" in relative_or_absolute or Path(relative_or_absolute).is_absolute():
            return UPath(relative_or_absolute)
        return UPath(self.source_root) / relative_or_absolute

    def state_dir(self, pipeline: str, kind: str) -> Path:
        """A local folder for a pipeline's runtime state (endpoints, prediction logs, checkpoints)."""
        path = Path(self.state_root) / kind / pipeline
        path.mkdir(parents=True, exist_ok=True)
        return path
