"""The whole lifecycle on a Dagster instance: simulate -> raw..endpoint, used by `kiln demo` and benchmarks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from kiln.spec import PipelineSpec

Progress = Callable[[str], None]
RETRAIN_STAGES = ("features", "model", "champion", "bento", "image", "endpoint")
SNAPSHOT_STEM = "snapshot"  # the one file `simulate` writes for an unpartitioned source


def prepare_local_env() -> dict[str, Path]:
    """Create the local profile's folders, point DAGSTER_HOME at its own (unless already set) and give it a dagster.yaml."""
    from platform_defs.profiles import local_paths

    paths = local_paths()
    for name in ("home", "dagster_home", "sources", "storage", "state"):
        paths[name].mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KILN_HOME", str(paths["home"]))
    os.environ.setdefault("DAGSTER_HOME", str(paths["dagster_home"]))
    os.environ.setdefault("BENTOML_HOME", str(paths["bentoml"]))
    # MLflow's download bars and INFO lines would interleave with the CLI's own lines (read before mlflow is imported)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    write_instance_config(Path(os.environ["DAGSTER_HOME"]))
    return paths


LOCAL_INSTANCE_CONFIG = """\
# Written by Kiln on first use (never overwritten: edit freely). The local Dagster instance: SQLite storage in this
# folder (Dagster's default); see deploy/dagster.yaml for the prod instance.
telemetry:
  enabled: false

concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      # one retrain at a time per pipeline (the <p>_retrain job carries kiln/retrain: <p>), as in prod
      - key: kiln/retrain
        value: {applyLimitPerUniqueValue: true}
        limit: 1
"""


def write_instance_config(dagster_home: Path) -> bool:
    """Write a local ``dagster.yaml`` into DAGSTER_HOME unless one exists; True if written.

    Without it Dagster warns on every command that it found no instance configuration."""
    path = dagster_home / "dagster.yaml"
    dagster_home.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as out:  # "x": a file that appeared meanwhile is not replaced
            out.write(LOCAL_INSTANCE_CONFIG)
    except FileExistsError:
        return False
    return True


def provision_tracking_store() -> float:
    """Create the local profile's MLflow SQLite store before the first run; returns the seconds it took (~0 if it exists).

    MLflow builds a new database by replaying its schema migrations, which takes seconds. Paying that while setting up
    the embedded services (as `mlflow server` does in prod) keeps it out of the first `<p>/model` step.
    """
    from platform_defs.profiles import current_profile, resources

    if current_profile() != "local":
        return 0.0
    started = time.perf_counter()
    from mlflow import MlflowClient

    uri = resources("local")["mlflow"].tracking_uri
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models(max_results=1)
    return time.perf_counter() - started


def simulate(spec: PipelineSpec, folder: Path, days: int, rows_per_day: int, drift: float = 0.0, seed: int = 42,
             start: date | None = None) -> list[Path]:
    """Write ``days`` new daily files after the last one in the folder (or from the spec's start date).

    An unpartitioned source (``partitions: none``) gets one snapshot file instead, replacing the previous one.
    """
    from kiln.features import load_function

    if not spec.source.simulator:
        raise ValueError(f"{spec.name}: source.simulator is not set; this pipeline has no data generator")
    generate = load_function(spec.source.simulator)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.source.partitions == "none":
        if days != 1:
            raise ValueError(f"{spec.name}: the source is unpartitioned (partitions: none); simulate writes one snapshot, not {days} days")
        snapshot = folder / f"{SNAPSHOT_STEM}.{spec.source.format}"
        _write(generate(start or date.fromisoformat(spec.source.start_date), rows_per_day, seed, drift), snapshot, spec)
        return [snapshot]
    if start is None:
        existing = sorted(p.stem for p in folder.glob(f"*.{spec.source.format}"))
        start = date.fromisoformat(existing[-1]) + timedelta(days=1) if existing else date.fromisoformat(spec.source.start_date)
    last_partition = date.today() - timedelta(days=1)
    if start + timedelta(days=days - 1) > last_partition:
        raise ValueError(f"{spec.name}: {days} days from {start} run past {last_partition}, the last daily partition")
    written = []
    for i in range(days):
        day = start + timedelta(days=i)
        path = folder / f"{day.isoformat()}.{spec.source.format}"
        _write(generate(day, rows_per_day, seed, drift), path, spec)
        written.append(path)
    return written


def _write(frame: Any, path: Path, spec: PipelineSpec) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if spec.source.format == "parquet":
        frame.write_parquet(tmp)
    else:
        frame.write_csv(tmp)
    tmp.rename(path)


def _all(defs: Any) -> list[Any]:
    return [*defs.assets, *defs.asset_checks]


def run_config(log_level: str) -> dict[str, Any]:
    """Run config that sets the level of Dagster's console log (the CLI keeps it above DEBUG and prints its own lines)."""
    return {"loggers": {"console": {"config": {"log_level": log_level}}}}


# Dagster's run tags for a run over a partition range (what a single-run backfill launches).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def day_ranges(partitions: list[str]) -> list[list[str]]:
    """Daily partition keys grouped into runs of consecutive days (a range run covers every day between its ends)."""
    ranges: list[list[str]] = []
    for key in sorted(partitions):
        if ranges and date.fromisoformat(key) == date.fromisoformat(ranges[-1][-1]) + timedelta(days=1):
            ranges[-1].append(key)
        else:
            ranges.append([key])
    return ranges


def ingest(defs: Any, spec: PipelineSpec, partitions: list[str] | list[str | None], instance: Any,
           progress: Progress = print, log_level: str = "DEBUG") -> list[Any]:
    """Materialize raw + validated (and their blocking checks) for the partitions (None: unpartitioned); returns the runs
    that decided what is stored.

    Consecutive days go in one run over the partition range, as a single-run backfill does (one process, one GX
    context, one event-log write per step instead of one per day). When a blocking check fails in such a run nothing of
    it is stored, and each of its days is run alone, so the good days land and the bad ones are reported one by one.
    ``progress`` gets one line per step (see :func:`platform_defs.progress.step_lines`), failed checks' rules under it."""
    import dagster as dg

    selection = dg.AssetSelection.assets([spec.name, "raw"], [spec.name, "validated"]).required_multi_asset_neighbors()
    planned = (f"{spec.name}/raw", f"{spec.name}/validated")

    def run(partition: str | None, tags: dict[str, str]) -> Any:
        result = dg.materialize(_all(defs), selection=selection, partition_key=partition, instance=instance,
                                resources=defs.resources, raise_on_error=False, tags={"kiln/pipeline": spec.name, **tags},
                                run_config=run_config(log_level))
        report(result, instance, progress, planned)
        return result

    keys = [p for p in partitions if p is not None]
    if len(keys) < len(partitions):  # unpartitioned
        return [run(None, {})]
    results = []
    for days in day_ranges(keys):
        if len(days) == 1:
            results.append(run(days[0], {}))
            continue
        batch = run(None, {RANGE_START_TAG: days[0], RANGE_END_TAG: days[-1]})
        if batch.success:
            results.append(batch)
            continue
        # The failed range run stays in the instance's history; its days' own runs replace it in what is returned.
        progress(f"  {spec.name}: the run over {days[0]}..{days[-1]} stored nothing; ingesting its {len(days)} days one by one")
        results.extend(run(day, {}) for day in days)
    return results


def retrain(defs: Any, spec: PipelineSpec, instance: Any, progress: Progress = print, stages: tuple[str, ...] = RETRAIN_STAGES,
            log_level: str = "DEBUG") -> Any:
    """Materialize features -> model -> champion -> bento -> image -> endpoint (with their checks) in one run."""
    import dagster as dg

    selection = dg.AssetSelection.assets(*[[spec.name, s] for s in stages])
    result = dg.materialize(_all(defs), selection=selection, instance=instance, resources=defs.resources,
                            raise_on_error=False, tags={"kiln/pipeline": spec.name}, run_config=run_config(log_level))
    report(result, instance, progress, tuple(f"{spec.name}/{s}" for s in stages))
    return result


def report(result: Any, instance: Any, progress: Progress, planned: tuple[str, ...] = ()) -> None:
    """Pass a finished run's step lines to ``progress`` (``planned`` assets it never reached are listed as skipped)."""
    from platform_defs.progress import partition_label, step_lines, step_outcomes

    outcomes = step_outcomes(instance, result.run_id)
    for line in step_lines(outcomes, partition_label(dict(result.dagster_run.tags)), planned):
        progress(line)


def source_partitions(spec: PipelineSpec, folder: Path) -> list[str]:
    """Partition keys that have a valid source file (the files the new-data sensor would ingest)."""
    from datetime import date

    from kiln.partitions import classify

    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    return sorted(classify(names, spec.source.format, date.fromisoformat(spec.source.start_date)).valid)


def ingest_keys(spec: PipelineSpec, folder: Path) -> list[str | None]:
    """What `ingest` runs on: one key per daily file, or a single unpartitioned run (None) when any file exists."""
    if spec.source.partitions == "daily":
        return list(source_partitions(spec, folder))
    return [None] if any(folder.glob(f"*.{spec.source.format}")) else []
