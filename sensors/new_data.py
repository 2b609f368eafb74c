"""`<p>_new_data`: a new or changed source file launches ingestion of its day.

Which files are partitions and whether a file changed is decided in `kiln.partitions`: a file whose name is not a day
(``20260210.parquet``, ``2026-02-30.parquet``, ``latest.parquet``) is reported, never ingested and never blocks the
others; a change is a change of content (a same-mtime replacement is re-ingested, a touch is not). The rejected files
are logged, recorded as an observation of `<p>/raw` (a ``rejected_files`` table, when the set changes) and written to
the state store for `kiln status`.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from kiln import partitions as parts
from kiln import paths
from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    import dagster as dg
    from upath import UPath

SKIP_LISTED = 5  # rejected files named in a skip reason; the rest are in the observation and `kiln status`


def list_files(folder: UPath) -> dict[str, dict[str, Any]]:
    """``{file name: fsspec info}`` of the files directly in a source folder, listed afresh (no cached listing)."""
    entries = folder.fs.ls(folder.path, detail=True, refresh=True)
    return {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") == "file"}


def _rejected_observation(raw_key: Any, rows: list[dict[str, str]], folder: UPath) -> dg.AssetObservation:
    import dagster as dg

    schema = dg.TableSchema(columns=[dg.TableColumn("file", "string"), dg.TableColumn("reason", "string")])
    return dg.AssetObservation(
        asset_key=raw_key,
        description=(f"{len(rows)} source file(s) in {folder} are not ingested" if rows else f"every file in {folder} is ingested"),
        metadata={"rejected_files": dg.MetadataValue.table([dg.TableRecord(r) for r in rows], schema=schema),
                  "rejected_count": len(rows), "source": str(folder)})


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _skip_reason(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "no new source files"
    named = "; ".join(f"{r['file']} ({r['reason']})" for r in rows[:SKIP_LISTED])
    more = f"; and {len(rows) - SKIP_LISTED} more" if len(rows) > SKIP_LISTED else ""
    return f"no new source files; {len(rows)} file(s) not ingested (see the rejected_files of the raw asset): {named}{more}"


def build(spec: PipelineSpec, ingest_job: Any) -> dg.SensorDefinition:
    """The `<p>_new_data` sensor."""
    import dagster as dg

    from kiln.keys import key

    raw_key = dg.AssetKey(key(spec.name, "raw"))

    @dg.sensor(
        name=f"{spec.name}_new_data",
        job=ingest_job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Ingests each new or changed {spec.source.format} file under {spec.source.path}; reports misnamed files.",
        required_resource_keys={"storage"},
    )
    def new_data(context) -> Any:
        storage = context.resources.storage
        folder = storage.source_dir(spec.source.path)
        if not folder.exists():
            return dg.SkipReason(f"source folder {folder} does not exist yet")
        infos = list_files(folder)
        cursor = json.loads(context.cursor) if context.cursor else {}
        accepted, rejected = parts.sort_source(spec, sorted(infos))
        seen = parts.migrate_cursor(cursor, infos)
        current = parts.fingerprints({n: infos[n] for n in accepted}, seen, lambda n: (folder / n).open("rb"))
        changed = parts.changed_files(current, seen)
        rows = parts.rejected_rows(rejected)
        events: list[Any] = []
        if rows != cursor.get("rejected"):
            parts.write_source_issues(storage.state_root, spec.name, str(folder), rows)
            if rows or cursor.get("rejected"):  # a first tick with nothing wrong records nothing
                events.append(_rejected_observation(raw_key, rows, folder))
            for r in rows:
                context.log.warning(f"{spec.name}: source file {folder / r['file']} is not ingested: {r['reason']}")
        for name, replaces in changed.items():
            if replaces and accepted[name]:
                context.log.warning(f"{spec.name}: {name} replaces an ingested day ({accepted[name]}, content changed): raw and "
                                    "validated re-run together; if the new file fails a blocking check both keep the previous data")
                events.append(dg.AssetObservation(asset_key=raw_key, partition=accepted[name], metadata={
                    "source_file": name, "replaces": "an ingested day", "fingerprint": current[name]["fp"]}))
        new_cursor = json.dumps({"files": current, "rejected": rows})
        if not changed:
            return dg.SensorResult(skip_reason=_skip_reason(rows), cursor=new_cursor, asset_events=events)
        if spec.source.partitions == "none":
            # An unpartitioned source is read whole: any new or changed file means one run over all of them.
            digest = hashlib.sha256("|".join(f"{n}:{current[n]['fp']}:{current[n]['stat']}" for n in changed).encode()).hexdigest()
            requests = [dg.RunRequest(run_key=f"all:{digest[:32]}", tags={paths.SOURCE_FILE_TAG: ",".join(changed)[:200]})]
        else:
            # The stat in the key: content that comes back (A, B, then A again) is a new run, not a duplicate key.
            requests = [dg.RunRequest(run_key=f"{name}:{current[name]['fp']}:{_short(current[name]['stat'])}",
                                      partition_key=accepted[name], tags={paths.SOURCE_FILE_TAG: name})
                        for name in changed]
        return dg.SensorResult(run_requests=requests, cursor=new_cursor, asset_events=events)

    return new_data
