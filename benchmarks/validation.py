"""Throughput of Kiln's generated great-expectations suites on 1M rows x 20 columns.

The suites are the ones `<p>/raw` (schema: column set, row count, exact dtypes, non-nulls, null fractions) and
`<p>/validated` (quality: ranges, allowed values, key uniqueness) run, built from a 20-column spec, with
great-expectations as shipped (public API only, nothing patched). The one-off ``import great_expectations`` and
context creation are excluded (warmed up on a tiny frame first). As a baseline, the same rules are counted with plain
polars expressions in the same run (``split_rows``, what ``conform`` does: the "polars floor", a direct computation).
The same suites on 1,000 rows show GX's fixed cost (planning every expectation's metrics on every run), which no
row count amortizes away. The table also shows CPU seconds (all threads) and the load average, since the machine may
be shared.

    python benchmarks/validation.py [--rows 1000000] [--repeat 3]

Ends with ``BENCH validation rows_per_s=<n>`` (goal >= 2,000,000).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

# benchmarks/serving.py must not shadow the serving package when a script here is run directly
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CATEGORIES = {"cat_a": ["red", "green", "blue"], "cat_b": [f"b{i}" for i in range(8)], "cat_c": ["x", "y"],
              "cat_d": [f"d{i}" for i in range(20)]}


def spec_20() -> Any:
    from kiln.spec import PipelineSpec

    schema: dict[str, Any] = {"row_id": {"dtype": "str", "key": True}, "ts": {"dtype": "datetime"}}
    for i in range(7):
        schema[f"f{i}"] = {"dtype": "float", "min": -1000, "max": 1000, "nullable": i < 2}
    for i in range(5):
        schema[f"n{i}"] = {"dtype": "int", "min": 0, "max": 10_000}
    for name, values in CATEGORIES.items():
        schema[name] = {"dtype": "str", "allowed": values}
    schema["flag"] = {"dtype": "bool"}
    schema["label"] = {"dtype": "int", "min": 0, "max": 1}
    assert len(schema) == 20
    return PipelineSpec.model_validate({
        "name": "bench20", "source": {"path": "bench20"}, "schema": schema, "target": "label", "task": "classification",
        "features": {"passthrough": [f"f{i}" for i in range(7)]},
    })


def frame_20(rows: int) -> Any:
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(0)
    data: dict[str, Any] = {
        "row_id": pl.int_range(0, rows, eager=True).cast(pl.String),
        "ts": pl.datetime_range(datetime(2026, 1, 1), datetime(2026, 1, 1) + timedelta(seconds=rows - 1), "1s", eager=True),
    }
    for i in range(7):
        values = rng.normal(0, 100, rows)
        data[f"f{i}"] = pl.Series(values).set(pl.Series(rng.random(rows) < 0.01), None) if i < 2 else values
    for i in range(5):
        data[f"n{i}"] = rng.integers(0, 10_000, rows)
    for name, values in CATEGORIES.items():
        data[name] = pl.Series(rng.choice(values, rows)).cast(pl.String)
    data["flag"] = rng.random(rows) < 0.5
    data["label"] = (rng.random(rows) < 0.1).astype(np.int64)
    return pl.DataFrame(data)


CPU_S: dict[str, float] = {}  # CPU seconds of this process (all its threads) per stage, median


def timed(fn: Any, repeat: int, name: str = "") -> tuple[float, Any]:
    times, cpu, out = [], [], None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    CPU_S[name] = statistics.median(cpu)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import polars as pl

    from kiln.contracts import cast_to_spec, quality_rules, run_rules, schema_rules, split_rows

    spec = spec_20()
    frame = frame_20(args.rows)
    schema = schema_rules(spec, frame.columns)
    quality = quality_rules(spec)

    start = time.perf_counter()
    run_rules(frame.head(100), schema, "warmup", spec)  # the one-off import and ephemeral context
    import_s = time.perf_counter() - start

    typed = cast_to_spec(frame, spec)
    load_before = os.getloadavg()[0]
    schema_s, schema_failures = timed(lambda: run_rules(frame, schema, "schema", spec, arrow=True), args.repeat, "schema")
    quality_s, quality_failures = timed(lambda: run_rules(typed, quality, "quality", spec, arrow=False), args.repeat,
                                        "quality")
    assert not schema_failures and not quality_failures, (schema_failures, quality_failures)

    def polars_floor() -> Any:
        nulls = frame.select([pl.col(c).null_count() for c in spec.schema_ if not spec.schema_[c].nullable])
        return nulls, split_rows(typed, spec)

    floor_s, _ = timed(polars_floor, args.repeat, "floor")
    small, small_typed = frame.head(1000), typed.head(1000)
    fixed_s, _ = timed(lambda: (run_rules(small, schema, "schema", spec, arrow=True),
                                run_rules(small_typed, quality, "quality", spec, arrow=False)), args.repeat, "fixed")
    CPU_S["total"] = CPU_S["schema"] + CPU_S["quality"]
    gx_s = schema_s + quality_s
    rows_per_s = args.rows / gx_s
    print(f"{args.rows:,} rows x {frame.width} columns; {len(schema)} schema + {len(quality)} quality expectations; "
          f"median of {args.repeat}; {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (a loaded machine slows every row, the floor too)")
    print(f"{'stage':<40}{'seconds':>10}{'cpu s':>8}{'rows/s':>16}{'vs polars floor':>18}")
    for name, seconds, cpu in [("one-off GX import + context (excluded)", import_s, None),
                               ("GX schema suite (raw)", schema_s, CPU_S["schema"]),
                               ("GX quality suite (validated)", quality_s, CPU_S["quality"]),
                               ("GX suites total", gx_s, CPU_S["total"]),
                               ("polars floor (same rules, no GX)", floor_s, CPU_S["floor"])]:
        ratio = f"{seconds / floor_s:.1f}x" if cpu is not None else "-"
        cpu_text = f"{cpu:.3f}" if cpu is not None else "-"
        print(f"{name:<40}{seconds:>10.3f}{cpu_text:>8}{args.rows / seconds:>16,.0f}{ratio:>18}")
    print(f"GX fixed cost (both suites on 1,000 rows): {fixed_s:.3f} s wall, {CPU_S['fixed']:.3f} CPU s "
          f"({len(schema) + len(quality)} expectations)")
    print(f"BENCH validation rows_per_s={rows_per_s:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
