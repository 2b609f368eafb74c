"""`kiln`: what Dagster, MLflow and BentoML do not do for you (ARCHITECTURE.md, CLI)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from kiln import paths as kiln_paths
from kiln.settings import pipelines_dir
from kiln.spec import PipelineSpec, SpecError, load_specs


def _spec(name: str) -> PipelineSpec:
    specs = {s.name: s for s in load_specs()}
    if name not in specs:
        raise SystemExit(f"kiln: no pipeline '{name}' in {pipelines_dir()} (have: {', '.join(sorted(specs)) or 'none'})")
    return specs[name]


def cmd_validate(args: argparse.Namespace) -> int:
    from kiln.preflight import check_specs
    from kiln.spec import pipeline_name_of, spec_files

    try:
        specs = load_specs()
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    files = {pipeline_name_of(p): p for p in spec_files(pipelines_dir())}  # load_specs checked: one file per name
    errors = check_specs((s, files[s.name]) for s in specs)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"{len(errors)} problem(s) that would fail at materialization; fix them and run `kiln validate` again", file=sys.stderr)
        return 1
    for spec in specs:
        print(f"ok  {spec.name}  ({spec.task}, {spec.trainer.kind}, {len(spec.schema_)} columns)")
    print(f"{len(specs)} pipeline spec(s) valid in {pipelines_dir()}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from datetime import date

    from platform_defs.lifecycle import prepare_local_env, simulate
    from platform_defs.profiles import local_paths

    prepare_local_env()
    spec = _spec(args.pipeline)
    folder = local_paths()["sources"] / spec.source.path
    start = date.fromisoformat(args.start) if args.start else None
    if spec.source.partitions != "daily":
        written = simulate(spec, folder, args.days, args.rows_per_day, drift=args.drift, seed=args.seed, start=start)
        for path in written:
            print(f"wrote {path}")
        return 0
    from datetime import timedelta

    from platform_defs.progress import bar

    with bar(f"simulate {spec.name}", args.days) as step:
        for i in range(args.days):  # one day per call: the same files as one call, with a bar that moves
            day = start + timedelta(days=i) if start else None
            for path in simulate(spec, folder, 1, args.rows_per_day, drift=args.drift, seed=args.seed, start=day):
                step(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import dagster as dg

    from platform_defs.lifecycle import prepare_local_env, provision_tracking_store

    paths = prepare_local_env()
    provision_tracking_store()
    from platform_defs.definitions import build_definitions

    specs = [_spec(args.pipeline)] if args.pipeline else load_specs()
    if not specs:
        print(f"kiln demo: no pipeline specs in {pipelines_dir()}", file=sys.stderr)
        return 1
    defs = build_definitions(specs)
    instance = dg.DagsterInstance.get()
    print(f"kiln demo: {', '.join(s.name for s in specs)} on the Dagster instance in {instance.root_directory}", flush=True)
    failed = [spec.name for spec in specs if not _demo_pipeline(args, spec, defs, instance, paths)]
    print()
    print(f"UI: DAGSTER_HOME={paths['dagster_home']} KILN_HOME={paths['home']} .venv/bin/dagster dev -w workspace.yaml  (or: make ui)")
    print("stop the endpoints: kiln stop")
    if failed:
        print(f"kiln demo: {', '.join(failed)} had failed steps (above)", file=sys.stderr)
        return 1
    return 0


def _demo_pipeline(args: argparse.Namespace, spec: PipelineSpec, defs: Any, instance: Any, paths: dict[str, Any]) -> bool:
    """Simulate, ingest, retrain and serve one pipeline, one line per Dagster step; True when no step failed."""
    from platform_defs.lifecycle import ingest, ingest_keys, retrain, simulate, source_partitions

    def say(line: str) -> None:
        print(line, flush=True)

    folder = paths["sources"] / spec.source.path
    daily = spec.source.partitions == "daily"
    have = source_partitions(spec, folder) if daily else ingest_keys(spec, folder)
    want = args.days if daily else 1  # an unpartitioned source is one snapshot
    print()
    if len(have) < want and spec.source.simulator:
        written = simulate(spec, folder, want - len(have), args.rows_per_day, seed=args.seed)
        say(f"{spec.name}: simulated {len(written)} source file(s) into {folder}")
    keys = ingest_keys(spec, folder)
    if not keys:  # no simulator (e.g. a spec from `kiln new`) and no file yet: nothing to run on
        say(f"{spec.name}: no source files in {folder} and no source.simulator to write some; put the data there first")
        return False
    if len(have) < want and not spec.source.simulator:
        say(f"{spec.name}: {len(keys)} source file(s) in {folder} (no simulator: the demo uses the files as they are)")
    say(f"{spec.name}: ingest and validate {len(keys)} partition(s)" if spec.source.partitions == "daily"
        else f"{spec.name}: ingest and validate the snapshot")
    with quiet_stderr(say):
        results = ingest(defs, spec, keys, instance, progress=say, log_level=DEMO_LOG_LEVEL)
    passed = sum(r.success for r in results)
    if not passed:
        say(f"{spec.name}: no partition passed validation; not training")
        return False
    if passed < len(results):
        say(f"{spec.name}: {len(results) - passed} of {len(results)} partition(s) failed validation; training on the rest")
    say(f"{spec.name}: train, gate, package and serve")
    with quiet_stderr(say):
        trained = retrain(defs, spec, instance, progress=say, log_level=DEMO_LOG_LEVEL)
    if not trained.success:
        say(f"{spec.name}: the retrain run failed; the Dagster UI has the run's full logs")
        return False
    endpoint = _endpoint_state(spec)
    url = endpoint["url"]
    sample = json.dumps({"rows": json.loads((paths["state"] / kiln_paths.sample_rows_file(spec.name)).read_text())[:1]})
    say(f"{spec.name}: endpoint live at {url} serving model version {endpoint['model_version']}")
    say(f"  curl -s -X POST {url}/predict -H 'Content-Type: application/json' -d '{sample}'")
    say(f"  curl -s {url}/metadata")
    return passed == len(results)


@contextlib.contextmanager
def quiet_stderr(say: Callable[[str], None]) -> Iterator[None]:
    """Hold back what libraries print to stderr during a run (MLflow prints "Successfully registered model ..." and
    "Created version ..." unconditionally); it is shown only when the run raised, after the step lines."""
    import io

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        for line in held.getvalue().splitlines()[-40:]:
            say(f"  stderr: {line}")
        raise


# The demo prints its own line per step (with failed rules); Dagster's console log would repeat it with DEBUG events
# and stack traces. Every event is still in the run's log in the UI.
DEMO_LOG_LEVEL = "CRITICAL"


def _endpoint_state(spec: PipelineSpec) -> dict[str, Any]:
    from platform_defs.profiles import resources

    serving = resources("local")["serving"]
    state = serving.state(spec.name)
    if state is None:
        raise SystemExit(f"kiln: {spec.name} has no endpoint yet; run `kiln demo` or materialize {spec.name}/endpoint")
    return state


def cmd_serve(args: argparse.Namespace) -> int:
    import dagster as dg

    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import prepare_local_env, retrain

    prepare_local_env()
    spec = _spec(args.pipeline)
    defs = build_definitions([spec])
    result = retrain(defs, spec, dg.DagsterInstance.get(), stages=("bento", "image", "endpoint"))
    if not result.success:
        return 1
    state = _endpoint_state(spec)
    print(f"{spec.name} endpoint live at {state['url']} serving model version {state['model_version']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    import dagster as dg

    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import prepare_local_env
    from platform_defs.rollback import RollbackError, rollback

    prepare_local_env()
    spec = _spec(args.pipeline)
    try:
        done = rollback(spec, build_definitions([spec]), dg.DagsterInstance.get(), to=args.to, reason=args.reason)
    except RollbackError as exc:
        print(f"kiln rollback: {exc}", file=sys.stderr)
        return 1
    print(f"{spec.name}: champion {done['from_version']} -> {done['to_version']} by {done['user']} ({done['reason']}); "
          f"endpoint {done['endpoint_url']} serves version {done['endpoint_model_version']}")
    return 0


def status_rows() -> list[dict[str, Any]]:
    """Per pipeline: champion version and metric, endpoint URL and health, last drift decision, last retrain."""
    import dagster as dg

    from kiln.state import read_json, state_path
    from kiln.windows import last_decision, last_retrain_decision
    from platform_defs.lifecycle import prepare_local_env
    from platform_defs.profiles import initialized, resources
    from resources.serving import healthy

    paths = prepare_local_env()
    res = initialized(resources(), "mlflow", "serving")
    instance = dg.DagsterInstance.get()
    rows = []
    for spec in load_specs():
        champion = res["mlflow"].champion(spec.name)
        metric = None
        if champion is not None:
            run = res["mlflow"].client().get_run(champion.run_id)
            metric = run.data.metrics.get(spec.evaluation.metric)
        state = res["serving"].state(spec.name) or {}
        url = state.get("url")
        event = instance.get_latest_materialization_event(dg.AssetKey([spec.name, "model"]))
        state_root = str(paths["state"])
        issues = read_json(state_path(state_root, kiln_paths.source_issues_file(spec.name)))  # written by `<p>_new_data`
        rows.append(
            {
                "pipeline": spec.name,
                "champion_version": str(champion.version) if champion is not None else None,
                "metric": spec.evaluation.metric,
                "champion_metric": metric,
                "endpoint_url": url,
                "endpoint_model_version": state.get("model_version"),
                "healthy": bool(url) and healthy(str(url)),
                "last_drift": last_decision(state_root, spec.name),
                # which retrain signal fired last and why (launched, or skipped e.g. for want of new labeled rows)
                "last_retrain_decision": last_retrain_decision(state_root, spec.name),
                "last_retrain": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.timestamp)) if event else None,
                # source files not ingested ([{file, reason}]): misnamed, impossible date, two files for one day...
                "source_issues": (issues or {}).get("rejected", []),
            }
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    rows = status_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    import shutil

    from rich.console import Console
    from rich.table import Table

    cells = [_status_cells(r) for r in rows]
    # rich alone falls back to 80 columns when stdout is not a terminal; COLUMNS or the terminal decide here
    console = Console(width=shutil.get_terminal_size((120, 24)).columns, soft_wrap=False)
    table = Table(*STATUS_FIELDS)
    for row in cells:
        table.add_row(*row)
    if console.measure(table, options=console.options.update_width(10_000)).maximum <= console.width:  # unwrapped width
        console.print(table)
        return 0
    # too narrow for one row per pipeline: one block per pipeline, a field per line, long values folded
    for i, row in enumerate(cells):
        if i:
            console.print()
        block = Table(show_header=False, box=None, padding=(0, 1), title=row[0], title_justify="left", title_style="bold")
        block.add_column(no_wrap=True, style="dim")
        block.add_column(overflow="fold")
        for name, value in zip(STATUS_FIELDS[1:], row[1:], strict=True):
            block.add_row(name, value)
        console.print(block)
    return 0


STATUS_FIELDS = ("pipeline", "champion", "metric", "endpoint", "healthy", "last drift", "last retrain", "retrain decision",
                 "source issues")


def _status_cells(r: dict[str, Any]) -> list[str]:
    metric = f"{r['metric']}={r['champion_metric']:.4f}" if r["champion_metric"] is not None else "-"
    drift = r["last_drift"]["action"] if r["last_drift"] else "-"
    issues = r.get("source_issues") or []
    files = f"{len(issues)} file(s) not ingested: " + ", ".join(i["file"] for i in issues[:3]) if issues else "-"
    decision = r.get("last_retrain_decision")
    retrain = (("launched" if decision["launch"] else "skipped") + f": {decision['reason']}") if decision else "-"
    return [r["pipeline"], r["champion_version"] or "-", metric, r["endpoint_url"] or "-", "yes" if r["healthy"] else "no", drift,
            r["last_retrain"] or "-", retrain, files]


def cmd_stop(args: argparse.Namespace) -> int:
    from platform_defs.lifecycle import prepare_local_env
    from platform_defs.profiles import resources

    prepare_local_env()
    serving = resources("local")["serving"]
    names = [args.pipeline] if args.pipeline else [s.name for s in load_specs()]
    if args.pipeline and serving.state(args.pipeline) is None:
        _spec(args.pipeline)  # an unknown name is an error; a known one without an endpoint is not
    stopped = 0
    for name in names:
        record = serving.state(name)
        if record is None:
            continue
        if serving.shutdown(name):
            stopped += 1
            print(f"stopped {name}: {record.get('url')} (model version {record.get('model_version')})")
        else:
            print(f"{name}: the endpoint recorded at {record.get('url')} was no longer running; removed its record")
    if not stopped:
        print(f"no endpoint running{' for ' + args.pipeline if args.pipeline else ''}")
    return 0


def cmd_slo(args: argparse.Namespace) -> int:
    import dagster as dg

    from platform_defs.lifecycle import prepare_local_env
    from platform_defs.profiles import resources
    from platform_defs.slo import record_observation, slo_report

    paths = prepare_local_env()
    spec = _spec(args.pipeline)
    local = resources("local")
    instance = dg.DagsterInstance.get()
    report = slo_report(spec, paths, local["serving"], instance, local["mlflow"].client())
    record_observation(report, instance)  # the SLI history shows on <p>/endpoint in the UI
    print(json.dumps(report, indent=None if args.json else 2, default=str))
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kiln.spec import load_spec
    from platform_defs.infer import write_spec

    out = write_spec(args.name, Path(args.sample), pipelines_dir(), target=args.target, source_path=args.source, force=args.force)
    spec = load_spec(out)
    print(f"wrote {out}: {len(spec.schema_)} columns, target {spec.target} ({spec.task}), "
          f"key {', '.join(spec.key_columns) or 'none'}, {len(spec.feature_names)} features")
    print(f"put source files in the '{spec.source.path}' folder of the source root, then `kiln validate` (or `dg check yaml`) "
          "and `dagster dev`")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from pathlib import Path

    from platform_defs.preview import PreviewError, run

    try:
        markdown = run(args.pipeline, Path(args.spec) if args.spec else None, args.sample_rows)
    except PreviewError as exc:
        print(f"kiln preview: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(markdown, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    print(markdown)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from kiln.backtest import plot, read_days, render_markdown, run_backtest, summary_lines
    from kiln.settings import local_paths

    spec = _spec(args.pipeline)
    started = time.perf_counter()
    try:
        policy = _backtest_policy(Path(args.policy)) if args.policy else None
        with tempfile.TemporaryDirectory(prefix=f"kiln-backtest-{spec.name}-") as tmp:
            folder = local_paths()["sources"] / spec.source.path
            if args.simulate:
                from platform_defs.lifecycle import simulate

                folder = Path(tmp)
                clean = args.simulate if args.drift_from is None else max(0, min(args.drift_from, args.simulate))
                if clean:
                    simulate(spec, folder, clean, args.rows, drift=0.0, seed=args.seed)
                if args.simulate > clean:
                    simulate(spec, folder, args.simulate - clean, args.rows, drift=args.drift, seed=args.seed)
            days = read_days(spec, folder, args.start, args.end)
        drift_from = days[args.drift_from].key if args.drift_from is not None and 0 <= args.drift_from < len(days) else None
        result = run_backtest(spec, days, policy=policy, policy_label=f"policy {Path(args.policy).name}" if args.policy else None,
                              train_days=args.train_days, label_delay_days=args.label_delay_days, cooldown_days=args.cooldown_days,
                              every=args.every, window_days=args.window_days, drift_from=drift_from)
    except ValueError as exc:
        print(f"kiln backtest: {exc}", file=sys.stderr)
        return 1
    reports = local_paths()["home"] / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stem = f"backtest-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    png = plot(result, reports / f"{stem}.png")
    markdown = reports / f"{stem}.md"
    markdown.write_text(render_markdown(result, png.name), encoding="utf-8")
    print(f"wrote {markdown}")
    print(f"wrote {png}")
    print(f"{spec.name}: {len(result.days)} days ({result.days[0]}..{result.days[-1]}, {result.rows} rows"
          f"{', simulated, drift from ' + drift_from if args.simulate and drift_from else ''}) replayed in "
          f"{time.perf_counter() - started:.1f} s; realized {result.metric} per policy:")
    for line in summary_lines(result):
        print(f"  {line}")
    return 0


def _backtest_policy(path: Any) -> Any:
    """The ``retrain:`` mapping of a policy YAML file as a RetrainSpec; ValueError naming the file and field otherwise."""
    import yaml
    from pydantic import ValidationError

    from kiln.spec import RetrainSpec

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the policy file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("retrain"), dict):
        raise ValueError(f"{path}: retrain: expected a `retrain:` mapping (signals, metric, estimated_drop, ...)")
    try:
        return RetrainSpec.model_validate(data["retrain"])
    except ValidationError as exc:
        item = exc.errors()[0]
        where = ".".join(str(p) for p in ("retrain", *item["loc"]))
        got = f" (got {item['input']!r})" if item["loc"] and not isinstance(item.get("input"), (dict, list)) else ""
        raise ValueError(f"{path}: {where}: {item['msg'].removeprefix('Value error, ')}{got}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: one YAML spec per ML pipeline, raw data to a live endpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="validate every pipeline spec").set_defaults(func=cmd_validate)
    s = sub.add_parser("simulate", help="write new source data, optionally drifted")
    s.add_argument("pipeline")
    s.add_argument("--days", type=int, default=1)
    s.add_argument("--rows-per-day", type=int, default=5000)
    s.add_argument("--drift", type=float, default=0.0, help="0 = none, 1 = full covariate and concept drift")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--start", help="first day (YYYY-MM-DD); default: the day after the last file")
    s.set_defaults(func=cmd_simulate)
    d = sub.add_parser("demo", help="the whole lifecycle of every pipeline on embedded defaults, ending with live endpoints")
    d.add_argument("--pipeline", help="only this pipeline (default: every pipeline in the pipelines folder)")
    d.add_argument("--days", type=int, default=10)
    d.add_argument("--rows-per-day", type=int, default=5000)
    d.add_argument("--seed", type=int, default=42)
    d.set_defaults(func=cmd_demo)
    v = sub.add_parser("serve", help="(re)start the endpoint of a pipeline's champion")
    v.add_argument("pipeline")
    v.set_defaults(func=cmd_serve)
    n = sub.add_parser("new", help="infer a pipeline spec (<pipelines>/<name>/defs.yaml) from a CSV or parquet sample")
    n.add_argument("name")
    n.add_argument("--from", dest="sample", required=True, help="a CSV or parquet sample of the source data")
    n.add_argument("--target", help="the label column (default: guessed from its name)")
    n.add_argument("--source", help="source folder, relative to the source root or absolute (default: the name)")
    n.add_argument("--force", action="store_true", help="replace an existing spec of that name")
    n.set_defaults(func=cmd_new)
    rb = sub.add_parser("rollback", help="move the champion alias back to the previous champion and serve it")
    rb.add_argument("pipeline")
    rb.add_argument("--to", help="the model version to restore (default: the version the champion replaced)")
    rb.add_argument("--reason", help="why (stored as a tag on the restored version)")
    rb.set_defaults(func=cmd_rollback)
    pv = sub.add_parser("preview", help="train a changed spec on a sample and compare it with the champion (markdown)")
    pv.add_argument("pipeline")
    pv.add_argument("--spec", help="the changed spec file (default: the pipeline's file in the pipelines folder)")
    pv.add_argument("--out", help="also write the markdown to this file")
    pv.add_argument("--sample-rows", type=int, default=20_000, help="newest source rows to train and hold out on")
    pv.set_defaults(func=cmd_preview)
    st = sub.add_parser("status", help="champion, endpoint health, drift and retrain per pipeline")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    sp = sub.add_parser("stop", help="stop the local endpoint of one pipeline (default: of every pipeline)")
    sp.add_argument("pipeline", nargs="?")
    sp.set_defaults(func=cmd_stop)
    sl = sub.add_parser("slo", help="SLIs: availability, p95 latency, freshness, drift trend, training, CPU per 1k predictions")
    sl.add_argument("pipeline")
    sl.add_argument("--json", action="store_true", help="one line of JSON")
    sl.set_defaults(func=cmd_slo)
    bt = sub.add_parser("backtest", help="replay daily partitions and compare retrain policies (markdown + PNG under "
                        "KILN_HOME/reports; no Dagster, MLflow or BentoML)")
    bt.add_argument("pipeline")
    bt.add_argument("--from", dest="start", help="first day (YYYY-MM-DD) to replay (default: the first source file)")
    bt.add_argument("--to", dest="end", help="last day (YYYY-MM-DD) to replay (default: the last source file)")
    bt.add_argument("--policy", help="a YAML file whose `retrain:` mapping replaces the spec's policy")
    bt.add_argument("--train-days", type=int, default=7, help="days the first model is trained on")
    bt.add_argument("--label-delay-days", type=int, default=1, help="days after its day a day's labels arrive")
    bt.add_argument("--cooldown-days", type=int, default=1, help="at most one retrain per this many days")
    bt.add_argument("--every", type=int, default=7, help="the fixed-schedule policy retrains every this many days")
    bt.add_argument("--window-days", type=int, help="a retrain trains on the last this many labeled days "
                    "(default: --train-days; 0: every labeled day)")
    bt.add_argument("--simulate", type=int, metavar="DAYS", help="replay DAYS days of simulator data (spec.source.simulator) "
                    "written to a temporary folder instead of the source folder")
    bt.add_argument("--drift-from", type=int, metavar="DAY_INDEX", help="with --simulate: the first drifted day (0-based); "
                    "otherwise only marked in the report")
    bt.add_argument("--drift", type=float, default=0.8, help="with --simulate: the drift of the days from --drift-from")
    bt.add_argument("--rows", type=int, default=5000, help="with --simulate: rows per day")
    bt.add_argument("--seed", type=int, default=42)
    bt.set_defaults(func=cmd_backtest)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = parser().parse_args(argv)
    # Kiln relies on Dagster features marked beta (single-run backfill policy, data versions); saying so on every
    # command is noise for a CLI user. The UI and `dagster` commands still show Dagster's own warnings.
    warnings.filterwarnings("ignore", message=r".* is currently in beta", category=Warning)
    try:
        return int(args.func(args))
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
