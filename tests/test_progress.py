"""`kiln simulate` reports progress per day with a rich bar; `kiln demo`'s step lines name what failed."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_simulate_shows_a_bar_and_writes_each_day(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from platform_defs.cli import main

    monkeypatch.setenv("KILN_SOURCE_ROOT", str(tmp_path))
    assert main(["simulate", "fraud", "--days", "3", "--rows-per-day", "50", "--start", "2026-01-01"]) == 0
    out = capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "fraud").glob("*.parquet"))
    assert files == ["2026-01-01.parquet", "2026-01-02.parquet", "2026-01-03.parquet"]
    assert out.count("wrote ") == 3 and "simulate fraud" in out and "3/3" in out
    assert main(["simulate", "fraud", "--days", "1", "--rows-per-day", "50"]) == 0  # continues after the newest file
    assert (tmp_path / "fraud" / "2026-01-04.parquet").exists()


def test_step_lines_name_failed_rules_errors_and_steps_never_reached() -> None:
    import dagster as dg

    from platform_defs.progress import StepOutcome, step_lines

    failures = [{"rule": "columns_match", "column": "amount", "unexpected_count": None, "unexpected_percent": 0.0,
                 "sample_values": [], "observed": "missing ['amount']"},
                {"rule": "dtype", "column": "ts", "unexpected_count": 7, "unexpected_percent": 0.47,
                 "sample_values": ["31/02/2026 25:61"] * 5, "observed": ""}]
    check = dg.AssetCheckEvaluation(asset_key=dg.AssetKey(["cards", "raw"]), check_name="schema_contract", passed=False,
                                    metadata={"failures": dg.MetadataValue.json(failures)}, severity=dg.AssetCheckSeverity.ERROR)
    outcomes = [StepOutcome("cards__raw", "FAILED", 1.23, "DagsterAssetCheckFailedError", [check]),
                StepOutcome("cards__features", "FAILED", 0.1, "ValueError: cards: no validated partitions yet")]
    assert step_lines(outcomes, "2026-01-05", planned=("cards/raw", "cards/validated")) == [
        "  FAILED     1.2s  cards/raw  [2026-01-05]",
        "                  blocking: check cards/raw:schema_contract failed",
        "                    amount: columns_match  observed missing ['amount']",
        "                    ts: dtype  7 rows (0.5%)  e.g. 31/02/2026 25:61, 31/02/2026 25:61, 31/02/2026 25:61",
        "  FAILED     0.1s  cards/features  [2026-01-05]",
        "                  error: ValueError: cards: no validated partitions yet",  # not a check: the exception itself
        "  skipped       -  cards/validated  [2026-01-05]",
    ]
