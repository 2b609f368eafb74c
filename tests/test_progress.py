"""`kiln simulate` reports progress per day with a rich bar and writes the same files as before."""

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
