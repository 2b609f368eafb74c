"""Source listings sorted into partitions and rejected files; content fingerprints for change detection."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

import pytest

from kiln.partitions import (
    changed_files,
    classify,
    content_hash,
    fingerprints,
    migrate_cursor,
    partition_file,
    sha256_of,
)

START = date(2026, 1, 1)
TODAY = date(2026, 3, 1)


def _reasons(names: list[str], fmt: str = "parquet") -> dict[str, str]:
    return {r.name: r.reason for r in classify(names, fmt, START, TODAY).rejected}


def test_issue_files_are_rejected_with_a_reason_and_do_not_hide_good_ones() -> None:
    listing = classify(["2026-02-10.parquet", "20260210.parquet", "latest.parquet", "2026-02-30.parquet",
                        "2026-01-18.fixed.parquet", "notes.txt", "README"], "parquet", START, TODAY)
    assert listing.valid == {"2026-02-10": "2026-02-10.parquet"}
    reasons = {r.name: r.reason for r in listing.rejected}
    assert set(reasons) == {"20260210.parquet", "latest.parquet", "2026-02-30.parquet", "2026-01-18.fixed.parquet",
                            "notes.txt", "README"}
    assert "not a date" in reasons["20260210.parquet"] and "2026-02-10.parquet" in reasons["20260210.parquet"]
    assert "not a date" in reasons["latest.parquet"] and "YYYY-MM-DD.parquet" in reasons["latest.parquet"]
    assert "not a calendar date" in reasons["2026-02-30.parquet"]
    assert "not a date" in reasons["2026-01-18.fixed.parquet"]
    assert "unknown extension '.txt'" in reasons["notes.txt"] and ".parquet, .pq" in reasons["notes.txt"]
    assert "unknown extension none" in reasons["README"]


def test_extensions_in_any_case_and_pq_are_partitions() -> None:
    listing = classify(["2026-02-12.PARQUET", "2026-02-13.pq", "2026-02-14.Pq", "2026-02-15.csv"], "parquet", START, TODAY)
    assert listing.valid == {"2026-02-12": "2026-02-12.PARQUET", "2026-02-13": "2026-02-13.pq", "2026-02-14": "2026-02-14.Pq"}
    assert [r.name for r in listing.rejected] == ["2026-02-15.csv"]
    csv = classify(["2026-02-12.CSV", "2026-02-13.pq"], "csv", START, TODAY)
    assert csv.valid == {"2026-02-12": "2026-02-12.CSV"} and [r.name for r in csv.rejected] == ["2026-02-13.pq"]


def test_the_partition_range_is_start_date_to_yesterday_today_waits() -> None:
    listing = classify(["2025-12-31.parquet", "2026-01-01.parquet", "2026-02-28.parquet", "2026-03-01.parquet",
                        "2026-03-02.parquet"], "parquet", START, TODAY)
    assert listing.valid == {"2026-01-01": "2026-01-01.parquet", "2026-02-28": "2026-02-28.parquet"}
    assert listing.pending == ["2026-03-01.parquet"]  # a partition once the day is over: not an error
    reasons = {r.name: r.reason for r in listing.rejected}
    assert "before the first partition (2026-01-01" in reasons["2025-12-31.parquet"]
    assert "in the future" in reasons["2026-03-02.parquet"]


def test_two_files_for_one_day_reject_both() -> None:
    listing = classify(["2026-02-12.parquet", "2026-02-12.pq", "2026-02-13.parquet"], "parquet", START, TODAY)
    assert listing.valid == {"2026-02-13": "2026-02-13.parquet"}
    assert {r.name for r in listing.rejected} == {"2026-02-12.parquet", "2026-02-12.pq"}
    assert all("two files for 2026-02-12" in r.reason for r in listing.rejected)


def test_hidden_and_in_progress_files_are_neither_ingested_nor_reported() -> None:
    listing = classify([".DS_Store", "_SUCCESS", "2026-02-12.parquet.tmp", "2026-02-13.parquet"], "parquet", START, TODAY)
    assert listing.valid == {"2026-02-13": "2026-02-13.parquet"} and not listing.rejected


def test_partition_file_finds_the_day_whatever_the_extension() -> None:
    names = ["2026-02-12.PARQUET", "2026-02-12.fixed.parquet", "2026-02-13.pq", "2026-02-13.csv"]
    assert partition_file(names, "parquet", "2026-02-12") == ["2026-02-12.PARQUET"]
    assert partition_file(names, "parquet", "2026-02-13") == ["2026-02-13.pq"]
    assert partition_file(names, "csv", "2026-02-13") == ["2026-02-13.csv"]
    assert partition_file(names, "parquet", "2026-02-14") == []


def test_content_hash_uses_store_metadata_only_when_it_is_a_digest() -> None:
    assert content_hash({"ETag": '"9b2cf535f27731c974343645a3985328"', "size": 3}) == "etag:9b2cf535f27731c974343645a3985328"
    assert content_hash({"md5Hash": "abc=="}) == "md5hash:abc=="
    assert content_hash({"size": 3, "mtime": 1.0, "ino": 7}) is None  # a local file: hash the bytes


def test_sha256_of_streams_in_chunks() -> None:
    data = b"x" * 10_000 + b"y"
    assert sha256_of(io.BytesIO(data), chunk=4096) == sha256_of(io.BytesIO(data), chunk=1 << 20)
    assert sha256_of(io.BytesIO(data)) != sha256_of(io.BytesIO(data[:-1] + b"z"))


def _infos(folder: Path) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for p in folder.iterdir():
        st = p.stat()
        out[p.name] = {"size": st.st_size, "mtime": st.st_mtime, "created": st.st_ctime, "ino": st.st_ino}
    return out


def test_a_same_mtime_same_size_replacement_is_a_change_a_touch_is_not(tmp_path: Path) -> None:
    import os

    day = tmp_path / "2026-02-10.parquet"
    day.write_bytes(b"old content")
    opened: list[str] = []

    def open_file(name: str):
        opened.append(name)
        return (tmp_path / name).open("rb")

    first = fingerprints(_infos(tmp_path), {}, open_file)
    assert changed_files(first, {}) == {"2026-02-10.parquet": False}
    again = fingerprints(_infos(tmp_path), first, open_file)
    assert again == first and opened == ["2026-02-10.parquet"]  # unchanged stat: not read again
    mtime = day.stat().st_mtime
    day.write_bytes(b"new content")  # same size
    os.utime(day, (mtime, mtime))  # and the old mtime, as `cp -p` or a sync tool would leave it
    replaced = fingerprints(_infos(tmp_path), first, open_file)
    assert changed_files(replaced, first) == {"2026-02-10.parquet": True}
    os.utime(day, (mtime + 100, mtime + 100))  # touched, same bytes
    touched = fingerprints(_infos(tmp_path), replaced, open_file)
    assert touched["2026-02-10.parquet"]["fp"] == replaced["2026-02-10.parquet"]["fp"]
    assert changed_files(touched, replaced) == {}


def test_an_old_mtime_cursor_is_migrated_without_reingesting(tmp_path: Path) -> None:
    (tmp_path / "2026-02-10.parquet").write_bytes(b"a")
    (tmp_path / "2026-02-11.parquet").write_bytes(b"b")
    infos = _infos(tmp_path)
    old = {"2026-02-10.parquet": infos["2026-02-10.parquet"]["mtime"], "2026-02-11.parquet": 12.5}
    seen = migrate_cursor(old, infos)
    current = fingerprints(infos, seen, lambda n: (tmp_path / n).open("rb"))
    # the file with the mtime the old cursor recorded is not re-ingested; the one whose mtime moved is
    assert changed_files(current, seen) == {"2026-02-11.parquet": False}
    assert current["2026-02-10.parquet"]["fp"].startswith("sha256:")
    assert migrate_cursor({"files": current, "rejected": []}, infos) == current


@pytest.mark.parametrize("name", ["2026-02-10.parquet", "2026-02-10.PARQUET", "2026-02-10.pq"])
def test_every_accepted_spelling_names_the_same_partition(name: str) -> None:
    assert classify([name], "parquet", START, TODAY).valid == {"2026-02-10": name}


def test_source_file_reads_a_day_whatever_the_extension(tmp_path: Path) -> None:
    from upath import UPath

    from kiln.source import SourceReadError, source_file
    from kiln.spec import PipelineSpec

    spec = PipelineSpec.model_validate({
        "name": "orders", "source": {"path": "orders", "format": "parquet"}, "target": "label", "task": "classification",
        "features": {"passthrough": ["amount"]},
        "schema": {"order_id": {"dtype": "str", "key": True}, "amount": {"dtype": "float"}, "label": {"dtype": "int"}},
    })
    (tmp_path / "2026-02-12.PARQUET").write_bytes(b"x")
    (tmp_path / "2026-02-13.pq").write_bytes(b"x")
    (tmp_path / "2026-02-14.parquet").write_bytes(b"x")
    (tmp_path / "2026-02-14.pq").write_bytes(b"x")
    folder = UPath(tmp_path)
    assert source_file(folder, spec, "2026-02-12").name == "2026-02-12.PARQUET"
    assert source_file(folder, spec, "2026-02-13").name == "2026-02-13.pq"
    assert source_file(folder, spec, "2026-02-15") == folder / "2026-02-15.parquet"  # missing: reading says so
    with pytest.raises(SourceReadError, match=r"two files for 2026-02-14 .*2026-02-14.parquet, 2026-02-14.pq; keep one"):
        source_file(folder, spec, "2026-02-14")
