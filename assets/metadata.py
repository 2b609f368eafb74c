"""Dagster metadata shared by several stages: drift reference tables, inline images, column schemas, check results."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

REFERENCE_COLUMNS = (("column", "string"), ("kind", "string"), ("bins", "int"), ("bins_detail", "string"), ("proportions", "string"))


def reference_table(reference: Mapping[str, Any]) -> Any:
    """A drift reference as a Dagster table: one row per column with its bins and reference proportions."""
    import dagster as dg

    from kiln.reference import bin_edges_labels

    return dg.MetadataValue.table(
        records=[dg.TableRecord(row) for row in bin_edges_labels(reference)],
        schema=dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in REFERENCE_COLUMNS]),
    )


def inline_png(name: str, data: bytes) -> str:
    """Markdown that shows a PNG inline in the Dagster UI (metadata travels with the event, no file server needed)."""
    return f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})"


def column_schema(frame: pl.DataFrame) -> Any:
    """A Dagster ``TableSchema`` of a frame's columns and dtypes (shown in the UI, compared between materializations)."""
    import dagster as dg

    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])


def schema_change(context: Any, asset_key: Any, schema: Any) -> tuple[bool, dict[str, Any]]:
    """Compare a column schema with the asset's previous materialization: (unchanged, metadata naming what changed)."""
    event = context.instance.get_latest_materialization_event(asset_key)
    previous = None
    if event is not None and event.asset_materialization is not None:
        value = event.asset_materialization.metadata.get("dagster/column_schema")
        previous = getattr(value, "schema", None)
    if previous is None:
        return True, {"previous": "none (first materialization)"}
    before = {c.name: c.type for c in previous.columns}
    now = {c.name: c.type for c in schema.columns}
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    retyped = sorted(f"{n}: {before[n]} -> {now[n]}" for n in set(now) & set(before) if now[n] != before[n])
    changed = bool(added or removed or retyped)
    return not changed, {"added": ", ".join(added) or "none", "removed": ", ".join(removed) or "none",
                         "retyped": ", ".join(retyped) or "none"}


def check_result(check_name: str, asset_key: Any, failures: list[dict[str, Any]], rows: int, partition: str | None,
                 file: str | None) -> Any:
    """An asset-check result a person can act on: every failed rule with column, counts, samples, file and partition.

    It fails with ERROR severity (blocking) when an ``error`` rule failed, with WARN when only ``warn`` rules did."""
    import dagster as dg

    from kiln.contracts import describe, failure_table

    errors = [f for f in failures if f.get("severity", "error") == "error"]
    metadata: dict[str, Any] = {"rows": rows, "failed_rules": len(failures), "partition": partition or "none",
                                "file": file or "none"}
    if failures:
        metadata["summary"] = describe(failures)
        metadata["failures"] = dg.MetadataValue.json(failures)
        metadata["failed_rule_table"] = dg.MetadataValue.md(failure_table(failures))
    return dg.AssetCheckResult(asset_key=asset_key, check_name=check_name, passed=not failures, metadata=metadata,
                               severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN)


def batch_check_result(check_name: str, asset_key: Any, per_partition: Mapping[str, tuple[list[dict[str, Any]], int, str]]) -> Any:
    """One check result for a run over several partitions (a single-run backfill): every failed rule tagged with its
    partition and file, the failing partitions listed, rows summed. It blocks when any partition failed an error rule."""
    import dagster as dg

    from kiln.contracts import describe, failure_table

    failures = [f | {"partition": p, "file": file} for p, (fs, _, file) in per_partition.items() for f in fs]
    failing = [p for p, (fs, _, _) in per_partition.items() if fs]
    errors = [f for f in failures if f.get("severity", "error") == "error"]
    keys = sorted(per_partition)
    metadata: dict[str, Any] = {"rows": sum(rows for _, rows, _ in per_partition.values()), "failed_rules": len(failures),
                                "partition": f"{keys[0]}..{keys[-1]} ({len(keys)} partitions)" if keys else "none",
                                "failing_partitions": ", ".join(failing) or "none"}
    if failures:
        metadata["summary"] = "; ".join(f"[{p}] {describe(per_partition[p][0])}" for p in failing)
        metadata["failures"] = dg.MetadataValue.json(failures)
        metadata["failed_rule_table"] = dg.MetadataValue.md(
            "\n\n".join(f"**{p}** ({per_partition[p][2]})\n\n{failure_table(per_partition[p][0])}" for p in failing))
    return dg.AssetCheckResult(asset_key=asset_key, check_name=check_name, passed=not failures, metadata=metadata,
                               severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN)


def run_partitions(context: Any) -> list[str | None]:
    """The partitions a step covers: one key, every key of a single-run backfill's range, or ``[None]`` unpartitioned."""
    if context.has_partition_key or context.has_partition_key_range:
        return list(context.partition_keys)
    return [None]
