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
    frame, unparsed, _ = read_source_with_report(path, make_spec())
    assert unparsed == {}
    assert dict(frame.schema) == {"order_id": pl.String, "ts": pl.Datetime("us"), "amount": pl.Float64, "paid": pl.Boolean,
                                  "label": pl.Int64}
    assert frame["paid"].to_list() == [True, False] and frame["amount"].to_list() == [1.5, 2.0]


def test_a_column_that_does_not_convert_stays_text_with_samples(tmp_path: Path) -> None:
    rows = "\n".join(f"o{i},2026-01-01,{'12,5' if i == 3 else 'n/a' if i == 5 else i},true,{i % 2}" for i in range(10))
    path = write(tmp_path / "d.csv", "order_id,ts,amount,paid,label\n" + rows.replace(",12,5,", ',"12,5",') + "\n")
    frame, unparsed, _ = read_source_with_report(path, make_spec())
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
    frame, _, _ = read_source_folder(UPath(tmp_path), spec)
    assert frame.to_dict(as_series=False) == {"order_id": ["a", "b"], "amount": [1.0, 2.0], "extra": ["x", None]}
    with pytest.raises(SourceReadError, match=r"no \*.csv files in"):
        read_source_folder(UPath(tmp_path / "empty"), spec)


# Real-world dtypes: what a parquet writer stores is widened to the spec's dtypes where nothing a user would miss is
# lost, coerced only where the column says `coerce: true`, and timezones are taken only as the spec states.

def typed_spec(fmt: str = "parquet", **columns: dict[str, object]) -> PipelineSpec:
    schema = {"order_id": {"dtype": "str", "key": True}, "label": {"dtype": "int"}, **columns}
    return PipelineSpec.model_validate({"name": "orders", "source": {"path": "orders", "format": fmt}, "target": "label",
                                        "task": "classification", "features": {"passthrough": [next(iter(columns))]}, "schema": schema})


def parquet_of(tmp_path: Path, frame: pl.DataFrame) -> UPath:
    frame.write_parquet(tmp_path / "2026-01-01.parquet")
    return UPath(tmp_path / "2026-01-01.parquet")


def schema_messages(frame: pl.DataFrame, spec: PipelineSpec, unparsed: dict[str, list[str]]) -> dict[str, str]:
    from kiln.contracts import describe, schema_failures

    return {f["column"]: describe([f]) for f in schema_failures(frame, spec, unparsed) if f["rule"] == "dtype"}


def test_dictionary_text_reads_as_str(tmp_path: Path) -> None:
    import pandas as pd

    spec = typed_spec(country={"dtype": "str"}, channel={"dtype": "str"})
    pdf = pd.DataFrame({"order_id": ["a", "b", "c"], "label": [1, 0, 1], "country": ["US", "DE", "US"], "channel": ["pos", "atm", "pos"]})
    pdf["country"] = pdf["country"].astype("category")  # pandas `category` is stored dictionary-encoded
    pdf.to_parquet(tmp_path / "2026-01-01.parquet")
    frame = pl.read_parquet(tmp_path / "2026-01-01.parquet").with_columns(pl.col("channel").cast(pl.Categorical))
    path = parquet_of(tmp_path, frame)
    assert pl.read_parquet(path.path).schema["country"] == pl.Categorical  # as a reader without Kiln sees it

    frame, unparsed, widened = read_source_with_report(path, spec)
    assert frame.schema["country"] == pl.String and frame.schema["channel"] == pl.String
    assert frame["country"].to_list() == ["US", "DE", "US"]
    assert widened == {"country": "Categorical -> String", "channel": "Categorical -> String"}
    assert schema_messages(frame, spec, unparsed) == {}


def test_int_and_float32_amounts_widen_to_float_and_ns_timestamps_to_us(tmp_path: Path) -> None:
    from datetime import datetime

    spec = typed_spec(amount={"dtype": "float"}, fee={"dtype": "float"}, ts={"dtype": "datetime"}, day={"dtype": "datetime"},
                      qty={"dtype": "int"})
    stamps = [datetime(2026, 1, 1, 10, 0, 0, 123456), datetime(2026, 1, 1, 11)]
    path = parquet_of(tmp_path, pl.DataFrame({
        "order_id": ["a", "b"], "label": [1, 0], "amount": pl.Series([12, 7], dtype=pl.Int32),
        "fee": pl.Series([0.5, 1.25], dtype=pl.Float32), "ts": pl.Series(stamps, dtype=pl.Datetime("ns")),
        "day": pl.Series(stamps, dtype=pl.Datetime("ms")), "qty": pl.Series([3, 4], dtype=pl.UInt8),
    }))
    frame, unparsed, widened = read_source_with_report(path, spec)
    assert {n: frame.schema[n] for n in ("amount", "fee", "ts", "day", "qty")} == {
        "amount": pl.Float64, "fee": pl.Float64, "ts": pl.Datetime("us"), "day": pl.Datetime("us"), "qty": pl.Int64}
    assert frame["amount"].to_list() == [12.0, 7.0] and frame["fee"].to_list() == [0.5, 1.25]
    assert frame["ts"].to_list() == stamps and frame["day"].to_list()[1] == stamps[1]
    assert widened == {"amount": "Int32 -> Float64", "fee": "Float32 -> Float64", "ts": "Datetime(ns) -> Datetime(us)",
                       "day": "Datetime(ms) -> Datetime(us)", "qty": "UInt8 -> Int64"}
    assert schema_messages(frame, spec, unparsed) == {}


@pytest.mark.parametrize("coerce", [False, True])
def test_zero_one_integers_are_bools_only_with_coerce(tmp_path: Path, coerce: bool) -> None:
    spec = typed_spec(paid={"dtype": "bool", "coerce": coerce})
    path = parquet_of(tmp_path, pl.DataFrame({"order_id": ["a", "b", "c"], "label": [1, 0, 1], "paid": [1, 0, None]}))
    frame, unparsed, widened = read_source_with_report(path, spec)
    if coerce:
        assert frame["paid"].to_list() == [True, False, None]
        assert widened == {"paid": "Int64 -> Boolean (coerce: 0/1)"}
        assert schema_messages(frame, spec, unparsed) == {}
    else:
        assert frame["paid"].to_list() == [1, 0, None] and widened == {}
        assert "column 'paid': rule dtype failed observed Int64 (expected bool)" in schema_messages(frame, spec, unparsed)["paid"]


def test_coerce_refuses_values_that_do_not_fit(tmp_path: Path) -> None:
    spec = typed_spec(paid={"dtype": "bool", "coerce": True}, qty={"dtype": "int", "coerce": True},
                      units={"dtype": "int", "coerce": True})
    path = parquet_of(tmp_path, pl.DataFrame({"order_id": ["a", "b"], "label": [1, 0], "paid": [1, 2], "qty": [1.0, 2.5],
                                              "units": [3.0, 4.0]}))
    frame, unparsed, widened = read_source_with_report(path, spec)
    assert widened == {"units": "Float64 -> Int64 (coerce: whole numbers)"} and frame["units"].to_list() == [3, 4]
    assert unparsed == {"paid": ["2"], "qty": ["2.5"]}
    messages = schema_messages(frame, spec, unparsed)
    assert set(messages) == {"paid", "qty"}
    assert "Int64 (expected bool)" in messages["paid"] and "['2']" in messages["paid"]
    assert "Float64 (expected int)" in messages["qty"] and "['2.5']" in messages["qty"]


def test_coerce_and_timezone_are_checked_in_the_spec(tmp_path: Path) -> None:
    import yaml

    from kiln.spec import SpecError, load_spec, spec_data
    from tests.conftest import FRAUD_SPEC

    data = spec_data(FRAUD_SPEC)
    data["schema"]["amount"]["coerce"] = True
    (tmp_path / "fraud.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError, match=r"fraud\.yaml: schema\.amount: coerce applies to dtype bool \(0/1\) or int .*, not float"):
        load_spec(tmp_path / "fraud.yaml")
    with pytest.raises(ValueError, match="timezone needs dtype datetime, not float"):
        typed_spec(amount={"dtype": "float", "timezone": "UTC"})
    with pytest.raises(ValueError, match="'UTC'"):
        typed_spec(ts={"dtype": "datetime", "timezone": "Europe/Berlin"})
    assert typed_spec(ts={"dtype": "datetime", "timezone": "UTC"}).schema_["ts"].timezone == "UTC"


def test_aware_timestamps_need_timezone_utc(tmp_path: Path) -> None:
    from datetime import datetime

    berlin = pl.Series([datetime(2026, 1, 1, 10), datetime(2026, 7, 1, 10)]).dt.replace_time_zone("Europe/Berlin")
    path = parquet_of(tmp_path, pl.DataFrame({"order_id": ["a", "b"], "label": [1, 0], "ts": berlin.dt.cast_time_unit("ns")}))

    spec = typed_spec(ts={"dtype": "datetime"})
    frame, unparsed, _ = read_source_with_report(path, spec)
    assert frame.schema["ts"] == pl.Datetime("us", "Europe/Berlin")  # not converted silently
    message = schema_messages(frame, spec, unparsed)["ts"]
    assert "timezone-aware (Europe/Berlin)" in message and "set `timezone: UTC`" in message

    spec = typed_spec(ts={"dtype": "datetime", "timezone": "UTC"})
    frame, unparsed, widened = read_source_with_report(path, spec)
    assert frame.schema["ts"] == pl.Datetime("us")
    assert frame["ts"].to_list() == [datetime(2026, 1, 1, 9), datetime(2026, 7, 1, 8)]  # winter +1, summer +2
    assert widened == {"ts": "Datetime(ns, Europe/Berlin) -> Datetime(us) (converted to UTC)"}
    assert schema_messages(frame, spec, unparsed) == {}


def test_naive_and_aware_timestamps_mixed_are_refused_unless_timezone_is_set(tmp_path: Path) -> None:
    from datetime import datetime

    text = "order_id,label,ts\na,1,2026-01-01 10:00:00\nb,0,2026-01-01T10:00:00+01:00\nc,1,2026-01-01T10:00:00Z\n"
    path = write(tmp_path / "d.csv", text)
    csv_spec = typed_spec("csv", ts={"dtype": "datetime"})
    frame, unparsed, _ = read_source_with_report(path, csv_spec)
    assert frame.schema["ts"] == pl.String and unparsed == {"ts": ["2026-01-01T10:00:00+01:00", "2026-01-01T10:00:00Z"]}
    message = schema_messages(frame, csv_spec, unparsed)["ts"]
    assert "naive and timezone-aware timestamps are mixed" in message and "`timezone: UTC`" in message

    utc = typed_spec("csv", ts={"dtype": "datetime", "timezone": "UTC"})
    frame, unparsed, _ = read_source_with_report(path, utc)
    assert frame["ts"].to_list() == [datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 9), datetime(2026, 1, 1, 10)]
    assert unparsed == {} and schema_messages(frame, utc, unparsed) == {}

    # Files of one folder: one naive, one aware.
    folder = tmp_path / "parts"
    folder.mkdir()
    naive = pl.DataFrame({"order_id": ["a"], "label": [1], "ts": [datetime(2026, 1, 1, 10)]})
    naive.write_parquet(folder / "a.parquet")
    naive.with_columns(pl.col("ts").dt.replace_time_zone("UTC")).write_parquet(folder / "b.parquet")
    with pytest.raises(SourceReadError, match=r"column 'ts' has different dtypes across the files .*a\.parquet: Datetime.*b\.parquet: "
                                              r"Datetime.*set `timezone: UTC` on schema\.ts"):
        read_source_folder(UPath(folder), typed_spec(ts={"dtype": "datetime"}))
    frame, _, widened = read_source_folder(UPath(folder), typed_spec(ts={"dtype": "datetime", "timezone": "UTC"}))
    assert frame["ts"].to_list() == [datetime(2026, 1, 1, 10)] * 2 and frame.schema["ts"] == pl.Datetime("us")
    assert widened == {"ts": "Datetime(us, UTC) -> Datetime(us) (converted to UTC)"}
