"""`<p>_new_data`: a new or changed source file launches ingestion of its day."""

from __future__ import annotations

import json
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg


def pending_files(listing: dict[str, float], cursor: dict[str, float], start: date, today: date) -> list[tuple[str, float]]:
    """Files (``YYYY-MM-DD.<ext>``, mtime) that are new or changed since the cursor and name an existing partition."""
    out = []
    for name, mtime in sorted(listing.items()):
        stem = name.split(".", 1)[0]
        try:
            day = date.fromisoformat(stem)
        except ValueError:
            continue
        if day < start or day > today - timedelta(days=1):
            continue  # no daily partition for it (yet)
        if cursor.get(name) != mtime:
            out.append((name, mtime))
    return out


def build(spec: PipelineSpec, ingest_job: Any) -> dg.SensorDefinition:
    """The `<p>_new_data` sensor."""
    import dagster as dg

    @dg.sensor(
        name=f"{spec.name}_new_data",
        job=ingest_job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Ingests each new or changed {spec.source.format} file under {spec.source.path}.",
        required_resource_keys={"storage"},
    )
    def new_data(context) -> Any:
        folder = context.resources.storage.source_dir(spec.source.path)
        if not folder.exists():
            return dg.SkipReason(f"source folder {folder} does not exist yet")
        listing = {p.name: p.stat().st_mtime for p in folder.glob(f"*.{spec.source.format}")}
        cursor = json.loads(context.cursor) if context.cursor else {}
        if spec.source.partitions == "none":
            # An unpartitioned source is read whole: any new or changed file means one run over all of them.
            changed = {n: m for n, m in sorted(listing.items()) if cursor.get(n) != m}
            if not changed:
                return dg.SkipReason("no new source files")
            context.update_cursor(json.dumps(cursor | changed))
            run_key = "|".join(f"{n}:{m}" for n, m in changed.items())
            return [dg.RunRequest(run_key=run_key, tags={"kiln/source_file": ",".join(changed)[:200]})]
        todo = pending_files(listing, cursor, date.fromisoformat(spec.source.start_date), date.today())
        if not todo:
            return dg.SkipReason("no new source files")
        requests = [
            dg.RunRequest(run_key=f"{name}:{mtime}", partition_key=name.split(".", 1)[0], tags={"kiln/source_file": name})
            for name, mtime in todo
        ]
        context.update_cursor(json.dumps(cursor | dict(todo)))
        return requests

    return new_data
