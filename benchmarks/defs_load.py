"""How much Kiln adds to a code-location load: `import dagster` vs `import platform_defs.definitions`.

Each sample is a fresh interpreter (no warm module cache), the two commands alternate so drift in
machine load hits both alike, and the medians are compared. A separate interpreter checks that
loading the definitions imports none of the heavy ML / cloud packages (ARCHITECTURE.md,
"Performance rules"), and ``-X importtime`` names the packages Kiln pulls in beyond dagster.

Run: ``.venv/bin/python benchmarks/defs_load.py [--repeats 7]``. Exit 1 only when a heavy module
is imported; the ratio goal is reported, never enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

# benchmarks/serving.py must not shadow the serving package when a script here is run directly
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parent.parent
HEAVY = (
    "torch", "lightgbm", "mlflow", "bentoml", "great_expectations",
    "polars", "pandas", "numpy", "dagster_aws", "dagster_k8s",
)
GOAL_RATIO = 1.3
COMMANDS = {"dagster": "import dagster", "defs": "import platform_defs.definitions"}
HEAVY_PROBE = (
    "import sys, json; import platform_defs.definitions as d; "
    f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], "
    "'assets': len(list(d.defs.assets or [])), 'modules': len(sys.modules)}))"
)


def child_env(kiln_home: Path) -> dict[str, str]:
    """The environment of every probe: a throwaway KILN_HOME, the packaged specs, the local profile."""
    env = dict(os.environ)
    for name in ("KILN_PIPELINES_DIR", "KILN_SOURCE_ROOT", "MLFLOW_TRACKING_URI", "KILN_PROFILE"):
        env.pop(name, None)
    env |= {
        "KILN_HOME": str(kiln_home),
        "DAGSTER_HOME": str(kiln_home / "dagster"),
        "BENTOML_HOME": str(kiln_home / "bentoml"),
        "PYTHONWARNINGS": "ignore",
    }
    return env


def run_python(code: str, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` in the repository root; raise with stderr if it fails."""
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"defs_load: `python -c {code!r}` exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def time_import(code: str, env: dict[str, str]) -> float:
    """Wall seconds of one fresh interpreter running ``code`` (interpreter start-up included)."""
    started = time.perf_counter()
    run_python(code, env)
    return time.perf_counter() - started


def import_self_times(code: str, env: dict[str, str]) -> dict[str, float]:
    """Self seconds (module body, children excluded) of every module ``code`` imports, from ``-X importtime``."""
    stderr = run_python(code, env, "-X", "importtime").stderr
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if line.startswith("import time:") and len(parts) == 3 and parts[0].isdigit():
            out[parts[2]] = int(parts[0]) / 1e6
    return out


def added_by_package(baseline: dict[str, float], with_defs: dict[str, float]) -> list[tuple[float, int, str]]:
    """Modules the definitions import beyond ``import dagster``, as (self seconds, modules, package), largest first."""
    totals: dict[str, tuple[float, int]] = {}
    for module, seconds in with_defs.items():
        if module in baseline:
            continue
        package = module.split(".")[0]
        s, n = totals.get(package, (0.0, 0))
        totals[package] = (s + seconds, n + 1)
    return sorted(((s, n, p) for p, (s, n) in totals.items()), reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh interpreters per command (default 7)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kiln-defs-load-") as tmp:
        env = child_env(Path(tmp))
        # One untimed run of each warms the OS file cache and writes .pyc files.
        for code in COMMANDS.values():
            run_python(code, env)
        samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for i in range(args.repeats):
            order = list(COMMANDS) if i % 2 == 0 else list(reversed(COMMANDS))
            for name in order:
                samples[name].append(time_import(COMMANDS[name], env))
        probe = json.loads(run_python(HEAVY_PROBE, env).stdout.strip().splitlines()[-1])
        baseline = import_self_times(COMMANDS["dagster"], env)
        added_modules = added_by_package(baseline, import_self_times(COMMANDS["defs"], env))

    med = {name: statistics.median(values) for name, values in samples.items()}
    added = med["defs"] - med["dagster"]
    ratio = med["defs"] / med["dagster"]
    heavy: list[str] = probe["heavy"]

    console = Console(width=120)
    table = Table(title=f"Definitions load, {args.repeats} fresh interpreters each (alternating)")
    for col in ("python -c", "median s", "min s", "max s", "samples s"):
        table.add_column(col, justify="left" if col in ("python -c", "samples s") else "right")
    for name, code in COMMANDS.items():
        values = samples[name]
        table.add_row(code, f"{med[name]:.3f}", f"{min(values):.3f}", f"{max(values):.3f}",
                      " ".join(f"{v:.2f}" for v in values))
    console.print(table)

    summary = Table(title="Kiln's share of the load", show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("Kiln-added seconds (median defs - median dagster)", f"{added:+.3f}")
    summary.add_row("ratio median(defs) / median(dagster)", f"{ratio:.3f}")
    summary.add_row(f"goal ratio <= {GOAL_RATIO}", "[green]PASS[/green]" if ratio <= GOAL_RATIO else "[red]MISS[/red]")
    summary.add_row("heavy modules after load", ", ".join(heavy) if heavy else "[green]none[/green]")
    summary.add_row("assets defined / modules loaded", f"{probe['assets']} / {probe['modules']}")
    console.print(summary)

    if added_modules:
        top = Table(title="Imported beyond `import dagster` (-X importtime, self s)")
        top.add_column("package")
        top.add_column("modules", justify="right")
        top.add_column("self s", justify="right")
        for seconds, count, name in added_modules[:12]:
            top.add_row(name, str(count), f"{seconds:.3f}")
        rest = added_modules[12:]
        if rest:
            top.add_row(f"({len(rest)} more)", str(sum(n for _, n, _ in rest)), f"{sum(s for s, _, _ in rest):.3f}")
        total_s = sum(s for s, _, _ in added_modules)
        top.add_row("[bold]total[/bold]", str(sum(n for _, n, _ in added_modules)), f"{total_s:.3f}")
        console.print(top)

    print(f"BENCH defs_load seconds={med['defs']:.3f} ratio={ratio:.3f}")
    return 1 if heavy else 0


if __name__ == "__main__":
    sys.exit(main())
