"""Kiln's label-free performance estimate (``kiln/performance.py``) vs NannyML's CBPE on data bundled with NannyML.

Data (both bundled with NannyML; analysis labels come separately and are joined on ``id``):

- ``car_loan`` (default): ``load_synthetic_car_loan_dataset()`` -- 50k reference and 50k analysis rows, synthetic,
  scores rounded to 2 decimals (101 distinct values), target ``repaid``;
- ``us_census``: ``load_us_census_ma_employment_data()`` -- ACS employment of Massachusetts, reference 2015 (68,785
  rows), analysis 2016-2018 (208,892 rows), continuous scores, target ``employed``.

Each is exported once from the NannyML environment to parquet as ``y_pred_proba``, ``y_pred``, ``y_true``; both sides
read the same files.

Per window of ``--chunk-size`` consecutive analysis rows (NannyML's ``chunk_size``, the same rows): realized ROC AUC
from the true labels (sklearn ``roc_auc_score``), Kiln's estimate with its band, NannyML's estimate. Timing is
estimation only, measured inside each process (no interpreter start, imports or parquet reads): Kiln =
``fit_calibration`` on the reference + ``score_histogram`` and ``estimate_performance`` per window; NannyML =
``CBPE.fit(reference)`` + ``CBPE.estimate(analysis)``. Both produce all five metrics (ROC AUC, accuracy, precision,
recall, F1) so the work matches; NannyML's time with ROC AUC alone is printed too. Each side's time is the best of
``--repeats`` runs.

NannyML stays out of Kiln's environment (0.13 pins lightgbm < 4.6 and plotly < 6, and imports statsmodels without
declaring it), so it lives in its own one (Python 3.11; pandas < 3 as for Evidently):

    python3 -m venv benchmarks/.venv-nannyml
    benchmarks/.venv-nannyml/bin/pip install "nannyml==0.13.1" "pandas>=2.2,<3" statsmodels pyarrow
    .venv/bin/python benchmarks/performance.py [--dataset car_loan|us_census] [--chunk-size 5000] \
        [--nannyml-python benchmarks/.venv-nannyml/bin/python]

Ends with ``BENCH performance within_002_share=<s> mean_abs_diff_vs_nannyml=<d> speedup_vs_nannyml=<x>`` (goals, reported
not enforced: s >= 0.9, d <= 0.01, x >= 20). Exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/serving.py must not shadow the serving package when a script here is run directly
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# --dataset: NannyML loader and its (score, prediction, target) columns
DATASETS = {"car_loan": ("load_synthetic_car_loan_dataset", "y_pred_proba", "y_pred", "repaid"),
            "us_census": ("load_us_census_ma_employment_data", "predicted_probability", "prediction", "employed")}

EXPORT_SCRIPT = r"""
import sys
import nannyml as nml
reference, analysis, targets = getattr(nml, sys.argv[3])()
names = dict(zip(["y_pred_proba", "y_pred", "y_true"], sys.argv[4:7]))
analysis = analysis.merge(targets, on="id", how="left", validate="one_to_one")
assert analysis[names["y_true"]].notna().all(), "analysis rows without a target"
for frame, path in ((reference, sys.argv[1]), (analysis, sys.argv[2])):
    frame = frame[list(names.values())].rename(columns={v: k for k, v in names.items()})
    frame["y_true"] = frame["y_true"].astype("int64")
    frame.to_parquet(path, index=False)
print(len(reference), len(analysis))
"""

NANNYML_SCRIPT = r"""
import json, sys, time
import pandas as pd
import nannyml as nml
reference = pd.read_parquet(sys.argv[1])
analysis = pd.read_parquet(sys.argv[2]).drop(columns=["y_true"])  # estimation sees no labels
chunk_size, repeats = int(sys.argv[3]), int(sys.argv[4])

def run(metrics):
    started = time.perf_counter()
    estimator = nml.CBPE(y_pred_proba="y_pred_proba", y_pred="y_pred", y_true="y_true", metrics=metrics,
                         chunk_size=chunk_size, problem_type="classification_binary")
    estimator.fit(reference)
    result = estimator.estimate(analysis)
    return time.perf_counter() - started, result

times_all, times_auc = [], []
for _ in range(repeats):
    seconds, result = run(["roc_auc", "accuracy", "precision", "recall", "f1"])
    times_all.append(seconds)
    times_auc.append(run(["roc_auc"])[0])
df = result.filter(period="analysis").to_df()
chunks = []
for _, row in df.iterrows():
    chunks.append({"start": int(row[("chunk", "start_index")]), "end": int(row[("chunk", "end_index")]),
                   "roc_auc": float(row[("roc_auc", "value")]),
                   "lower": float(row[("roc_auc", "lower_confidence_boundary")]),
                   "upper": float(row[("roc_auc", "upper_confidence_boundary")])})
print(json.dumps({"seconds": min(times_all), "seconds_roc_auc_only": min(times_auc), "version": nml.__version__,
                  "chunks": chunks}))
"""


def run_python(python: str, script: str, *args: str) -> str:
    """Run ``script`` in another interpreter; its last stdout line."""
    done = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"NannyML run failed ({python}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def kiln_estimates(reference: Any, analysis: Any, chunk_size: int, repeats: int) -> tuple[float, list[dict[str, Any]]]:
    """Kiln: calibrate on the reference, then histogram + estimate per window; best time of ``repeats``."""
    import numpy as np

    from kiln.performance import estimate_performance, fit_calibration, score_histogram

    ref_scores = reference["y_pred_proba"].to_numpy()
    ref_labels = reference["y_true"].to_numpy()
    scores = analysis["y_pred_proba"].to_numpy()
    bounds = [(s, min(s + chunk_size, len(scores))) for s in range(0, len(scores), chunk_size)]
    times: list[float] = []
    estimates: list[dict[str, Any]] = []
    for _ in range(repeats):
        started = time.perf_counter()
        calibration = fit_calibration(ref_scores, ref_labels)
        estimates = [estimate_performance(calibration, score_histogram(calibration, scores[a:b])) for a, b in bounds]
        times.append(time.perf_counter() - started)
    assert np.isfinite(times).all()
    return min(times), [{"start": a, "end": b - 1, **e["metrics"]["roc_auc"]} for (a, b), e in zip(bounds, estimates,
                                                                                                  strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="car_loan")
    parser.add_argument("--chunk-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nannyml-python", default=str(ROOT / "benchmarks" / ".venv-nannyml" / "bin" / "python"))
    args = parser.parse_args()

    import polars as pl
    from sklearn.metrics import roc_auc_score

    with tempfile.TemporaryDirectory(prefix="kiln-bench-performance-") as tmp:
        ref_path, ana_path = Path(tmp) / "reference.parquet", Path(tmp) / "analysis.parquet"
        run_python(args.nannyml_python, EXPORT_SCRIPT, str(ref_path), str(ana_path), *DATASETS[args.dataset])
        reference = pl.read_parquet(ref_path)
        analysis = pl.read_parquet(ana_path)
        kiln_estimates(reference.head(2000), analysis.head(2000), args.chunk_size, 1)  # warm up imports
        kiln_s, kiln_chunks = kiln_estimates(reference, analysis, args.chunk_size, args.repeats)
        nml_out = json.loads(run_python(args.nannyml_python, NANNYML_SCRIPT, str(ref_path), str(ana_path),
                                        str(args.chunk_size), str(args.repeats)))

    nml_chunks = nml_out["chunks"]
    if [(c["start"], c["end"]) for c in nml_chunks] != [(c["start"], c["end"]) for c in kiln_chunks]:
        raise SystemExit(f"chunks differ: NannyML {[(c['start'], c['end']) for c in nml_chunks]} vs Kiln "
                         f"{[(c['start'], c['end']) for c in kiln_chunks]}")
    scores = analysis["y_pred_proba"].to_numpy()
    labels = analysis["y_true"].to_numpy().astype(int)
    rows = []
    for k, n in zip(kiln_chunks, nml_chunks, strict=True):
        a, b = k["start"], k["end"] + 1
        realized = float(roc_auc_score(labels[a:b], scores[a:b]))
        rows.append((a, b, realized, k, n))

    print(f"NannyML {nml_out['version']} {args.dataset} data: {len(reference):,} reference rows, {len(analysis):,} analysis "
          f"rows, windows of {args.chunk_size:,}")
    print(f"{'rows':>13}{'realized':>10}{'kiln':>9}{'kiln band':>19}{'in':>4}{'nannyml':>9}{'nannyml band':>19}"
          f"{'|k-r|':>8}{'|k-n|':>9}")
    within = diffs = covered = 0.0
    for a, b, realized, k, n in rows:
        inside = k["lower"] <= realized <= k["upper"]
        covered += inside
        within += abs(k["value"] - realized) <= 0.02
        diffs += abs(k["value"] - n["roc_auc"])
        print(f"{a:>6}-{b:<6}{realized:>10.4f}{k['value']:>9.4f}   [{k['lower']:.4f}, {k['upper']:.4f}]"
              f"{'y' if inside else 'n':>4}{n['roc_auc']:>9.4f}   [{n['lower']:.4f}, {n['upper']:.4f}]"
              f"{abs(k['value'] - realized):>8.4f}{abs(k['value'] - n['roc_auc']):>9.5f}")
    share = within / len(rows)
    mean_diff = diffs / len(rows)
    nml_abs = sum(abs(n["roc_auc"] - r) for _, _, r, _, n in rows) / len(rows)
    kiln_abs = sum(abs(k["value"] - r) for _, _, r, k, _ in rows) / len(rows)
    speedup = nml_out["seconds"] / kiln_s
    print()
    print(f"mean |estimate - realized| ROC AUC: Kiln {kiln_abs:.4f}, NannyML {nml_abs:.4f}; "
          f"Kiln band covers realized in {int(covered)}/{len(rows)} windows")
    print(f"time (best of {args.repeats}, estimation only): Kiln {kiln_s * 1000:.1f} ms, NannyML {nml_out['seconds']:.3f} s "
          f"(all five metrics), {nml_out['seconds_roc_auc_only']:.3f} s (ROC AUC only; speedup "
          f"{nml_out['seconds_roc_auc_only'] / kiln_s:.1f}x)")
    goals = {"within_002_share >= 0.9": share >= 0.9, "mean_abs_diff_vs_nannyml <= 0.01": mean_diff <= 0.01,
             "speedup_vs_nannyml >= 20": speedup >= 20}
    print("goals: " + ", ".join(f"{g} {'met' if ok else 'MISSED'}" for g, ok in goals.items()))
    print(f"BENCH performance within_002_share={share:.3f} mean_abs_diff_vs_nannyml={mean_diff:.5f} "
          f"speedup_vs_nannyml={speedup:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
