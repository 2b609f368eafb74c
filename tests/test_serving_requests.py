"""Pure request validation (serving/requests.py), its pydantic contract, the serving spec options and the router's routing key."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.spec import PipelineSpec, SpecError, load_spec, spec_data
from serving.requests import RequestError, parse_body, parse_rows
from serving.router import request_key, share_of
from tests.conftest import FRAUD_SPEC

ROW = {"txn_id": "t1", "ts": "2026-01-01T10:00:00", "amount": 12.5, "merchant_category": "grocery", "country": "US",
       "channel": "pos", "card_present": True, "customer_age": None, "distance_from_home_km": 3, "txns_last_24h": 2}


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return load_spec(FRAUD_SPEC)


def test_valid_rows_become_typed_columns(spec: PipelineSpec) -> None:
    frame = parse_body(json.dumps({"rows": [ROW, ROW | {"amount": 3, "customer_age": 40}]}).encode(), spec, 10)
    assert frame.height == 2 and frame.columns == spec.input_columns
    assert frame["amount"].to_list() == [12.5, 3.0] and frame["customer_age"].to_list() == [None, 40]
    assert str(frame["ts"].dtype).startswith("Datetime")


@pytest.mark.parametrize(
    ("rows", "field", "status"),
    [
        ([ROW | {"card_present": "yes"}], "card_present", 400),
        ([ROW | {"txns_last_24h": 2.0}], "txns_last_24h", 400),
        ([ROW | {"amount": float("inf")}], "amount", 400),
        ([ROW | {"amount": [1]}], "amount", 400),
        ([ROW | {"merchant_category": "casino"}], "merchant_category", 400),
        ([ROW | {"customer_age": 17}], "customer_age", 400),
        ([ROW, {k: v for k, v in ROW.items() if k != "ts"}], "ts", 400),
        ([ROW] * 11, "rows", 413),
        ([], "rows", 400),
        ([ROW, "row"], "rows", 400),
    ],
)
def test_bad_rows_name_the_field(spec: PipelineSpec, rows: list[Any], field: str, status: int) -> None:
    with pytest.raises(RequestError) as caught:
        parse_rows(rows, spec, 10)
    assert field in str(caught.value) and caught.value.status == status


def test_unknown_category_policy(spec: PipelineSpec) -> None:
    row = ROW | {"country": "ZZ"}
    with pytest.raises(RequestError, match="country"):
        parse_rows([row], spec, 10, unknown_category="reject")
    assert parse_rows([row], spec, 10, unknown_category="allow")["country"].to_list() == ["ZZ"]


def test_categorical_feature_codes_are_positions_in_allowed_and_unknowns_are_null(spec: PipelineSpec) -> None:
    import polars as pl

    from kiln.features import compute_features

    allowed = spec.schema_["country"].allowed
    assert allowed
    countries = [allowed[0], allowed[-1], "ZZ", allowed[1]]
    frame = parse_rows([ROW | {"country": c} for c in countries], spec, 10, unknown_category="allow")
    codes = compute_features(frame, spec)["country"]
    assert codes.dtype == pl.Int32 and codes.to_list() == [0, len(allowed) - 1, None, 1]
    for name in spec.features.categorical:  # the same codes as a lookup table of `allowed` would give
        values = spec.schema_[name].allowed or []
        table = frame.select(pl.col(name).replace_strict(values, list(range(len(values))), default=None, return_dtype=pl.Int32))
        assert compute_features(frame, spec)[name].equals(table[name]), name


def test_serving_release_options_validate(spec: PipelineSpec, tmp_path: Path) -> None:
    assert spec.serving.release.mode == "none" and spec.serving.unknown_category == "reject" and spec.serving.workers == 0
    data = spec_data(FRAUD_SPEC)
    data["serving"]["release"] = {"mode": "canary", "challenger_share": 0.25}
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_spec(path).serving.release.challenger_share == 0.25
    data["serving"]["release"] = {"mode": "blue-green"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="serving.release.mode: 'blue-green' is not one of"):
        load_spec(path)


def test_routing_key_is_stable_and_spread() -> None:
    body = json.dumps({"rows": [ROW]}).encode()
    assert request_key(body, "txn_id") == "t1"
    assert request_key(body, None) == body.decode()
    assert request_key(b"not json", "txn_id") == "not json"
    shares = [share_of(f"key-{i}") for i in range(10_000)]
    assert shares[:5] == [share_of(f"key-{i}") for i in range(5)]
    assert abs(sum(s < 0.1 for s in shares) / len(shares) - 0.1) < 0.015


def _body(rows: Any) -> bytes:
    return json.dumps({"rows": rows}).encode()


def test_fast_path_accepts_small_valid_requests_with_the_full_paths_types(spec: PipelineSpec) -> None:
    from serving.requests import frame_of, parse_request

    rows = [ROW | {"ts": "2026-01-01T23:30:00-01:00"}, ROW | {"amount": 3, "customer_age": 40, "ts": "2026-01-01T10:00:00+02:00"}]
    fast = parse_request(_body(rows), spec, 10)
    assert fast.columns is not None and fast.count == 2  # took the fast path
    frame = frame_of([fast], spec)
    full = parse_body(_body(rows), spec, 10)
    assert frame.schema == full.schema and frame.to_dicts() == full.to_dicts()
    assert [t.hour for t in frame["ts"].to_list()] == [0, 8]  # offsets become naive UTC on both paths


def test_timestamps_with_and_without_offsets_mixed_in_one_request_parse_alike_on_both_paths(spec: PipelineSpec) -> None:
    """polars parses a column in the format of its first value; a request mixing formats must not depend on its size."""
    from serving.requests import FAST_ROWS, frame_of, parse_request

    stamps = ["2026-01-01T10:00:00", "2026-01-01T10:00:00Z", "2026-01-01T12:00:00+02:00", "2026-01-01 10:00:00.5", None]
    rows = [ROW | {"ts": ts} for ts in stamps[:-1]]
    expected = ["2026-01-01 10:00:00", "2026-01-01 10:00:00", "2026-01-01 10:00:00", "2026-01-01 10:00:00.500000"]
    small = frame_of([parse_request(_body(rows), spec, 1000)], spec)
    assert [str(t) for t in small["ts"].to_list()] == expected
    big = parse_request(_body(rows * (FAST_ROWS // len(rows) + 1)), spec, 1000)
    assert big.frame is not None  # the full path: more rows than the fast path takes
    assert [str(t) for t in big.frame["ts"].to_list()[:4]] == expected
    assert big.frame.schema["ts"] == small.schema["ts"]
    data = spec_data(FRAUD_SPEC)
    data["schema"]["ts"]["nullable"] = True
    with_null = parse_body(_body([ROW | {"ts": ts} for ts in stamps]), PipelineSpec.model_validate(data), 10)
    assert with_null["ts"].null_count() == 1 and str(with_null["ts"][1]) == "2026-01-01 10:00:00"
    # Neither rule accepts a value: refused, naming the column, on both paths.
    bad = [ROW, ROW | {"ts": "2026-01-01T10:00:00Z"}, ROW | {"ts": "yesterday"}]
    for body in (_body(bad), _body(bad * FAST_ROWS)):
        with pytest.raises(RequestError, match=r"^rows\[2\]\.ts: expected datetime"):
            parse_request(body, spec, 1000)


_OFFSETS = ["", "Z", "+00:00", "+02:00", "-05:30", "+14:00"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stamps=st.lists(st.tuples(st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(2099, 12, 30)),
                                 st.sampled_from(_OFFSETS), st.sampled_from(["T", " "]), st.booleans()),
                       min_size=1, max_size=5))
def test_any_mix_of_iso_timestamps_parses_the_same_on_the_fast_and_the_full_path(spec: PipelineSpec, stamps: list[Any]) -> None:
    from serving.requests import FAST_ROWS, frame_of, parse_request

    texts = [when.isoformat(sep=sep, timespec="microseconds" if micro else "seconds") + offset
             for when, offset, sep, micro in stamps]
    rows = [ROW | {"ts": t} for t in texts]
    fast = parse_request(_body(rows), spec, 1000)
    assert fast.columns is not None  # every value is ISO 8601: the fast path takes them all
    full = parse_request(_body(rows * (FAST_ROWS // len(rows) + 1)), spec, 1000)
    assert full.frame is not None
    assert frame_of([fast], spec)["ts"].to_list() == full.frame["ts"].to_list()[:len(rows)]


@pytest.mark.parametrize(
    "row",
    [ROW | {"card_present": "yes"}, ROW | {"txns_last_24h": 2.0}, ROW | {"txns_last_24h": True}, ROW | {"amount": -1},
     ROW | {"amount": 10**400}, ROW | {"txns_last_24h": 10**30}, ROW | {"merchant_category": "casino"},
     ROW | {"customer_age": 17}, ROW | {"txn_id": None}, ROW | {"ts": "not a time"}, ROW | {"colour": "red"},
     {k: v for k, v in ROW.items() if k != "ts"}, ROW | {"channel": {"nested": 1}}],
)
def test_fast_path_never_accepts_what_the_full_path_refuses(spec: PipelineSpec, row: dict[str, Any]) -> None:
    from serving.requests import parse_request

    with pytest.raises(RequestError) as full:
        parse_body(_body([ROW, row]), spec, 10)
    with pytest.raises(RequestError) as fast:
        parse_request(_body([ROW, row]), spec, 10)
    assert str(fast.value).split(":")[0] == str(full.value).split(":")[0] and fast.value.status == full.value.status
    assert str(fast.value).startswith("rows[1]"), str(fast.value)  # the row that breaks the contract, by index


def test_large_requests_and_mixed_batches_keep_request_order(spec: PipelineSpec) -> None:
    from serving.requests import FAST_ROWS, frame_of, parse_request

    big = parse_request(_body([ROW | {"txn_id": f"big-{i}"} for i in range(FAST_ROWS + 1)]), spec, 1000)
    small = parse_request(_body([ROW | {"txn_id": "small"}]), spec, 1000)
    assert big.frame is not None and small.columns is not None
    frame = frame_of([small, big, small], spec)
    assert frame.height == FAST_ROWS + 3
    assert frame["txn_id"].to_list() == ["small", *(f"big-{i}" for i in range(FAST_ROWS + 1)), "small"]


def test_non_json_numbers_and_junk_get_400_on_the_fast_entry(spec: PipelineSpec) -> None:
    from serving.requests import parse_request

    for raw in (b"", b"{", b'{"rows": [NaN]}', b"[" * 5000, b"\xff\xfe", _body([ROW]) + b"x"):
        with pytest.raises(RequestError) as caught:
            parse_request(raw, spec, 10)
        assert caught.value.status == 400 and "body" in str(caught.value) or "rows" in str(caught.value)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_token_is_named_by_row_and_column(spec: PipelineSpec, token: str) -> None:
    from serving.requests import parse_request

    rows = _body([ROW, ROW | {"txn_id": "t2"}]).decode()
    raw = rows.replace('"amount": 12.5', f'"amount": {token}', 2).replace(f'"amount": {token}', '"amount": 12.5', 1)
    with pytest.raises(RequestError, match=rf"^rows\[1\]\.amount: {token} is not valid JSON \(numbers must be finite\)$"):
        parse_request(raw.encode(), spec, 10)
    with pytest.raises(RequestError, match=rf"^body: {token} is not valid JSON"):  # outside a row: the body is named
        parse_request(('{"rows": ' + rows[len('{"rows": '):-1] + ', "x": ' + token + "}").encode(), spec, 10)


def test_small_batches_get_the_same_features_and_matrix_as_large_frames(spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Served batches run the feature expressions sequentially and fill the matrix on the calling thread; a frame
    above the thresholds takes polars' parallel select and to_numpy. Both must give the same numbers, nulls included."""
    import numpy as np

    import kiln.features as features
    import kiln.trainers.lightgbm as train

    allowed = spec.schema_["country"].allowed or []
    rows = [ROW | {"txn_id": f"t{i}", "country": "ZZ" if i % 3 == 0 else allowed[i % len(allowed)],
                   "customer_age": None if i % 2 else 30 + i, "distance_from_home_km": None if i % 4 == 1 else 1.5 * i,
                   "amount": 10.0 * i, "ts": f"2026-03-0{1 + i % 9}T{i % 24:02d}:15:00"} for i in range(40)]
    frame = parse_rows(rows, spec, 100, unknown_category="allow")
    small = features.compute_features(frame, spec)
    small_matrix = train.matrix(small, spec)
    assert small.null_count().sum_horizontal().item() > 0  # nulls in categorical codes and passthrough columns
    monkeypatch.setattr(features, "SEQUENTIAL_ROWS", 0)
    monkeypatch.setattr(train, "SMALL_FRAME_ROWS", 0)
    large = features.compute_features(frame, spec)
    assert small.equals(large, null_equal=True)
    large_matrix = train.matrix(large, spec)
    assert small_matrix.dtype == large_matrix.dtype == np.float64
    assert small_matrix.shape == large_matrix.shape == (40, len(spec.feature_names))
    assert np.array_equal(small_matrix, large_matrix, equal_nan=True)
    assert np.isnan(small_matrix).any()


HOSTILE = [
    ("ts_far_future_with_offset", {"ts": "9999-12-31T23:59:59-01:00"}, "rows[1].ts: '9999-12-31T23:59:59-01:00' is outside"),
    ("ts_year_one_with_offset", {"ts": "0001-01-01T00:00:00+01:00"}, "rows[1].ts: '0001-01-01T00:00:00+01:00' is outside"),
    ("lone_surrogate_in_text", {"txn_id": "\ud800"}, "rows[1].txn_id: not valid Unicode text"),
    ("ten_megabyte_text", {"txn_id": "x" * 10_000_000}, "rows[1].txn_id: text of 10000000 characters exceeds the limit of 1024"),
]


@pytest.mark.parametrize(("case", "change", "message"), HOSTILE, ids=[c[0] for c in HOSTILE])
@pytest.mark.parametrize("rows", [2, 100], ids=["fast_path", "full_path"])
def test_hostile_values_are_a_400_naming_field_and_row(spec: PipelineSpec, case: str, change: dict[str, Any], message: str,
                                                       rows: int) -> None:
    """What once answered 502 OverflowError or 500 UnicodeEncodeError, or was logged whole, is refused with the row."""
    from serving.requests import parse_request

    batch = [ROW] * rows
    batch[1] = ROW | change
    body = json.dumps({"rows": batch}, ensure_ascii=True).encode()  # "\ud800" travels as the JSON escape a client sends
    with pytest.raises(RequestError) as raised:
        parse_request(body, spec, 1000)
    assert raised.value.status == 400 and str(raised.value).startswith(message), str(raised.value)[:200]


def test_raw_surrogate_bytes_are_a_400(spec: PipelineSpec) -> None:
    from serving.requests import parse_request

    body = json.dumps({"rows": [ROW]}).encode().replace(ROW["txn_id"].encode(), b"\xed\xa0\x80", 1)
    with pytest.raises(RequestError) as raised:
        parse_request(body, spec, 1000)
    assert raised.value.status == 400 and str(raised.value) == "rows[0].txn_id: not valid Unicode text (a lone surrogate)"


def test_row_model_is_the_contract_with_its_limits(spec: PipelineSpec) -> None:
    """The pydantic row model (OpenAPI of /predict) accepts what parse_rows accepts and carries every limit."""
    import pydantic

    from serving.requests import row_model

    model = row_model(spec)
    schema = model.model_json_schema()
    assert list(schema["properties"]) == spec.input_columns and schema["additionalProperties"] is False
    amount = spec.schema_["amount"]
    assert (schema["properties"]["amount"]["minimum"], schema["properties"]["amount"]["maximum"]) == (amount.min, amount.max)
    assert schema["properties"]["country"]["enum"] == spec.schema_["country"].allowed
    assert schema["properties"]["txn_id"]["maxLength"] == spec.serving.max_string_chars
    age = schema["properties"]["customer_age"]["anyOf"]
    assert {"type": "null"} in age and age[0]["minimum"] == spec.schema_["customer_age"].min
    assert model.model_validate(ROW).model_dump(by_alias=True) == ROW | {"distance_from_home_km": 3.0}
    for bad in (ROW | {"country": "ZZ"}, ROW | {"amount": -1}, ROW | {"colour": "red"}, ROW | {"txn_id": "x" * 1025}):
        with pytest.raises(pydantic.ValidationError):
            model.model_validate(bad)
        with pytest.raises(RequestError):
            parse_rows([bad], spec, 10)


class _FakeService:
    """What Front needs of KilnService: the spec and limits, the key, the version, metadata and the answer count."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec, self.api_key, self.max_rows, self.unknown_category = spec, "k", 10, "reject"
        self.version_header = b"7"
        self.counted: list[tuple[int, int]] = []

    def answered(self, status: int, seconds: float, rows: int = 0) -> None:
        self.counted.append((status, rows))

    def metadata(self) -> dict[str, Any]:
        return {"pipeline": self.spec.name}


def _call(spec: PipelineSpec, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
          inner_status: int = 200) -> tuple[int, dict[bytes, bytes], Any, _FakeService, list[Any]]:
    """One request through Front with a stand-in app behind it: status, headers, JSON body, the service, the app's calls."""
    import asyncio

    from serving.service import VALIDATED, Front

    service = _FakeService(spec)
    calls: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        calls.append((scope["headers"], message["body"], VALIDATED.get()))
        content = json.dumps({"predictions": [0.5], "model_version": "7"} if inner_status == 200 else {"error": "boom"}).encode()
        await send({"type": "http.response.start", "status": inner_status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    sent: list[dict[str, Any]] = []
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": raw}
    asyncio.run(Front(app, service=lambda: service)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(content), service, calls


AUTH = {"Authorization": "Bearer k", "Content-Type": "application/json"}


def test_front_lets_valid_rows_through_once_validated_without_client_kiln_headers(spec: PipelineSpec) -> None:
    body = _body([ROW, ROW])
    status, headers, answer, service, calls = _call(spec, "POST", "/predict", body,
                                                    AUTH | {"X-Kiln-Requests": "1000", "X-Request-ID": "req-1"})
    assert status == 200 and answer["model_version"] == "7"
    assert headers[b"x-kiln-model-version"] == b"7" and headers[b"x-request-id"] == b"req-1"
    [(inner_headers, inner_body, validated)] = calls
    assert inner_body == body and validated is not None and validated.count == 2  # the app reads the same body, parsed once
    assert not [k for k, _ in inner_headers if k.startswith(b"x-kiln-")]
    assert service.counted == [(200, 2)]  # counted once, with its rows


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    [
        ("GET", "/predict", b"", AUTH, 405, "method not allowed: POST /predict"),
        ("PUT", "/predict", _body([ROW]), AUTH, 405, "method not allowed"),
        ("POST", "/predict", _body([ROW]), {"Content-Type": "application/json"}, 401, "unauthorized"),
        ("POST", "/predict", _body([ROW]), AUTH | {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ("POST", "/predict", _body([ROW]), AUTH | {"Content-Type": "text/plain"}, 415, "body: Content-Type 'text/plain'"),
        ("POST", "/predict", _body([ROW]), AUTH | {"Content-Encoding": "gzip"}, 415, "body: Content-Encoding 'gzip'"),
        ("POST", "/predict", _body([ROW]), AUTH | {"Content-Length": str(64 * 1024 * 1024)}, 413, "body: more than"),
        ("POST", "/predict", _body([ROW] * 11), AUTH, 413, "rows: 11 rows exceed the limit of 10"),
        ("POST", "/predict", _body([ROW, ROW | {"amount": "x"}]), AUTH, 400, "rows[1].amount: expected float, got string"),
        ("POST", "/predict", b'{"rows": [NaN]}', AUTH, 400, "body: NaN is not valid JSON"),
        ("POST", "/metadata", b"", AUTH, 405, "method not allowed: GET /metadata"),
        ("GET", "/metadata", b"", {}, 401, "unauthorized"),
    ],
)
def test_front_refuses_bad_requests_itself_with_a_json_error(spec: PipelineSpec, method: str, path: str, body: bytes,
                                                            headers: dict[str, str], status: int, message: str) -> None:
    got, answer_headers, answer, service, calls = _call(spec, method, path, body, headers)
    assert got == status and answer["error"].startswith(message), answer
    assert not calls and answer_headers[b"content-type"] == b"application/json"
    assert len(answer_headers[b"x-request-id"]) == 32
    assert service.counted == ([(status, 0)] if path == "/predict" else [])


def test_front_body_limit_counts_the_bytes_sent_not_said(spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.service as service_module

    monkeypatch.setattr(service_module, "MAX_BODY_BYTES", 3000)  # Kiln's own module constant, read per call
    status, _, answer, _, calls = _call(spec, "POST", "/predict", b" " * 5000 + _body([ROW]), AUTH)
    assert status == 413 and answer["error"].startswith("body: more than 3000 bytes") and not calls


def test_front_logs_a_5xx_with_its_request_id_and_serves_metadata(spec: PipelineSpec, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="serving.service"):
        status, headers, _, service, _ = _call(spec, "POST", "/predict", _body([ROW]), AUTH | {"X-Request-ID": "r-500"},
                                               inner_status=500)
    assert status == 500 and headers[b"x-request-id"] == b"r-500" and service.counted == [(500, 0)]
    assert any("r-500" in r.getMessage() and "500" in r.getMessage() for r in caplog.records)
    status, _, answer, service, _ = _call(spec, "GET", "/metadata", b"", {"X-API-Key": "k"})
    assert status == 200 and answer == {"pipeline": spec.name} and service.counted == []
    status, headers, _, service, calls = _call(spec, "GET", "/livez", b"", {"X-Request-ID": "bad id with spaces"})
    assert status == 200 and len(calls) == 1 and service.counted == [] and headers[b"x-request-id"] != b"bad id with spaces"


def test_example_row_keeps_every_rule_of_the_contract(spec: PipelineSpec) -> None:
    """The row a worker warms up with is valid, also for bounds that exclude 0 and fractional int bounds."""
    from serving.requests import example_row

    assert parse_rows([example_row(spec)], spec, 1).height == 1
    data = spec_data(FRAUD_SPEC)
    data["schema"]["amount"].update(min=-20.5, max=-3.25)
    data["schema"]["txns_last_24h"].update(min=2.5, max=9)
    odd = PipelineSpec.model_validate(data)
    row = example_row(odd)
    assert row["amount"] == -20.5 and row["txns_last_24h"] == 3
    assert parse_rows([row], odd, 1).height == 1
