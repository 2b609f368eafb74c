"""Dagster metadata shared by several stages: tables of drift references and inline images."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

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
