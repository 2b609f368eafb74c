"""A hostile client against a live local endpoint, over real sockets: a seeded fuzz of 600+ requests, sent twice.

Only the public HTTP contract is used: ``POST /predict {"rows": [...]}`` -> ``{"predictions": [...], "model_version": "n"}``
(header ``X-Kiln-Model-Version``), a 4xx ``{"error": "..."}`` naming the field and the row index for bad input, 405 for a
wrong method, 415 for a wrong content type or any Content-Encoding, 413 beyond the body or row limit, ``/metrics``
with ``kiln_requests_total``, and the ``KILN_API_KEY`` bearer token. The cases are those of issue 19: out-of-range
timestamps, lone surrogates (as ``\\ud800`` escapes and as raw bytes ED A0 80), strings over the limit and a 10 MB one,
malformed JSON, wrong types, NaN/Infinity, huge numbers, bodies over the limit and deeply nested ones, lying
Content-Length (shorter and longer than the body, raw sockets), wrong methods and content types, gzip bodies, a
client-sent ``X-Kiln-Requests`` header, a large request on a keep-alive connection after a 200, and 200 good requests
sent concurrently, interleaved with bad ones.

The module fixture ``fuzzed`` runs the same seeded pass twice and records every exchange; each test below checks
one property of the records, so a failing run says exactly which property breaks and on which cases:
no 5xx and no unanswered request; every exchange finishes within ``CLIENT_BOUND_S`` (the server's configured
timeout plus a grace: a hang is a failure); statuses as HTTP says; errors naming field and row; good answers
identical to the same rows sent alone (and between passes); the client cannot inflate the request counter; and the
endpoint's resident memory grows at most 10% from the end of pass 1 to the end of pass 2.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.process import rss_bytes
from tests.conftest import free_port
from tests.results import fraud_endpoint

NAME = "fuzzserve"
DAYS = 2
ROWS = 1500
SEED = 19
API_KEY = "fuzz-key-7c21"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"Content-Type": "application/json"}
MAX_ROWS = 100  # serving.max_batch_rows of this endpoint: 101 rows are a 413 naming `rows`
MAX_CHARS = 1024  # serving.max_string_chars: 1025 characters are a 400 naming the field and row
BODY_LIMIT = 32 * 1024 * 1024  # the endpoint's documented body limit (bytes): more is a 413
# The endpoint's longest configured wait (the router's 20 s for a body to arrive; BentoML's `traffic.timeout`, the spec's
# serving.timeout_s, is 10 s), with room: every exchange, even a client that stops sending mid-body, must be answered or
# closed by then. The grace covers a slow
# shared machine; a request still open after CLIENT_BOUND_S is a hang.
SERVER_TIMEOUT_S = 30.0
CLIENT_BOUND_S = SERVER_TIMEOUT_S + 15.0
MIN_REQUESTS_PER_PASS = 600
CONCURRENT_GOOD = 200
RSS_GROWTH_LIMIT = 0.10
# Answers to broken HTTP framing: any 4xx or a close, no JSON error body required. A Content-Length shorter than the
# body leaves bytes that the HTTP library (aiohttp, in front) reads as a next request line and answers itself, in text;
# its answer may come before the truncated request's own (both are 4xx, never 5xx).
HTTP_LAYER = frozenset({"length-shorter", "length-shorter-leftover", "length-longer-eof", "length-longer-stalled"})
ROW_INDEX = r"rows?\W{{1,4}}{i}\b"  # "row 3", "rows[3]", "rows.3", "('rows', 3", "rows/3"


@dataclass
class Case:
    """One request of the fuzz and what the contract says about its answer."""

    kind: str
    body: bytes = b""
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    status: frozenset[int] | None = None  # the allowed statuses; None: any 4xx
    names: tuple[str, ...] = ()  # what the error must name (a field, "rows", an unknown key)
    row: int | None = None  # the row index the error must name
    good: bool = False  # a valid request: 200 with the same answer as the same rows sent alone

    def describe(self) -> str:
        return f"{self.kind} {self.method} {self.headers} {self.body[:120]!r}"


@dataclass
class Outcome:
    """What came back for one request: a status (None: no answer), the body, the seconds it took, a transport error."""

    case: Case
    pass_no: int
    status: int | None
    body: bytes
    seconds: float
    failure: str | None = None  # timeout / connection closed without an answer / ...
    phase: str = "sequential"


# ---------------------------------------------------------------------------------------------------- the endpoint
@pytest.fixture(scope="module")
def endpoint(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A small fraud endpoint of its own (one worker), trained and deployed as `tests/test_serving.py` does."""

    def edit(data: dict[str, Any]) -> None:
        data["trainer"]["params"]["num_boost_round"] = 10
        data["serving"].update(port=free_port(), workers=1, max_batch_rows=MAX_ROWS, max_string_chars=MAX_CHARS)

    with fraud_endpoint(tmp_path_factory.mktemp("fuzz-pipelines"), NAME, days=DAYS, rows=ROWS, seed=11, edit=edit,
                        api_key=API_KEY) as world:
        yield world


# ---------------------------------------------------------------------------------------------------- raw HTTP/1.1
def _host_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host, int(parsed.port or 80)


def request_bytes(path: str, body: bytes, *, method: str = "POST", headers: dict[str, str] | None = None,
                  content_length: int | None = None) -> bytes:
    """An HTTP/1.1 request as bytes, with a Content-Length that may lie (``content_length``)."""
    hdrs = {"Host": "127.0.0.1", **AUTH, **JSON, **(headers or {})}
    hdrs["Content-Length"] = str(len(body) if content_length is None else content_length)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode("latin-1") + body


class Closed(Exception):
    """The server closed the connection before a whole response arrived."""


class RawConnection:
    """One client socket with a deadline on every read: reads HTTP/1.1 responses (Content-Length or chunked)."""

    def __init__(self, url: str, bound_s: float = CLIENT_BOUND_S) -> None:
        self.sock = socket.create_connection(_host_port(url), timeout=bound_s)
        self.sock.settimeout(bound_s)
        self.buffer = b""
        self.sender: threading.Thread | None = None
        self.send_error: BaseException | None = None

    def send(self, data: bytes, *, background: bool = False, shut_write: bool = False) -> None:
        """Send ``data``; in the background for a large body (the server may answer and close before reading it all)."""

        def write() -> None:
            try:
                self.sock.sendall(data)
                if shut_write:
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:  # the server answered early and closed: the answer is read all the same
                self.send_error = exc

        if background:
            self.sender = threading.Thread(target=write, daemon=True)
            self.sender.start()
        else:
            write()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)  # socket.timeout (a TimeoutError) after the bound
        if not chunk:
            raise Closed("connection closed")
        self.buffer += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        status_line = self._line()
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._exactly(size)
                self._line()
            while self._line():
                pass
        elif "content-length" in headers:
            body = self._exactly(int(headers["content-length"]))
        else:
            body = self.buffer
            try:
                while True:
                    self._fill()
                    body = self.buffer
            except Closed:
                self.buffer = b""
        return status, headers, body

    def after_last(self) -> list[tuple[int, bytes]]:
        """Whatever the server still sends until it closes the connection (each response parsed), within the bound."""
        answers: list[tuple[int, bytes]] = []
        while True:
            try:
                status, _, body = self.response()
            except Closed:
                return answers
            answers.append((status, body))

    def close(self) -> None:
        if self.sender is not None:
            self.sender.join(timeout=CLIENT_BOUND_S)
        self.sock.close()


# ---------------------------------------------------------------------------------------------------- the cases
def _dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def build_cases(rows: list[dict[str, Any]], spec: Any, seed: int = SEED) -> list[Case]:
    """The seeded sequential cases of one pass (both passes send exactly these, in this order)."""
    rng = random.Random(seed)
    columns: list[str] = list(spec.input_columns)
    schema = spec.schema_
    full = [r for r in rows if all(v is not None for v in r.values())] or rows
    counter = iter(range(10**9))

    def good_rows(n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            row = dict(rng.choice(full))
            row["txn_id"] = f"fuzz-{next(counter)}"
            row["amount"] = round(rng.uniform(1, 4000), 2)
            out.append(row)
        return out

    def bad(kind: str, column: str, value: Any = None, *, raw_value: bytes | None = None, status: frozenset[int] | None = None,
            names: tuple[str, ...] | None = None, n: int | None = None, row_named: bool = True) -> Case:
        """Rows of which one, at a random index, carries ``value`` (or the JSON text ``raw_value``) in ``column``."""
        count = n if n is not None else rng.choice([1, 1, 2, 3, 5, 70])
        batch = good_rows(count)
        i = rng.randrange(count)
        marker = "__FUZZ_VALUE__"
        batch[i][column] = marker if raw_value is not None else value
        body = _dumps({"rows": batch})
        if raw_value is not None:
            body = body.replace(f'"{marker}"'.encode(), raw_value)
        return Case(kind, body, status=status, names=names if names is not None else (column,), row=i if row_named else None)

    cases: list[Case] = []
    # valid requests, one to five rows (and one of 70: the full validation path), some with a charset parameter
    for k in range(100):
        headers = {"Content-Type": "application/json; charset=utf-8"} if k % 10 == 3 else {}
        cases.append(Case("good", _dumps({"rows": good_rows(rng.choice([1, 1, 1, 2, 4, 70]))}), headers=headers, good=True))
    # timestamps whose UTC offset pushes them out of Python's datetime range
    for _ in range(4):
        for ts in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"):
            cases.append(bad("timestamp-range", "ts", ts))
    # lone surrogates: as a JSON escape (valid JSON, invalid Unicode) and as raw bytes ED A0 80 (invalid UTF-8)
    for column in ("txn_id", "txn_id", "merchant_category", "country", "ts", "txn_id", "channel", "txn_id", "ts", "txn_id"):
        cases.append(bad("surrogate-escape", column, rng.choice(["\ud800", "abc\udfff", "\udc00x"])))
    for column in ("txn_id", "txn_id", "merchant_category", "ts", "txn_id", "channel"):
        case = bad("surrogate-bytes", column, raw_value=b'"ab\xed\xa0\x80cd"', row_named=False)
        case.names = ()  # not UTF-8, so not JSON: a 4xx with an error is all the contract can ask
        cases.append(case)
    # strings over serving.max_string_chars, and one of 10 MB
    for column in ("txn_id", "txn_id", "merchant_category", "ts", "txn_id", "channel"):
        cases.append(bad("string-too-long", column, "x" * (MAX_CHARS + 1 + rng.randrange(50))))
    cases.append(bad("string-10mb", "txn_id", "y" * (10 * 1024 * 1024), n=1))
    # malformed JSON: truncated valid bodies, junk bytes, odd texts
    for _ in range(30):
        body = _dumps({"rows": good_rows(rng.choice([1, 2, 3]))})
        cases.append(Case("malformed-json", body[: rng.randrange(1, len(body) - 1)]))
    for _ in range(14):
        cases.append(Case("malformed-json", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))))
    for text in (b"", b"{", b"}", b"null", b"nul", b'{"rows": [}', b'{"rows": [{"amount": 1,}]}', b"\xff\xfe\x00\x00",
                 b'{"rows": [{"a": 1}] "x"}', b"'rows'", b'{"rows": [{}]} trailing'):
        cases.append(Case("malformed-json", text))
    # wrong types per column
    wrong_by_dtype: dict[str, list[Any]] = {
        "str": [1, 2.5, True, ["a"], {"a": 1}],
        "datetime": [1700000000, 2.5, False, ["2026-01-01"], {"t": 1}],
        "float": ["12.5", True, ["1"], {"v": 1}, "lots"],
        "int": [30.5, "30", True, [30], {"v": 30}],
        "bool": [1, 0, "true", "yes", [True], {"b": True}],
    }
    for _ in range(80):
        column = rng.choice(columns)
        cases.append(bad("wrong-type", column, rng.choice(wrong_by_dtype[schema[column].dtype])))
    # null where the column is not nullable, a missing column, an unknown column
    required = [c for c in columns if not schema[c].nullable]
    for _ in range(10):
        cases.append(bad("null", rng.choice(required), None))
    for _ in range(10):
        count = rng.choice([1, 2, 4])
        batch = good_rows(count)
        i, column = rng.randrange(count), rng.choice(columns)
        del batch[i][column]
        cases.append(Case("missing-column", _dumps({"rows": batch}), names=(column,), row=i))
    for _ in range(10):
        count = rng.choice([1, 2, 4])
        batch = good_rows(count)
        i, column = rng.randrange(count), rng.choice(["colour", "amount_usd", "is_fraud", "x", "TXN_ID"])
        batch[i][column] = 1
        cases.append(Case("unknown-column", _dumps({"rows": batch}), names=(column,), row=i))
    # values outside the spec's ranges and categories
    out_of_range = [("amount", -5.0), ("amount", 50000.5), ("customer_age", 17), ("customer_age", 101),
                    ("txns_last_24h", -1), ("txns_last_24h", 501), ("distance_from_home_km", -0.1),
                    ("country", "XX"), ("channel", "POS"), ("merchant_category", "casino")]
    for _ in range(20):
        column, value = rng.choice(out_of_range)
        cases.append(bad("out-of-range", column, value))
    # NaN and Infinity (JSON has neither: the raw tokens) and numbers beyond any float or int64
    for _ in range(12):
        column = rng.choice(["amount", "distance_from_home_km", "customer_age", "txns_last_24h"])
        cases.append(bad("non-finite", column, raw_value=rng.choice([b"NaN", b"Infinity", b"-Infinity"])))
    for _ in range(16):
        column = rng.choice(["amount", "distance_from_home_km", "customer_age", "txns_last_24h"])
        text = rng.choice([b"1e400", b"-1e400", str(10**30).encode(), str(-(10**30)).encode(), str(2**64).encode()])
        cases.append(bad("huge-number", column, raw_value=text))
    # the request's shape: rows not a list, empty, too many, a row that is not an object, unknown top-level keys
    one = good_rows(1)
    cases += [
        Case("shape", _dumps({"rows": "x"}), names=("rows",)),
        Case("shape", _dumps({"rows": {"0": one[0]}}), names=("rows",)),
        Case("shape", _dumps({"rows": []}), names=("rows",)),
        Case("shape", _dumps({"rows": None}), names=("rows",)),
        Case("shape", _dumps({}), names=("rows",)),
        Case("shape", _dumps([one[0]]), names=("rows",)),
        Case("shape", _dumps({"rows": [*good_rows(2), 7]}), names=("rows",), row=2),
        Case("shape", _dumps({"rows": [*good_rows(1), [1, 2]]}), names=("rows",), row=1),
        Case("shape", _dumps({"rows": one, "extra": 1}), names=("extra",)),
        Case("too-many-rows", _dumps({"rows": good_rows(MAX_ROWS + 1)}), status=frozenset({413}), names=("rows",)),
    ]
    # deeply nested bodies and values
    cases += [
        Case("deep", b"[" * 100_000),
        Case("deep", b'{"rows": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        Case("deep", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
        bad("deep", "channel", raw_value=b"[" * 30_000 + b"]" * 30_000, n=1, row_named=False, names=()),
    ]
    # wrong methods and content types, encoded bodies
    valid = _dumps({"rows": good_rows(1)})
    for method in ("GET", "PUT", "DELETE", "PATCH") * 3:
        cases.append(Case("wrong-method", b"" if method in ("GET", "DELETE") else valid, method=method, status=frozenset({405})))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml", "application/octet-stream") * 2:
        cases.append(Case("wrong-content-type", valid, headers={"Content-Type": content_type}, status=frozenset({415})))
    for encoding, encode in (("gzip", gzip.compress), ("deflate", zlib.compress), ("br", lambda b: b)) * 2:
        cases.append(Case("content-encoding", encode(valid), headers={"Content-Encoding": encoding}, status=frozenset({415})))
    rng.shuffle(cases)
    return cases


def concurrent_cases(rows: list[dict[str, Any]], spec: Any, seed: int = SEED + 1) -> list[Case]:
    """200 valid requests (one to three rows each, all different) interleaved with 50 invalid ones."""
    rng = random.Random(seed)
    full = [r for r in rows if all(v is not None for v in r.values())] or rows
    cases = []
    for k in range(CONCURRENT_GOOD):
        batch = []
        for j in range(rng.choice([1, 1, 2, 3])):
            row = dict(rng.choice(full))
            row["txn_id"], row["amount"] = f"conc-{k}-{j}", round(rng.uniform(1, 4000), 2)
            batch.append(row)
        cases.append(Case("concurrent-good", _dumps({"rows": batch}), good=True))
    for k in range(50):
        count = rng.choice([1, 2, 3])
        batch = [dict(rng.choice(full)) | {"txn_id": f"conc-bad-{k}-{j}"} for j in range(count)]
        i = rng.randrange(count)
        column, value = rng.choice([("country", "XX"), ("amount", -1.0), ("customer_age", "old"), ("card_present", 1)])
        batch[i][column] = value
        cases.append(Case("concurrent-bad", _dumps({"rows": batch}), names=(column,), row=i))
    rng.shuffle(cases)
    return cases


# ---------------------------------------------------------------------------------------------------- sending
def send_case(client: httpx.Client, url: str, case: Case, pass_no: int) -> Outcome:
    """One request through httpx (bounded timeouts; the connection is reused when the server keeps it)."""
    started = time.monotonic()
    try:
        response = client.request(case.method, f"{url}/predict", content=case.body or None,
                                   headers={**AUTH, **JSON, **case.headers})
        return Outcome(case, pass_no, response.status_code, response.content, time.monotonic() - started)
    except httpx.TimeoutException as exc:
        return Outcome(case, pass_no, None, b"", time.monotonic() - started, f"timeout: {exc!r}")
    except httpx.HTTPError as exc:
        return Outcome(case, pass_no, None, b"", time.monotonic() - started, f"no answer: {exc!r}")


def send_raw(url: str, case: Case, pass_no: int, payload: bytes, *, shut_write: bool = False) -> Outcome:
    """One request as raw bytes on a fresh connection (the body may be larger than the server reads)."""
    started = time.monotonic()
    conn = RawConnection(url)
    try:
        conn.send(payload, background=True, shut_write=shut_write)
        status, _, body = conn.response()
        return Outcome(case, pass_no, status, body, time.monotonic() - started)
    except TimeoutError:
        return Outcome(case, pass_no, None, b"", time.monotonic() - started, "timeout: no answer within the bound")
    except (Closed, OSError) as exc:
        return Outcome(case, pass_no, None, b"", time.monotonic() - started, f"no answer: {exc!r}")
    finally:
        conn.close()


def over_limit_cases() -> list[tuple[Case, bytes, bool]]:
    """Bodies over the body limit (really sent), and a small body whose Content-Length claims more than the limit."""
    huge = b'{"rows": [{"txn_id": "' + b"z" * (BODY_LIMIT + (1 << 20)) + b'"}]}'
    return [
        (Case("over-body-limit", b"", status=frozenset({413})), request_bytes("/predict", huge), False),
        (Case("over-body-limit", b"", status=frozenset({413})),
         request_bytes("/predict", b"[" * (BODY_LIMIT + 4096)), False),
        # the client announces more than the limit and waits for the answer before sending the rest: 413 at once. (A
        # client that half-closes after a short body is the `length-longer-eof` case: a 4xx or a close.)
        (Case("over-body-limit-declared", b"", status=frozenset({413})),
         request_bytes("/predict", b'{"rows": []}', content_length=BODY_LIMIT * 8), False),
    ]


def lying_length(url: str, valid: bytes, pass_no: int) -> list[Outcome]:
    """Content-Length shorter than the body (the rest is garbage for the connection) and longer (the client stops)."""
    outcomes: list[Outcome] = []
    for cut in (1, 7, len(valid) // 2, len(valid) - 1):
        case = Case("length-shorter", valid)
        started = time.monotonic()
        conn = RawConnection(url)
        try:
            conn.send(request_bytes("/predict", valid, content_length=len(valid) - cut))
            status, _, body = conn.response()  # the server parsed a truncated body: a 4xx
            outcomes.append(Outcome(case, pass_no, status, body, time.monotonic() - started))
            conn.sock.shutdown(socket.SHUT_WR)
            for later_status, later_body in conn.after_last():  # the leftover bytes: an error or a close, never 5xx
                later = Case("length-shorter-leftover", b"", status=frozenset(range(400, 500)))
                outcomes.append(Outcome(later, pass_no, later_status, later_body, time.monotonic() - started))
        except TimeoutError:
            outcomes.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, "timeout"))
        except (Closed, OSError) as exc:
            outcomes.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, f"no answer: {exc!r}"))
        finally:
            conn.close()
    for extra in (1, 100, 5000, 10**6):
        # the client half-closes after a body shorter than it announced: a 4xx (400/408) or a plain close, promptly
        case = Case("length-longer-eof", valid, status=frozenset({400, 408, 413}))
        started = time.monotonic()
        conn = RawConnection(url)
        try:
            conn.send(request_bytes("/predict", valid, content_length=len(valid) + extra), shut_write=True)
            answers = conn.after_last()
            first_status, first_body = _first(answers)
            outcomes.append(Outcome(case, pass_no, first_status, first_body, time.monotonic() - started,
                                    None if answers else "closed (allowed)"))
        except TimeoutError:
            outcomes.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, "timeout"))
        except OSError as exc:
            outcomes.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, f"closed (allowed): {exc!r}"))
        finally:
            conn.close()
    return outcomes


def _first(answers: list[tuple[int, bytes]]) -> tuple[int | None, bytes]:
    """The first response's status and body, or (None, b"") when the server closed without one."""
    return answers[0] if answers else (None, b"")


def stalled_body(url: str, valid: bytes, pass_no: int, out: list[Outcome]) -> None:
    """A client that announces more body than it sends and then waits: the server must give up within its timeout."""
    case = Case("length-longer-stalled", valid, status=frozenset({400, 408}))
    started = time.monotonic()
    conn = RawConnection(url)
    try:
        conn.send(request_bytes("/predict", valid, content_length=len(valid) + 50))
        answers = conn.after_last()
        status, body = _first(answers)
        out.append(Outcome(case, pass_no, status, body, time.monotonic() - started, None if answers else "closed (allowed)"))
    except TimeoutError:
        out.append(Outcome(case, pass_no, None, b"", time.monotonic() - started,
                           f"timeout: still open after {CLIENT_BOUND_S:.0f} s (a hang)"))
    except OSError as exc:
        out.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, f"closed (allowed): {exc!r}"))
    finally:
        conn.close()


def keep_alive(url: str, rows: list[dict[str, Any]], pass_no: int) -> tuple[list[Outcome], list[tuple[bytes, bytes]]]:
    """After a 200 on a keep-alive connection, large valid requests (60-110 KB) on the same connection get 200s.

    Returns the outcomes and (body, answer) pairs for comparing with the same body sent alone."""
    full = [r for r in rows if all(v is not None for v in r.values())] or rows

    def big(n: int, width: int, tag: str) -> bytes:
        return _dumps({"rows": [dict(full[i % len(full)]) | {"txn_id": f"{tag}-{i}-" + "k" * width} for i in range(n)]})

    small = _dumps({"rows": full[:1]})
    sequences = [[small, big(MAX_ROWS, 900, "ka1")], [small, big(MAX_ROWS, 900, "ka2"), small],
                 [small, big(60, 800, "ka3"), big(MAX_ROWS, 950, "ka4"), big(2, 10, "ka5")]]
    outcomes, answers = [], []
    assert all(len(max(sequence, key=len)) > 100_000 for sequence in sequences)  # each connection carries a 100 KB+ request
    # the same through httpx: one pooled keep-alive connection, a 200 first
    with httpx.Client(timeout=httpx.Timeout(CLIENT_BOUND_S), limits=httpx.Limits(max_connections=1)) as client:
        for body in sequences[0]:
            outcome = send_case(client, url, Case("keep-alive", body, good=True), pass_no)
            outcome.phase = "keep-alive"
            outcomes.append(outcome)
            answers.append((body, outcome.body))
    for sequence in sequences:
        conn = RawConnection(url)
        try:
            for body in sequence:
                case = Case("keep-alive", body, good=True)
                started = time.monotonic()
                try:
                    conn.send(request_bytes("/predict", body))
                    status, _, answer = conn.response()
                    outcomes.append(Outcome(case, pass_no, status, answer, time.monotonic() - started, phase="keep-alive"))
                    answers.append((body, answer))
                except TimeoutError:
                    outcomes.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, "timeout", "keep-alive"))
                    break
                except (Closed, OSError) as exc:
                    outcomes.append(Outcome(case, pass_no, None, b"", time.monotonic() - started, f"no answer: {exc!r}",
                                            "keep-alive"))
                    break
        finally:
            conn.close()
    return outcomes, answers


async def _concurrent(url: str, cases: list[Case], pass_no: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=len(cases), max_keepalive_connections=len(cases))
    timeout = httpx.Timeout(CLIENT_BOUND_S)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers={**AUTH, **JSON}) as client:

        async def one(case: Case) -> Outcome:
            started = time.monotonic()
            try:
                response = await client.post(f"{url}/predict", content=case.body)
                return Outcome(case, pass_no, response.status_code, response.content, time.monotonic() - started,
                               phase="concurrent")
            except httpx.TimeoutException as exc:
                return Outcome(case, pass_no, None, b"", time.monotonic() - started, f"timeout: {exc!r}", "concurrent")
            except httpx.HTTPError as exc:
                return Outcome(case, pass_no, None, b"", time.monotonic() - started, f"no answer: {exc!r}", "concurrent")

        return list(await asyncio.gather(*(one(c) for c in cases)))


def metric_total(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples whose labels include ``labels`` (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=CLIENT_BOUND_S).text
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------------------------------- memory
def endpoint_processes(serving: Any, url: str) -> list[Any]:
    """The endpoint's processes (:func:`kiln.process.recorded_processes`): every pid of its endpoint record and router
    config, every process listening on its port, and their descendants. Processes of other pipelines are never included."""
    from kiln.process import recorded_processes

    return recorded_processes([serving.state(NAME), serving.router_config(NAME)], _host_port(url)[1])


# ---------------------------------------------------------------------------------------------------- the two passes
@pytest.fixture(scope="module")
def fuzzed(endpoint: dict[str, Any]) -> dict[str, Any]:
    """Both passes' outcomes, the answers of the good requests sent alone, the counter check and the RSS figures."""
    url, rows, spec, serving = endpoint["url"], endpoint["rows"], endpoint["spec"], endpoint["serving"]
    cases = build_cases(rows, spec)
    crowd = concurrent_cases(rows, spec)
    valid = _dumps({"rows": rows[:2]})
    alone: dict[bytes, bytes] = {}  # good body -> its answer sent alone on a fresh connection (pass 1, before the crowd)
    for case in crowd:
        if case.good:
            response = httpx.post(f"{url}/predict", content=case.body, headers={**AUTH, **JSON}, timeout=CLIENT_BOUND_S)
            assert response.status_code == 200, response.text[:500]
            alone[case.body] = response.content
    outcomes: list[Outcome] = []
    counted: list[tuple[float, float, int]] = []
    rss: list[int] = []
    processes: list[list[int]] = []
    keep_alive_answers: list[tuple[bytes, bytes]] = []
    for pass_no in (1, 2):
        stalled: list[Outcome] = []
        waiter = threading.Thread(target=stalled_body, args=(url, valid, pass_no, stalled), daemon=True)
        waiter.start()  # in the background for the whole pass: it may take the server's full timeout
        with httpx.Client(timeout=httpx.Timeout(CLIENT_BOUND_S)) as client:
            for case in cases:
                outcomes.append(send_case(client, url, case, pass_no))
        for case, payload, shut in over_limit_cases():
            outcomes.append(send_raw(url, case, pass_no, payload, shut_write=shut))
        outcomes += lying_length(url, valid, pass_no)
        ka, ka_answers = keep_alive(url, rows, pass_no)
        outcomes += ka
        keep_alive_answers += ka_answers
        # a client-sent X-Kiln-Requests (and other internal-looking headers) must not change what is counted
        before = metric_total(url, "kiln_requests_total", pipeline=NAME, status="200")
        headers = {"X-Kiln-Requests": "1000", "X-Kiln-Arm": "challenger", "X-Kiln-Admin": "1"}
        spoofed = [Case("spoofed-header", valid, headers=headers, good=True) for _ in range(5)]
        with httpx.Client(timeout=httpx.Timeout(CLIENT_BOUND_S)) as client:
            outcomes += [send_case(client, url, case, pass_no) for case in spoofed]
        after = metric_total(url, "kiln_requests_total", pipeline=NAME, status="200")
        counted.append((before, after, len(spoofed)))
        outcomes += asyncio.run(_concurrent(url, crowd, pass_no))
        waiter.join(timeout=CLIENT_BOUND_S + 10)
        assert not waiter.is_alive(), "the stalled-body client outlived its own bound"
        outcomes += stalled
        procs = endpoint_processes(serving, url)
        processes.append(sorted(p.pid for p in procs))
        rss.append(rss_bytes(procs))
    summarize(outcomes, rss, processes)
    return {"outcomes": outcomes, "alone": alone, "counted": counted, "rss": rss, "processes": processes,
            "keep_alive_answers": keep_alive_answers, "url": url, "rows": rows}


def summarize(outcomes: list[Outcome], rss: list[int], processes: list[list[int]]) -> None:
    """Print what each kind of request got (shown with ``pytest -rA``): counts per status, the slowest exchange."""
    kinds: dict[str, list[Outcome]] = {}
    for o in outcomes:
        kinds.setdefault(o.case.kind, []).append(o)
    print(f"{len(outcomes)} exchanges in 2 passes")
    for kind, items in sorted(kinds.items()):
        statuses: dict[str, int] = {}
        for o in items:
            key = str(o.status) if o.status is not None else (o.failure or "none").split(":")[0]
            statuses[key] = statuses.get(key, 0) + 1
        print(f"  {kind:<26} {len(items):>4}  {statuses}  slowest {max(o.seconds for o in items):.2f} s")
    print(f"endpoint RSS after pass 1 {rss[0] / 2**20:.1f} MB, after pass 2 {rss[1] / 2**20:.1f} MB; processes {processes}")


def _report(bad: list[Outcome], why: Callable[[Outcome], str]) -> str:
    by_kind: dict[str, list[Outcome]] = {}
    for o in bad:
        by_kind.setdefault(o.case.kind, []).append(o)
    lines = [f"{len(bad)} exchange(s) break it:"]
    for kind, items in sorted(by_kind.items()):
        lines.append(f"  {kind}: {len(items)} x, e.g. {why(items[0])} | {items[0].case.describe()[:200]}")
    return "\n".join(lines)


def _error_text(o: Outcome) -> str | None:
    try:
        payload = json.loads(o.body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, str) and error else None


def _allowed_close(o: Outcome) -> bool:
    return o.status is None and (o.failure or "").startswith("closed (allowed)")


# ---------------------------------------------------------------------------------------------------- the properties
def test_at_least_600_requests_per_pass_and_both_passes_identical(fuzzed: dict[str, Any]) -> None:
    per_pass = [[o for o in fuzzed["outcomes"] if o.pass_no == p] for p in (1, 2)]
    assert all(len(p) >= MIN_REQUESTS_PER_PASS for p in per_pass), [len(p) for p in per_pass]
    sequential = [[o.case for o in p if o.phase == "sequential" and not o.case.kind.startswith("length")] for p in per_pass]
    assert sequential[0] == sequential[1]  # the same seeded requests, in the same order
    assert sum(1 for o in per_pass[0] if o.case.good) >= 300


def test_no_5xx_and_every_request_answered(fuzzed: dict[str, Any]) -> None:
    bad = [o for o in fuzzed["outcomes"] if (o.status is not None and o.status >= 500) or (o.status is None and not _allowed_close(o))]
    assert not bad, _report(bad, lambda o: f"status {o.status} {o.failure or ''} {o.body[:160]!r}")


def test_no_exchange_outlives_the_configured_timeout(fuzzed: dict[str, Any]) -> None:
    slow = [o for o in fuzzed["outcomes"] if o.seconds > CLIENT_BOUND_S or (o.failure or "").startswith("timeout")]
    assert not slow, _report(slow, lambda o: f"{o.seconds:.1f} s {o.failure or ''}")


def test_statuses_are_what_http_says(fuzzed: dict[str, Any]) -> None:
    """Good requests 200; bad input 4xx; wrong method 405; wrong content type or any Content-Encoding 415; 413 beyond
    the body or row limit; every 4xx answer on /predict is JSON ``{"error": "..."}``."""
    wrong = []
    for o in fuzzed["outcomes"]:
        if o.status is None:
            continue
        expected = {200} if o.case.good else o.case.status or set(range(400, 500))
        if o.status not in expected:
            wrong.append((o, f"status {o.status}, expected {sorted(expected)[:5]}"))
        elif 400 <= o.status < 500 and _error_text(o) is None and o.case.kind not in HTTP_LAYER:
            wrong.append((o, f"status {o.status} without a JSON error: {o.body[:120]!r}"))
    reasons = {id(o): why for o, why in wrong}
    assert not wrong, _report([o for o, _ in wrong], lambda o: reasons[id(o)])


def test_errors_name_the_field_and_the_row(fuzzed: dict[str, Any]) -> None:
    missing = []
    for o in fuzzed["outcomes"]:
        if o.status is None or not 400 <= o.status < 500 or not (o.case.names or o.case.row is not None):
            continue
        error = _error_text(o) or ""
        named = all(name in error for name in o.case.names)
        row_named = o.case.row is None or re.search(ROW_INDEX.format(i=o.case.row), error) is not None
        if not (named and row_named):
            missing.append(o)
    assert not missing, _report(missing, lambda o: f"wants {o.case.names} row {o.case.row}; got {(_error_text(o) or '')[:160]!r}")


def test_good_answers_are_identical_alone_concurrent_and_across_passes(fuzzed: dict[str, Any]) -> None:
    alone = fuzzed["alone"]
    differ = []
    first: dict[tuple[bytes, str], bytes] = {}
    for o in fuzzed["outcomes"]:
        if not o.case.good or o.status != 200:
            continue
        if o.case.kind == "concurrent-good" and json.loads(o.body) != json.loads(alone[o.case.body]):
            differ.append(o)
        key = (o.case.body, o.case.kind)
        if key in first and json.loads(first[key]) != json.loads(o.body):
            differ.append(o)
        first.setdefault(key, o.body)
    for body, answer in fuzzed["keep_alive_answers"]:  # a keep-alive answer equals the same body on a connection of its own
        fresh = httpx.post(f"{fuzzed['url']}/predict", content=body, headers={**AUTH, **JSON}, timeout=CLIENT_BOUND_S)
        if fresh.status_code != 200 or fresh.json() != json.loads(answer or b"null"):
            differ.append(Outcome(Case("keep-alive", body, good=True), 0, fresh.status_code, fresh.content, 0.0))
    assert not differ, _report(differ, lambda o: f"answer {o.body[:120]!r}")
    concurrent = [o for o in fuzzed["outcomes"] if o.case.kind == "concurrent-good"]
    assert len(concurrent) == 2 * CONCURRENT_GOOD and all(o.status == 200 for o in concurrent)


def test_a_large_request_after_a_200_on_a_keep_alive_connection_is_served(fuzzed: dict[str, Any]) -> None:
    ka = [o for o in fuzzed["outcomes"] if o.case.kind == "keep-alive"]
    assert len(ka) == 2 * 11 and {o.status for o in ka} == {200}, [(len(o.case.body), o.status, o.failure, o.body[:100]) for o in ka]


def test_a_client_cannot_inflate_the_request_counter(fuzzed: dict[str, Any]) -> None:
    for before, after, sent in fuzzed["counted"]:
        assert after - before == sent, f"kiln_requests_total grew by {after - before} for {sent} requests carrying X-Kiln-Requests: 1000"


def test_endpoint_memory_settles_over_a_second_identical_pass(fuzzed: dict[str, Any]) -> None:
    first, second = fuzzed["rss"]
    assert first > 0 and fuzzed["processes"][0], "no endpoint process found"
    growth = (second - first) / first
    assert growth <= RSS_GROWTH_LIMIT, (f"endpoint RSS {first / 2**20:.0f} MB after pass 1 -> {second / 2**20:.0f} MB after pass 2 "
                                        f"({growth:+.1%}); processes {fuzzed['processes']}")
