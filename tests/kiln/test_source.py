"""kiln.source without Dagster: which file holds a day, how CSV text is typed, and what an unreadable file says."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from upath import UPath

from kiln.source import SourceReadError, read_source, read_source_folder, read_source_with_report, source_file
from kiln.spec import PipelineSpec


def make_spec(fmt: str = "csv") -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "orders", "source": {"path": "orders", "format": fmt}, "target": "label", "task": "classification",
        "features": {"passthrough": ["amount"]},
        "schema": {
            "order_id": {"dtype": "str", "key": True},
            "ts": {"dtype": "datetime"},
            "amount": {"dtype": "float"},
            "paid": {"dtype": "bool"},
            "label": {"dtype": "int"},
        },
    })


def write(path: Path, text: str | bytes) -> UPath:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return UPath(path)


def test_source_file_names_the_day(tmp_path: Path) -> None:
    spec = make_spec("parquet")
    assert source_file(UPath(tmp_path), spec, "2026-01-02") == UPath(tmp_path) / "2026-01-02.parquet"
    with pytest.raises(ValueError, match="read_source_folder"):
        source_file(UPath(tmp_path), spec, None)


def test_csv_text_is_typed_by_the_spec(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "order_id,ts,amount,paid,label\na,2026-01-01 10:00:00,1.5,TRUE,1\nb,2026-01-01 11:00:00,2,0,0\n")
    frame, unparsed = read_source_with_report(path, make_spec())
    assert unparsed == {}
    assert dict(frame.schema) == {"order_id": pl.String, "ts": pl.Datetime("us"), "amount": pl.Float64, "paid": pl.Boolean,
                                  "label": pl.Int64}
    assert frame["paid"].to_list() == [True, False] and frame["amount"].to_list() == [1.5, 2.0]


def test_a_column_that_does_not_convert_stays_text_with_samples(tmp_path: Path) -> None:
    rows = "\n".join(f"o{i},2026-01-01,{'12,5' if i == 3 else 'n/a' if i == 5 else i},true,{i % 2}" for i in range(10))
    path = write(tmp_path / "d.csv", "order_id,ts,amount,paid,label\n" + rows.replace(",12,5,", ',"12,5",') + "\n")
    frame, unparsed = read_source_with_report(path, make_spec())
    assert frame.schema["amount"] == pl.String and frame.schema["label"] == pl.Int64
    assert unparsed == {"amount": ["12,5", "n/a"]}
    assert read_source(path, make_spec()).schema["amount"] == pl.String


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty (0 bytes)"),
    (b"order_id,amount\nab\xffc,1\n", "is not UTF-8 text: byte 0xff at offset 18 (line 2)"),
])
def test_unreadable_csv_says_what_and_where(tmp_path: Path, content: bytes, message: str) -> None:
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(SourceReadError, match=re.escape(message)) as err:
        read_source(path, make_spec())
    assert str(path) in str(err.value) and str(err.value).startswith("orders: ")


def test_a_missing_or_truncated_parquet_file_is_a_source_read_error(tmp_path: Path) -> None:
    with pytest.raises(SourceReadError, match="does not exist"):
        read_source(UPath(tmp_path / "2026-01-01.parquet"), make_spec("parquet"))
    pl.DataFrame({"order_id": ["a"], "label": [1]}).write_parquet(tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    truncated = write(tmp_path / "cut.parquet", data[: len(data) // 2])
    with pytest.raises(SourceReadError, match="cannot read parquet file"):
        read_source(truncated, make_spec("parquet"))
    assert read_source(UPath(tmp_path / "whole.parquet"), make_spec("parquet")).to_dict(as_series=False) == {
        "order_id": ["a"], "label": [1]}


def test_a_folder_reads_as_one_frame_in_name_order(tmp_path: Path) -> None:
    spec = make_spec()
    write(tmp_path / "b.csv", "order_id,amount\nb,2\n")
    write(tmp_path / "a.csv", "order_id,amount,extra\na,1,x\n")
    frame, _ = read_source_folder(UPath(tmp_path), spec)
    assert frame.to_dict(as_series=False) == {"order_id": ["a", "b"], "amount": [1.0, 2.0], "extra": ["x", None]}
    with pytest.raises(SourceReadError, match=r"no \*.csv files in"):
        read_source_folder(UPath(tmp_path / "empty"), spec)
