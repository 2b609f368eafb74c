"""The fraud lifecycle on Dagster vs the same compute in plain Python: what the platform costs.

In a throwaway KILN_HOME (its own DAGSTER_HOME, MLflow SQLite, BentoML store and a copy of
``fraud.yaml`` on a free port) this script times, with ``platform_defs.lifecycle``:

1. simulate: write ``--days`` daily parquet files of ``--rows`` rows (reported, not compared);
2. load: import Dagster and build the definitions (what every Dagster process pays once);
3. ingest: ``platform_defs.lifecycle.ingest`` over all days, as a single-run backfill does: one run over the partition
   range materializing ``fraud/raw`` + ``fraud/validated`` (+ ``fraud/quarantine``) with their blocking
   great-expectations checks, which run inside those two steps (``ingest_runs`` counts the runs);
4. retrain: one run of features -> model -> champion -> bento -> endpoint (+ live smoke test).

Setting up the embedded services (``prepare_local_env``, ``provision_tracking_store``: the MLflow SQLite schema) is
reported and excluded, like ``simulate``. It stops the endpoint, then times the bare compute on the same files in a
fresh Python process that pays the same one-off costs: the same imports (polars, great-expectations, LightGBM), polars
read, the same GX schema and quality suites per file (``run_rules``), ``cast_to_spec`` + ``split_rows``, concat + time
sort + ``compute_features``, ``train_lightgbm`` on the ``split_holdout`` train rows, ``predict`` on the holdout, and a
plain ``bentoml serve`` of the same bento started until ``/readyz`` answers. Its wall time, from process start to
the server's ready, is the baseline. ``overhead_ratio = (load + ingest + retrain) / bare``.

Run: ``.venv/bin/python benchmarks/lifecycle.py`` (1,000,000 rows) or ``--days 2 --rows 5000`` for a
quick run. Goals are reported, never enforced; exit 1 only when a lifecycle run fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kiln.spec import spec_data

# benchmarks/serving.py must not shadow the serving package when a script here is run directly
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parent.parent
FRAUD_SPEC = REPO / "platform_defs" / "pipelines" / "fraud" / "defs.yaml"  # copied, with serving.port changed
GOAL_OVERHEAD = 2.0
GOAL_INGEST_RUNS = 1
PIPELINE = "fraud"
UPSTREAM_OF_ENDPOINT = ("features", "model", "champion", "bento")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolate(home: Path) -> Path:
    """Point every Kiln, Dagster and BentoML path at ``home`` (before any is imported); return the spec folder."""
    import yaml

    for name in ("KILN_SOURCE_ROOT", "MLFLOW_TRACKING_URI", "KILN_STATE_ROOT", "KILN_STORAGE_PREFIX"):
        os.environ.pop(name, None)
    spec_dir = home / "pipelines"
    spec_dir.mkdir(parents=True)
    data = spec_data(FRAUD_SPEC)
    data["serving"]["port"] = free_port()
    (spec_dir / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ |= {
        "KILN_PROFILE": "local",
        "KILN_HOME": str(home),
        "KILN_PIPELINES_DIR": str(spec_dir),
        "DAGSTER_HOME": str(home / "dagster"),
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    (home / "dagster").mkdir()
    return spec_dir


@dataclass
class RunTiming:
    """One Dagster run: wall seconds around ``materialize`` and seconds per step (from the event log)."""

    wall: float
    success: bool
    steps: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def outside_steps(self) -> float:
        """Run set-up, resource init, event-log writes between steps: the wall time no step accounts for."""
        return self.wall - sum(self.steps.values())


def run_timing(instance: Any, result: Any, wall: float, pipeline: str) -> RunTiming:
    """Seconds per step (STEP_START -> STEP_SUCCESS/FAILURE) of a finished run, keyed by step name sans pipeline."""
    import dagster as dg

    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    started: dict[str, float] = {}
    timing = RunTiming(wall=wall, success=bool(result.success))
    for entry in instance.all_logs(result.run_id, of_type=kinds):
        step = entry.step_key or "?"
        if entry.dagster_event_type == dg.DagsterEventType.STEP_START:
            started[step] = entry.timestamp
            continue
        name = step.removeprefix(f"{pipeline}__")
        timing.steps[name] = entry.timestamp - started.get(step, entry.timestamp)
        if entry.dagster_event_type == dg.DagsterEventType.STEP_FAILURE:
            error = entry.dagster_event.step_failure_data.error if entry.dagster_event else None
            timing.errors.append(f"{name}: {error.message.strip() if error else 'failed'}")
    return timing


@contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    into[name] = time.perf_counter() - started


def bare_compute(files: list[Path], spec: Any, bento_tag: str, model_tag: str, t: dict[str, float]) -> dict[str, Any]:
    """The lifecycle's data work without Dagster or MLflow, in this (fresh) process; fills ``t`` with seconds per stage."""
    with timed(t, "imports (polars, great-expectations, LightGBM)"):
        import great_expectations  # noqa: F401  (the one-off import the contract steps pay too)
        import polars as pl

        from kiln.contracts import AFTER_QUARANTINE, cast_to_spec, quality_rules, run_rules, schema_rules, split_rows
        from kiln.evaluation import score, split_holdout
        from kiln.features import feature_table
        from kiln.trainers.lightgbm import predict, train_lightgbm

    with timed(t, "read parquet (polars)"):
        raw = [pl.read_parquet(f) for f in files]
    with timed(t, "validate (GX schema + quality suites, conform, split)"):
        validated = []
        rules = quality_rules(spec)
        for frame in raw:
            assert not run_rules(frame, schema_rules(spec, frame.columns), "bare_schema", spec, arrow=True)
            typed = cast_to_spec(frame, spec)
            run_rules(typed, [r for r in rules if r.name not in AFTER_QUARANTINE], "bare_quality", spec, arrow=False)
            good, _ = split_rows(typed, spec)
            run_rules(good, [r for r in rules if r.name in AFTER_QUARANTINE], "bare_table", spec, arrow=False)
            validated.append(good)
    with timed(t, "featurize (concat, sort, compute_features)"):
        _, features = feature_table(validated, spec)
    train, holdout = split_holdout(features, spec)
    with timed(t, "train (train_lightgbm)"):
        booster = train_lightgbm(train, spec)
    with timed(t, "predict holdout (predict)"):
        y_pred = predict(booster, holdout, spec)
    with timed(t, "bentoml serve of the same bento, to /readyz"):
        serve_until_ready(bento_tag, model_tag)
    return {
        "rows_in": sum(f.height for f in raw),
        "rows_validated": features.height,
        "train_rows": train.height,
        "holdout_rows": holdout.height,
        "metric": spec.evaluation.metric,
        "score": score(spec.evaluation.metric, holdout[spec.target].to_numpy(), y_pred),
    }


def serve_until_ready(bento_tag: str, model_tag: str) -> None:
    """Start a plain `bentoml serve` of the bento, wait for 200 on /readyz, stop it (the endpoint step's one-off cost)."""
    import subprocess
    import urllib.request

    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="kiln-bare-serve-", dir="/tmp"))
    env = os.environ | {"KILN_MODEL_TAG": model_tag, "KILN_PREDICTION_LOG_ROOT": str(scratch / "state"),
                        "KILN_PREDICTION_LOG_SPILL_DIR": str(scratch / "spill"),
                        "KILN_WORKERS": str(os.cpu_count() or 1), "BENTOML_DO_NOT_TRACK": "True"}
    cmd = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve {bento_tag} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"bentoml serve {bento_tag}: /readyz not ready after 180 s")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        shutil.rmtree(scratch, ignore_errors=True)


def bare_child(args: argparse.Namespace) -> int:
    """``--bare-child``: run :func:`bare_compute` and print its timings as JSON (the parent times the whole process)."""
    import json

    t: dict[str, float] = {}
    from kiln.spec import load_spec

    spec = load_spec(Path(args.spec))
    facts = bare_compute([Path(f) for f in args.files], spec, args.bento, args.model_tag, t)
    print(json.dumps({"stages": t, "facts": facts}))
    return 0


def run_bare(files: list[Path], spec_file: Path, bento_tag: str, model_tag: str) -> tuple[float, dict[str, float], dict[str, Any]]:
    """Run the bare compute in a fresh Python process; (its wall seconds, seconds per stage, facts)."""
    import json
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-child", "--spec", str(spec_file), "--bento", bento_tag,
           "--model-tag", model_tag, "--files", *map(str, files)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bare compute failed ({done.returncode}):\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    stages = dict(out["stages"])
    stages["interpreter start + exit (fresh process)"] = max(wall - sum(stages.values()), 0.0)
    return wall, stages, out["facts"]


def stop_endpoint(pipeline: str) -> str:
    """Stop the pipeline's `bentoml serve` process (if any) from its recorded state; say what was done."""
    from kiln.process import pid_alive, stop_group
    from platform_defs.profiles import resources

    state = resources("local")["serving"].state(pipeline)
    if not state:
        return "no endpoint recorded"
    pid = state.get("pid")
    alive = pid_alive(pid)
    stop_group(pid)
    # stop_group() waits for the group leader only; wait for bentoml's workers too, so they do not share the CPUs.
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.2)
    return f"stopped pid {pid}" if alive else f"pid {pid} was not running"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def fmt(seconds: float) -> str:
    return f"{seconds:.2f}"


def share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def report(
    console: Console,
    args: argparse.Namespace,
    sim: float,
    provision: float,
    load: float,
    ingest_runs: list[tuple[str, RunTiming]],
    retrain_run: RunTiming,
    bare: dict[str, float],
    facts: dict[str, Any],
    model_score: str,
) -> tuple[float, float]:
    """Print the tables; return (lifecycle seconds excluding simulate, overhead ratio)."""
    ingest_wall = sum(r.wall for _, r in ingest_runs)
    lifecycle = load + ingest_wall + retrain_run.wall
    bare_total = sum(bare.values())
    ratio = lifecycle / bare_total if bare_total else float("inf")

    total_rows = args.days * args.rows
    stages = Table(title=f"{PIPELINE} lifecycle, {args.days} days x {args.rows:,} rows = {total_rows:,} source rows")
    stages.add_column("stage")
    stages.add_column("wall s", justify="right")
    stages.add_column("share", justify="right")
    stages.add_row("simulate (excluded)", fmt(sim), "")
    stages.add_row("provision MLflow SQLite store (excluded)", fmt(provision), "")
    stages.add_row("load: import dagster, build definitions", fmt(load), share(load, lifecycle))
    ingest_label = f"ingest: {len(ingest_runs)} run(s) raw+validated+checks"
    stages.add_row(ingest_label, fmt(ingest_wall), share(ingest_wall, lifecycle))
    stages.add_row("retrain: features..endpoint (+checks)", fmt(retrain_run.wall), share(retrain_run.wall, lifecycle))
    stages.add_row("[bold]lifecycle (load + ingest + retrain)[/bold]", f"[bold]{fmt(lifecycle)}[/bold]", "100%")
    stages.add_section()
    for name, seconds in bare.items():
        stages.add_row(f"bare: {name}", fmt(seconds), share(seconds, bare_total))
    stages.add_row("[bold]bare compute total (fresh process, wall)[/bold]", f"[bold]{fmt(bare_total)}[/bold]", "100%")
    stages.add_section()
    verdict = "[green]PASS[/green]" if ratio <= GOAL_OVERHEAD else "[red]MISS[/red]"
    stages.add_row(f"overhead_ratio (goal <= {GOAL_OVERHEAD})", f"{ratio:.2f}", verdict)
    runs_verdict = "[green]PASS[/green]" if len(ingest_runs) <= GOAL_INGEST_RUNS else "[red]MISS[/red]"
    stages.add_row(f"ingest_runs for {args.days} days (goal {GOAL_INGEST_RUNS})", str(len(ingest_runs)), runs_verdict)
    console.print(stages)

    steps = sorted({s for _, r in ingest_runs for s in r.steps})
    per_partition = Table(title="ingest runs: seconds per step (STEP_START -> STEP_SUCCESS)")
    per_partition.add_column("partitions")
    per_partition.add_column("run wall", justify="right")
    for s in steps:
        per_partition.add_column(s, justify="right")
    per_partition.add_column("outside steps", justify="right")
    totals: dict[str, float] = defaultdict(float)
    for partition, r in ingest_runs:
        per_partition.add_row(partition + ("" if r.success else " FAILED"), fmt(r.wall),
                              *[fmt(r.steps.get(s, 0.0)) for s in steps], fmt(r.outside_steps))
        for s in steps:
            totals[s] += r.steps.get(s, 0.0)
    n = len(ingest_runs) or 1
    per_partition.add_section()
    per_partition.add_row("mean", fmt(ingest_wall / n), *[fmt(totals[s] / n) for s in steps],
                          fmt(sum(r.outside_steps for _, r in ingest_runs) / n))
    per_partition.add_row("total", fmt(ingest_wall), *[fmt(totals[s]) for s in steps],
                          fmt(sum(r.outside_steps for _, r in ingest_runs)))
    console.print(per_partition)

    retrain_table = Table(title="retrain run: seconds per step")
    retrain_table.add_column("step")
    retrain_table.add_column("s", justify="right")
    retrain_table.add_column("share of run", justify="right")
    for s, seconds in retrain_run.steps.items():
        retrain_table.add_row(s, fmt(seconds), share(seconds, retrain_run.wall))
    retrain_table.add_row("outside steps (run set-up, event log, teardown)", fmt(retrain_run.outside_steps),
                          share(retrain_run.outside_steps, retrain_run.wall))
    retrain_table.add_row("[bold]run wall[/bold]", fmt(retrain_run.wall), "100%")
    console.print(retrain_table)

    # Where the lifecycle spends time the bare compute does not: each platform part next to its bare equivalent.
    def step_sum(runs: list[RunTiming], predicate: Callable[[str], bool]) -> float:
        return sum(sec for r in runs for s, sec in r.steps.items() if predicate(s))

    ingest_only = [r for _, r in ingest_runs]
    rs = retrain_run.steps
    rows = [
        ("load: import dagster, build definitions", load, 0.0),
        ("one-off imports (bare: polars, GX, LightGBM)", 0.0, bare["imports (polars, great-expectations, LightGBM)"]
         + bare["interpreter start + exit (fresh process)"]),
        ("ingest raw + validated steps (GX checks run in-step)", step_sum(ingest_only, lambda s: s in ("raw", "validated")),
         bare["read parquet (polars)"] + bare["validate (GX schema + quality suites, conform, split)"]),
        ("ingest other steps", step_sum(ingest_only, lambda s: s not in ("raw", "validated")), 0.0),
        ("ingest outside steps", sum(r.outside_steps for r in ingest_only), 0.0),
        ("features step", rs.get("features", 0.0), bare["featurize (concat, sort, compute_features)"]),
        ("model step (train + MLflow log/register)", rs.get("model", 0.0),
         bare["train (train_lightgbm)"] + bare["predict holdout (predict)"]),
        ("champion step (reload, re-predict, gate)", rs.get("champion", 0.0), 0.0),
        ("bento step (import model, build bento)", rs.get("bento", 0.0), 0.0),
        ("endpoint step + smoke test", step_sum([retrain_run], lambda s: s not in UPSTREAM_OF_ENDPOINT),
         bare["bentoml serve of the same bento, to /readyz"]),
        ("retrain outside steps", retrain_run.outside_steps, 0.0),
    ]
    attribution = Table(title="where the lifecycle time goes vs bare compute")
    attribution.add_column("part")
    attribution.add_column("lifecycle s", justify="right")
    attribution.add_column("bare s", justify="right")
    attribution.add_column("extra s", justify="right")
    attribution.add_column("share of extra", justify="right")
    extra_total = lifecycle - bare_total
    for name, life, base in rows:
        extra = life - base
        attribution.add_row(name, fmt(life), fmt(base) if base else "-", fmt(extra), share(extra, extra_total))
    attribution.add_row("[bold]total[/bold]", fmt(lifecycle), fmt(bare_total), fmt(extra_total), "100%")
    console.print(attribution)

    console.print(
        f"rows: {facts['rows_in']:,} in, {facts['rows_validated']:,} validated, {facts['train_rows']:,} train, "
        f"{facts['holdout_rows']:,} holdout; bare {facts['metric']}={facts['score']:.4f}, "
        f"registered model {facts['metric']}={model_score}"
    )
    return lifecycle, ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=10, help="daily source partitions (default 10)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per day (default 100,000)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep", action="store_true", help="keep the temporary KILN_HOME and print its path")
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--bento", help=argparse.SUPPRESS)
    parser.add_argument("--model-tag", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        return bare_child(args)

    console = Console(width=140)
    say: Callable[[str], None] = lambda line: console.print(line, highlight=False)  # noqa: E731
    home = Path(tempfile.mkdtemp(prefix="kiln-bench-lifecycle-"))
    try:
        spec_dir = isolate(home)
        started = time.perf_counter()
        import dagster as dg

        from kiln.spec import load_specs
        from platform_defs.definitions import build_definitions
        from platform_defs.lifecycle import ingest, prepare_local_env, provision_tracking_store, retrain, simulate, source_partitions

        (spec,) = load_specs()
        defs = build_definitions([spec])
        load = time.perf_counter() - started
        paths = prepare_local_env()
        folder = paths["sources"] / spec.source.path
        instance = dg.DagsterInstance.get()
        console.print(f"KILN_HOME={home}  port={spec.serving.port}  dagster instance={instance.root_directory}")
        provision = provision_tracking_store()  # as `kiln demo` does before its first run (prod: the MLflow server's job)
        say(f"provisioned the MLflow SQLite store in {provision:.1f}s")

        started = time.perf_counter()
        start = date.fromisoformat(spec.source.start_date)
        files = simulate(spec, folder, args.days, args.rows, seed=args.seed, start=start)
        sim = time.perf_counter() - started
        say(f"simulated {len(files)} file(s) in {sim:.1f}s")

        partitions = source_partitions(spec, folder)
        ingest_runs: list[tuple[str, RunTiming]] = []
        started = time.perf_counter()
        results = ingest(defs, spec, partitions, instance, progress=say)
        wall = time.perf_counter() - started
        for result in results:  # the wall time of several runs is shared in proportion to their own step times
            tags = result.dagster_run.tags
            label = (f"{tags['dagster/asset_partition_range_start']}..{tags['dagster/asset_partition_range_end']}"
                     if "dagster/asset_partition_range_start" in tags else tags.get("dagster/partition", "-"))
            ingest_runs.append((label, run_timing(instance, result, wall / len(results), spec.name)))
        failed = [(p, r) for p, r in ingest_runs if not r.success]
        if failed:
            for p, r in failed:
                console.print(f"[red]ingest {p} failed[/red]: {'; '.join(r.errors) or 'a blocking check failed'}")
            return 1

        started = time.perf_counter()
        result = retrain(defs, spec, instance, progress=say)
        retrain_run = run_timing(instance, result, time.perf_counter() - started, spec.name)
        if not retrain_run.success:
            console.print(f"[red]retrain failed[/red]: {'; '.join(retrain_run.errors) or 'a blocking check failed'}")
            return 1
        model_record = result.output_for_node(f"{spec.name}__model")
        model_score = f"{model_record['score']:.4f} (v{model_record['version']})"
        bento = result.output_for_node(f"{spec.name}__bento")
        del result
        # The endpoint is idle from here on, but stop it anyway so the bare compute has the CPUs to itself.
        say(f"endpoint: {stop_endpoint(spec.name)}")

        bare_wall, bare, facts = run_bare(files, spec_dir / "fraud.yaml", bento["tag"], bento["model_tag"])
        say(f"bare compute in a fresh process: {bare_wall:.1f}s")
        lifecycle, ratio = report(console, args, sim, provision, load, ingest_runs, retrain_run, bare, facts, model_score)
    finally:
        stop_endpoint(PIPELINE)
        if args.keep:
            console.print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    print(f"BENCH lifecycle seconds={lifecycle:.1f} overhead_ratio={ratio:.2f} ingest_runs={len(ingest_runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
