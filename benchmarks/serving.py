"""The same LightGBM model served three ways: Kiln's endpoint vs `mlflow models serve` vs a plain BentoML service.

In a throwaway KILN_HOME this script trains the fraud pipeline (``platform_defs.lifecycle``: simulate, ingest,
retrain -> a live local Kiln endpoint, one worker), then serves the champion's registered MLflow model with:

- **kiln**: ``POST /predict`` ``{"rows": [<raw input row>]}`` on the endpoint's public port: validation, feature
  code, predict, prediction log and metrics; the BENCH number;
- **mlflow**: ``mlflow models serve --env-manager local -w 1`` of ``models:/fraud/<v>``, ``dataframe_split`` of the
  already-computed feature row (so it does less work than Kiln: no validation, no feature code);
- **bentoml**: a plain BentoML service written the way BentoML's MLflow example shows: the registered model imported
  with ``bentoml.mlflow.import_model``, a ``@bentoml.service`` (one worker) that loads it with
  ``bentoml.mlflow.load_model`` and one ``@bentoml.api`` taking a pandas DataFrame (the feature row, as records) and
  returning the model's predictions; no validation, no feature code either;
- **kiln-backend** (for comparison only, not in BENCH or the goals): the champion's `bentoml serve` reached directly,
  without the local router in front, as a Kubernetes Service reaches an endpoint pod.

Before measuring, the three answers for the row are compared (the same model: the same probability to 1e-9).
Load comes from a separate process (``benchmarks/servers.py load``: aiohttp on uvloop, keep-alive connections), one
row per request. A shared
machine's speed drifts from minute to minute, so the figures come from ``--rounds`` *paired* rounds of one run each at
16 connections: kiln, mlflow and bentoml back to back for ``--seconds`` each, the ratios taken within a round. BENCH
reports the whole round with the median kiln/bentoml ratio (so its numbers divide to that median). Last, Kiln soaks
at 16 connections for ``--soak`` seconds (default 300), with the resident memory of all the endpoint's processes
before and after. Run ``.venv/bin/python benchmarks/serving.py`` (``--seconds 5 --rounds 2 --soak 20`` for a quick
look; the temporary KILN_HOME is removed at the end unless ``--keep`` or the run failed). The load generator shares
the machine's cores with the servers, so absolute numbers are a floor on a busy machine.

Goals (printed, not enforced): rps_kiln >= 4x mlflow and >= 1.5x the plain BentoML service, p99 <= 25 ms, 0 errors,
RSS growth <= 10% over the soak. The last line is
``BENCH serving rps_kiln=<n> rps_mlflow=<n> rps_bentoml=<n> p99_ms_kiln=<ms> errors=<n>`` (errors over every round and
the soak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from servers import free_port, load, stop, wait_ready  # this folder's shared helpers (before it leaves sys.path)

REPO = Path(__file__).resolve().parent.parent
# This file is named like Kiln's `serving` package: keep its folder off the import path so `serving.*` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
FRAUD_SPEC = REPO / "platform_defs" / "pipelines" / "fraud" / "defs.yaml"
CONNECTIONS = 16
SERVERS = ("kiln", "mlflow", "bentoml", "kiln-backend")
# kiln-backend: the champion's `bentoml serve` reached directly, as a Kubernetes Service reaches a pod (no local router
# there); printed for comparison, not part of BENCH or the goals.
GOALS = {"vs_mlflow": 4.0, "vs_bentoml": 1.5, "p99_ms": 25.0, "rss_growth": 0.10}
PLAIN_MODEL = "fraud-plain"

# The plain BentoML service, as BentoML's MLflow example writes one (BentoML 1.4: a typed api; pandas in, predict out).
PLAIN_SERVICE = f'''
import bentoml
import numpy as np
import pandas as pd


@bentoml.service(workers=1)
class FraudPlain:
    bento_model = bentoml.models.BentoModel("{PLAIN_MODEL}:latest")

    def __init__(self) -> None:
        self.model = bentoml.mlflow.load_model(self.bento_model)

    @bentoml.api
    def predict(self, input_df: pd.DataFrame) -> np.ndarray:
        return self.model.predict(input_df)
'''


def endpoint_processes(record: dict[str, Any] | None, port: int) -> list[Any]:
    """Kiln's endpoint processes: the pids of its endpoint record, the process on its public port, their descendants."""
    from kiln.process import recorded_processes

    return recorded_processes([record], port)


def rss_mb(procs: list[Any]) -> float:
    from kiln.process import rss_bytes

    return rss_bytes(procs) / 2**20


# ---------------------------------------------------------------------------------------------------- the benchmark
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per server in each round")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (kiln, mlflow, bentoml) at 16 connections")
    parser.add_argument("--soak", type=float, default=300.0, help="soak duration in seconds (Kiln at 16 connections)")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary KILN_HOME (servers' logs) and print its path")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1 (BENCH comes from the paired rounds)")
    home = Path(tempfile.mkdtemp(prefix="kiln-bench-serving-"))
    rc = 1
    try:
        rc = run(args, home)
    finally:  # a failed run keeps its servers' logs
        if args.keep or rc:
            print(f"kept {home}")
        else:
            import shutil

            shutil.rmtree(home, ignore_errors=True)
    return rc


def run(args: argparse.Namespace, home: Path) -> int:
    import yaml

    from kiln.spec import spec_data

    spec_dir = home / "pipelines"
    spec_dir.mkdir()
    data = spec_data(FRAUD_SPEC)
    data["serving"].update(port=free_port(), workers=1)
    (spec_dir / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("KILN_SOURCE_ROOT", "MLFLOW_TRACKING_URI", "KILN_STATE_ROOT", "KILN_STORAGE_PREFIX", "KILN_API_KEY"):
        os.environ.pop(name, None)
    os.environ |= {"KILN_PROFILE": "local", "KILN_HOME": str(home), "KILN_PIPELINES_DIR": str(spec_dir),
                   "DAGSTER_HOME": str(home / "dagster"), "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    (home / "dagster").mkdir()

    import logging

    import dagster as dg

    from kiln.features import compute_features, feature_columns
    from kiln.spec import load_spec
    from kiln.trainers.lightgbm import matrix
    from platform_defs.definitions import build_definitions
    from platform_defs.lifecycle import ingest, retrain, simulate, source_partitions
    from platform_defs.profiles import local_paths, resources
    from serving.requests import parse_body

    spec = load_spec(spec_dir / "fraud.yaml")
    defs = build_definitions([spec])
    folder = local_paths()["sources"] / spec.source.path
    print(f"training fraud on {args.days} x {args.rows} rows in {home}", flush=True)
    simulate(spec, folder, args.days, args.rows, seed=1, start=date(2026, 1, 1))
    instance = dg.DagsterInstance.get()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    ingest(defs, spec, source_partitions(spec, folder), instance)
    if not retrain(defs, spec, instance).success:
        print("retrain failed", file=sys.stderr)
        return 1
    serving = resources("local")["serving"]
    state = serving.state("fraud")
    version = state["model_version"]
    sample = json.loads((local_paths()["state"] / "reference" / "fraud" / "sample_rows.json").read_text())
    row = next(r for r in sample if all(v is not None for v in r.values()))
    features = compute_features(parse_body(json.dumps({"rows": [row]}).encode(), spec, 10), spec)
    columns = feature_columns(spec, features)
    feature_row = matrix(features, spec)[0].tolist()

    procs: list[subprocess.Popen[bytes]] = []
    tracking = resources("local")["mlflow"].tracking_uri
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking,
                         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        # mlflow models serve of the registered model
        mlflow_port = free_port()
        mlflow_log = home / "mlflow-serve.log"
        with mlflow_log.open("ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/fraud/{version}", "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_ready(f"http://127.0.0.1:{mlflow_port}/health", procs[-1], mlflow_log)

        # the plain BentoML service over the same registered model
        import bentoml
        import mlflow

        mlflow.set_tracking_uri(tracking)
        bentoml.mlflow.import_model(PLAIN_MODEL, f"models:/fraud/{version}")
        plain_dir = home / "plain_bento"
        plain_dir.mkdir()
        (plain_dir / "service.py").write_text(PLAIN_SERVICE)
        bento_port = free_port()
        bento_log = home / "bentoml-plain.log"
        with bento_log.open("ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "service:FraudPlain", "--host", "127.0.0.1", "--port", str(bento_port)],
                cwd=plain_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_ready(f"http://127.0.0.1:{bento_port}/readyz", procs[-1], bento_log)

        targets = {
            "kiln": (f"{state['url']}/predict", json.dumps({"rows": [row]}).encode()),
            "mlflow": (f"http://127.0.0.1:{mlflow_port}/invocations",
                       json.dumps({"dataframe_split": {"columns": columns, "data": [feature_row]}}).encode()),
            "bentoml": (f"http://127.0.0.1:{bento_port}/predict",
                        json.dumps({"input_df": [dict(zip(columns, feature_row, strict=True))]}).encode()),
            "kiln-backend": (f"{serving.router_config('fraud')['champion']['url']}/predict", json.dumps({"rows": [row]}).encode()),
        }
        same = same_answers(targets)
        print(f"one row, four targets: kiln {same['kiln']:.12f}, mlflow {same['mlflow']:.12f}, bentoml {same['bentoml']:.12f}, "
              f"kiln-backend {same['kiln-backend']:.12f} "
              f"({'the same model' if same['agree'] else 'ANSWERS DIFFER'})", flush=True)

        for url, body in targets.values():
            load(url, body, 4, 2.0)  # warm-up
        for i in range(args.rounds):
            rounds.append({name: load(targets[name][0], targets[name][1], CONNECTIONS, args.seconds) for name in SERVERS})
            r = rounds[-1]
            print(f"  round {i + 1}: kiln {r['kiln']['rps']:.0f} rps (p99 {r['kiln']['p99_ms']:.1f} ms), mlflow {r['mlflow']['rps']:.0f}, "
                  f"bentoml {r['bentoml']['rps']:.0f}: kiln/mlflow {r['kiln']['rps'] / r['mlflow']['rps']:.2f}x, "
                  f"kiln/bentoml {r['kiln']['rps'] / r['bentoml']['rps']:.2f}x; kiln-backend {r['kiln-backend']['rps']:.0f} rps "
                  f"(p99 {r['kiln-backend']['p99_ms']:.1f} ms)", flush=True)

        port = int(state["url"].rsplit(":", 1)[1])
        procs_before = endpoint_processes(serving.state("fraud"), port)
        rss_before = rss_mb(procs_before)
        soak = load(targets["kiln"][0], targets["kiln"][1], CONNECTIONS, args.soak)
        rss_after = rss_mb(endpoint_processes(serving.state("fraud"), port))
    finally:
        for proc in procs:
            stop(proc)
        serving.shutdown("fraud")

    report(args, rounds, soak, rss_before, rss_after, len(procs_before))
    return 0


def same_answers(targets: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    """Each server's probability for the benchmark row (the same model must give the same number)."""
    import httpx

    def first(payload: Any) -> float:
        while isinstance(payload, dict):  # {"predictions": [...]} (kiln, mlflow) or a bare list (bentoml)
            payload = payload.get("predictions", next(iter(payload.values())))
        while isinstance(payload, list):
            payload = payload[0]
        return float(payload)

    answers = {}
    for name, (url, body) in targets.items():
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        response.raise_for_status()
        answers[name] = first(response.json())
    return answers | {"agree": max(answers.values()) - min(answers.values()) <= 1e-9}


def report(args: argparse.Namespace, rounds: list[dict[str, dict[str, Any]]], soak: dict[str, Any], rss_before: float,
           rss_after: float, processes: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"One row per request, {CONNECTIONS} connections, one worker each, {args.seconds:.0f} s per run "
                        f"(paired rounds; load from a separate process)")
    for col in ("round", "server", "rps", "p50 ms", "p99 ms", "errors", "kiln / this"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for i, r in enumerate(rounds):
        for name in SERVERS:
            x = r[name]
            ratio = "-" if name == "kiln" else f"{r['kiln']['rps'] / x['rps']:.2f}x"
            table.add_row(str(i + 1), name, f"{x['rps']:.0f}", f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}", str(x["errors"]), ratio)
    Console(width=140).print(table)
    growth = (rss_after - rss_before) / rss_before if rss_before else float("nan")
    print(f"soak: {args.soak:.0f} s at {CONNECTIONS} connections: {soak['requests']} requests, {soak['rps']:.0f} rps, "
          f"p99 {soak['p99_ms']:.2f} ms, errors {soak['errors']}; RSS of the endpoint's {processes} processes "
          f"{rss_before:.0f} MB -> {rss_after:.0f} MB ({growth:+.1%})")

    # BENCH reports one whole round, the one with the median kiln/bentoml ratio, so its numbers divide to that median.
    ranked = sorted(range(len(rounds)), key=lambda i: rounds[i]["kiln"]["rps"] / rounds[i]["bentoml"]["rps"])
    chosen = ranked[len(ranked) // 2]
    middle = rounds[chosen]
    k_rps, m_rps, b_rps, k_p99 = middle["kiln"]["rps"], middle["mlflow"]["rps"], middle["bentoml"]["rps"], middle["kiln"]["p99_ms"]
    vs_mlflow = statistics.median(r["kiln"]["rps"] / r["mlflow"]["rps"] for r in rounds)
    vs_bentoml = k_rps / b_rps
    worst_p99 = max(r["kiln"]["p99_ms"] for r in rounds)
    errors = sum(r[name]["errors"] for r in rounds for name in SERVERS) + soak["errors"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"goals ({len(rounds)} paired rounds; BENCH is round {chosen + 1}, the median kiln/bentoml one):")
    print(f"  kiln/mlflow  median {vs_mlflow:.2f}x  (goal >= {GOALS['vs_mlflow']:.0f}x)    {mark(vs_mlflow >= GOALS['vs_mlflow'])}")
    print(f"  kiln/bentoml median {vs_bentoml:.2f}x  (goal >= {GOALS['vs_bentoml']}x)  {mark(vs_bentoml >= GOALS['vs_bentoml'])}")
    print(f"  p99 kiln     {k_p99:.1f} ms, worst round {worst_p99:.1f} ms  (goal <= {GOALS['p99_ms']:.0f} ms)  "
          f"{mark(k_p99 <= GOALS['p99_ms'])}")
    print(f"  errors       {errors}  (goal 0)  {mark(errors == 0)}")
    print(f"  RSS growth   {growth:+.1%} over a {args.soak:.0f} s soak  (goal <= {GOALS['rss_growth']:.0%})  "
          f"{mark(growth <= GOALS['rss_growth'])}")
    print(f"BENCH serving rps_kiln={k_rps:.0f} rps_mlflow={m_rps:.0f} rps_bentoml={b_rps:.0f} p99_ms_kiln={k_p99:.1f} errors={errors}")


if __name__ == "__main__":
    sys.exit(main())
