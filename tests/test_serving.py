"""A live endpoint (router + `bentoml serve`) for a small pipeline: strict input, fuzzing, metrics, API-key auth,
HTTP rules in front of /predict, OpenAPI and a typed client, batching, a zero-downtime roll under a concurrent client,
canary share and shadow mirroring, release decisions from the backends' own metrics."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port
from tests.results import fraud_endpoint

NAME = "servetest"
DAYS = 2
ROWS = 1500
API_KEY = "test-key-3f9a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def world(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    def edit(data: dict[str, Any]) -> None:
        data["trainer"]["params"]["num_boost_round"] = 3  # a weak first champion: the roll test's retrain (60 rounds) beats it
        data["serving"].update(port=free_port(), workers=1, max_batch_rows=50)

    with fraud_endpoint(tmp_path_factory.mktemp("serving-pipelines"), NAME, days=DAYS, rows=ROWS, seed=4, edit=edit,
                        api_key=API_KEY) as world:
        yield world


def _post(url: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> httpx.Response:
    hdrs = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{url}/predict", content=content, headers=hdrs, timeout=30)


def test_prediction_header_and_version(world: dict[str, Any]) -> None:
    response = _post(world["url"], {"rows": world["rows"][:5]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 5 and all(0.0 <= p <= 1.0 for p in body["predictions"])
    assert response.headers["X-Kiln-Model-Version"] == body["model_version"] == world["serving"].state(NAME)["model_version"]


def _row(world: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return dict(world["rows"][0]) | changes


@pytest.mark.parametrize(
    ("make", "status", "field"),
    [
        (lambda w: {"rows": [{k: v for k, v in _row(w).items() if k != "amount"}]}, 400, "amount"),
        (lambda w: {"rows": [_row(w, colour="red")]}, 400, "colour"),
        (lambda w: {"rows": [_row(w, amount="lots")]}, 400, "amount"),
        (lambda w: {"rows": [_row(w, txns_last_24h=True)]}, 400, "txns_last_24h"),
        (lambda w: {"rows": [_row(w, customer_age=30.5)]}, 400, "customer_age"),
        (lambda w: {"rows": [_row(w, amount=-5.0)]}, 400, "amount"),
        (lambda w: {"rows": [_row(w, amount=10**400)]}, 400, "amount"),
        (lambda w: {"rows": [_row(w, txns_last_24h=10**30)]}, 400, "txns_last_24h"),
        (lambda w: {"rows": [_row(w, country="XX")]}, 400, "country"),
        (lambda w: {"rows": [_row(w, ts="not a time")]}, 400, "ts"),
        (lambda w: {"rows": [_row(w, channel={"nested": 1})]}, 400, "channel"),
        (lambda w: {"rows": [_row(w, txn_id=None)]}, 400, "txn_id"),
        (lambda w: {"rows": []}, 400, "rows"),
        (lambda w: {"rows": [_row(w)] * 51}, 413, "rows"),
        (lambda w: {"rows": "x"}, 400, "rows"),
        (lambda w: [1, 2], 400, "body"),
        (lambda w: {"rows": [_row(w)], "extra": 1}, 400, "extra"),
    ],
)
def test_strict_input_gets_4xx_naming_the_field(world: dict[str, Any], make: Any, status: int, field: str) -> None:
    response = _post(world["url"], make(world))
    assert response.status_code == status, response.text
    assert field in response.json()["error"]


def test_non_finite_and_malformed_json_get_400(world: dict[str, Any]) -> None:
    nan = json.dumps({"rows": [_row(world, amount=float("nan"))]}).encode()
    for raw in (nan, b"{", b"", b"\xff\xfe\x00", b"[" * 50_000, b'{"rows": [' + b"1," * 1000 + b"1]}"):
        response = _post(world["url"], None, raw=raw)
        assert 400 <= response.status_code < 500 and response.json()["error"], (raw[:40], response.status_code, response.text[:200])


JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=6)


@st.composite
def bad_body(draw: Any, rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    """A request derived from valid rows by one or more schema-breaking mutations, or junk bytes."""
    kind = draw(st.sampled_from(["value", "drop", "extra", "toplevel", "bytes", "rowtype"]))
    row = dict(draw(st.sampled_from(rows)))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "toplevel":
        return json.dumps(draw(JSON_VALUE)).encode()
    if kind == "rowtype":
        return json.dumps({"rows": [row, draw(JSON_LEAF)]}).encode()
    if kind == "drop":
        row.pop(draw(st.sampled_from(columns)))
    elif kind == "extra":
        row[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in columns))] = draw(JSON_VALUE)
    else:
        for column in draw(st.lists(st.sampled_from(columns), min_size=1, max_size=3, unique=True)):
            row[column] = draw(JSON_VALUE)
    return json.dumps({"rows": [row]}).encode()


def test_fuzz_500_malformed_requests_never_5xx(world: dict[str, Any]) -> None:
    columns = world["spec"].input_columns
    seen: dict[int, int] = {}
    client = httpx.Client(timeout=30, headers={**AUTH, "Content-Type": "application/json"})

    @settings(max_examples=600, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bad_body(world["rows"], columns))
    def send(body: bytes) -> None:
        status = client.post(f"{world['url']}/predict", content=body).status_code
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, body[:300]

    try:
        send()
    finally:
        client.close()
    assert sum(seen.values()) >= 500, seen
    assert sum(n for s, n in seen.items() if 400 <= s < 500) >= 450, seen  # nearly all mutations break the contract
    assert _post(world["url"], {"rows": world["rows"][:3]}).status_code == 200


def test_api_key_required_but_health_open(world: dict[str, Any]) -> None:
    url = world["url"]
    body = json.dumps({"rows": world["rows"][:1]}).encode()
    assert httpx.post(f"{url}/predict", content=body, timeout=30).status_code == 401
    assert httpx.post(f"{url}/predict", content=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert httpx.post(f"{url}/predict", content=body, headers={"X-API-Key": API_KEY}, timeout=30).status_code == 200
    assert httpx.get(f"{url}/metadata", timeout=30).status_code == 401
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200, path


def test_metrics_and_metadata(world: dict[str, Any]) -> None:
    url = world["url"]
    assert _post(url, {"rows": world["rows"][:4]}).status_code == 200
    assert _post(url, {"rows": []}).status_code == 400
    text = httpx.get(f"{url}/metrics", timeout=30).text
    version = world["serving"].state(NAME)["model_version"]
    for series in ("bentoml_service_request_total", "bentoml_service_request_duration_seconds", "kiln_requests_total",
                   "kiln_request_duration_seconds_bucket", "kiln_batch_rows_bucket", "kiln_prediction_score_bucket",
                   "kiln_batch_requests_bucket", "kiln_router_requests_total"):
        assert series in text, series
    assert f'model_version="{version}"' in text and 'status="400"' in text
    meta = httpx.get(f"{url}/metadata", headers=AUTH, timeout=30).json()
    assert meta["pipeline"] == NAME and meta["model_version"] == version and meta["input_columns"] == world["spec"].input_columns


def _series(text: str, name: str) -> float:
    """The sum of a Prometheus series' samples in a /metrics text (0 when absent)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def _sample(text: str, sample: str) -> float:
    """The value of one exact sample (name and label set) in a /metrics text (0 when absent)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " "))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(world: dict[str, Any]) -> None:
    """Concurrent /predict requests share scored batches (BentoML's adaptive batching in the model service); every
    client still gets exactly the answer it gets alone, a bad request its own 4xx naming its row and field, every
    answer is counted once and every scored request sits in exactly one batch."""
    from concurrent.futures import ThreadPoolExecutor

    url = world["url"]
    rows = [_row(world, txn_id=f"batch-{i}", amount=float(5 + 7 * i)) for i in range(24)]
    alone = {}
    for row in rows:
        r = _post(url, {"rows": [row]})
        assert r.status_code == 200, r.text
        alone[row["txn_id"]] = r.json()
    bad = [{"rows": [_row(world, txn_id=f"bad-{i}"), _row(world, txn_id=f"bad-{i}", country="XX")]} for i in range(4)]
    bodies = [{"rows": [row]} for row in rows] + bad + [{"rows": rows[:3]}]
    before = httpx.get(f"{url}/metrics", timeout=30).text

    def send(body: dict[str, Any]) -> httpx.Response:
        return _post(url, body)

    answers: list[tuple[dict[str, Any], httpx.Response]] = []
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        for _ in range(5):
            answers += list(zip(bodies, pool.map(send, bodies), strict=True))
    after = httpx.get(f"{url}/metrics", timeout=30).text
    for body, response in answers:
        first = body["rows"][0]
        if first["txn_id"].startswith("bad-"):
            assert response.status_code == 400 and response.json()["error"].startswith("rows[1].country: "), response.text
            continue
        assert response.status_code == 200, response.text
        if len(body["rows"]) == 1:
            assert response.json() == alone[first["txn_id"]]
        else:
            assert response.json()["predictions"] == [alone[r["txn_id"]]["predictions"][0] for r in body["rows"]]
    served = sum(1 for body, _ in answers if not body["rows"][0]["txn_id"].startswith("bad-"))
    version = world["serving"].state(NAME)["model_version"]
    labels = f'model_version="{version}",pipeline="{NAME}"'

    def delta(name: str) -> float:
        return _series(after, name) - _series(before, name)

    def answers_of(status: int) -> float:
        sample = f'kiln_requests_total{{{labels},status="{status}"}}'
        return _sample(after, sample) - _sample(before, sample)

    assert answers_of(200) == served and answers_of(400) == len(bad) * 5
    assert delta("kiln_batch_requests_sum") == served  # each scored request in exactly one batch
    assert delta("kiln_predicted_rows_total") == served + 5 * 2  # the 3-row request: 2 rows more


def test_http_rules_in_front_of_predict(world: dict[str, Any]) -> None:
    """405/415/413 where HTTP says so, every 4xx a JSON error, hostile values a 400 naming row and field, and no client
    X-Kiln-* header trusted (a client's X-Kiln-Requests adds nothing to the counts)."""
    url = world["url"]
    body = json.dumps({"rows": world["rows"][:1]}).encode()
    for method in ("GET", "PUT", "DELETE"):
        r = httpx.request(method, f"{url}/predict", headers=AUTH, timeout=30)
        assert r.status_code == 405 and "POST /predict" in r.json()["error"], (method, r.text)
    assert httpx.post(f"{url}/metadata", headers=AUTH, timeout=30).status_code == 405
    r = _post(url, None, raw=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]
    import gzip

    r = _post(url, None, raw=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]
    r = _post(url, None, raw=b'{"rows": ["' + b"x" * (33 * 1024 * 1024) + b'"]}')
    assert r.status_code == 413 and r.json()["error"]
    hostile = [
        ({"ts": "9999-12-31T23:59:59-01:00"}, "rows[1].ts: "),
        ({"txn_id": "\ud800"}, "rows[1].txn_id: not valid Unicode"),
        ({"txn_id": "x" * 2000}, "rows[1].txn_id: text of 2000 characters exceeds"),
        ({"amount": -5.0}, "rows[1].amount: "),
    ]
    for change, message in hostile:
        r = _post(url, {"rows": [_row(world), _row(world, **change)]})
        assert r.status_code == 400 and r.json()["error"].startswith(message), (change, r.text[:300])
    raw = json.dumps({"rows": [_row(world)]}).encode().replace(str(_row(world)["txn_id"]).encode(), b"\xed\xa0\x80", 1)
    r = _post(url, None, raw=raw)
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"], r.text
    version = world["serving"].state(NAME)["model_version"]
    ok = f'kiln_requests_total{{model_version="{version}",pipeline="{NAME}",status="200"}}'
    before = _sample(httpx.get(f"{url}/metrics", timeout=30).text, ok)
    r = _post(url, None, raw=body, headers={"X-Kiln-Requests": "1000", "X-Kiln-Arm": "challenger", "X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42" and r.headers["x-kiln-arm"] == "champion"
    assert _sample(httpx.get(f"{url}/metrics", timeout=30).text, ok) - before == 1
    assert len(_post(url, None, raw=body).headers["x-request-id"]) == 32  # none given: one made for the request


def test_openapi_lists_every_column_with_its_limits_and_a_typed_client_works(world: dict[str, Any]) -> None:
    import bentoml

    spec = world["spec"]
    backend = world["serving"].router_config(NAME)["champion"]["url"]
    docs = httpx.get(f"{world['url']}/docs.json", timeout=30).json()
    assert "/predict" in docs["paths"]
    schemas = docs["components"]["schemas"]
    row = next(s for s in schemas.values() if set(s.get("properties", {})) == set(spec.input_columns))
    props = row["properties"]
    assert props["amount"]["minimum"] == spec.schema_["amount"].min and props["amount"]["maximum"] == spec.schema_["amount"].max
    assert props["country"]["enum"] == spec.schema_["country"].allowed
    assert props["txn_id"]["maxLength"] == spec.serving.max_string_chars and props["ts"]["format"] == "date-time"
    assert row["additionalProperties"] is False and set(row["required"]) == set(spec.input_columns)
    client = bentoml.SyncHTTPClient(backend, token=API_KEY)
    try:
        typed = client.predict(rows=world["rows"][:2])
    finally:
        client.close()
    assert typed == _post(world["url"], {"rows": world["rows"][:2]}).json()


def test_roll_to_a_new_version_under_load_has_no_failed_request(world: dict[str, Any]) -> None:
    from kiln.process import pid_alive
    from platform_defs.lifecycle import retrain

    serving, url = world["serving"], world["url"]
    before = serving.state(NAME)
    old_home = serving.router_config(NAME)["champion"]["bentoml_home"]  # the backend's own BENTOML_HOME
    assert os.path.isdir(old_home)
    results: list[tuple[int, str | None]] = []
    errors: list[str] = []
    stop = threading.Event()
    body = json.dumps({"rows": world["rows"][:2]}).encode()

    def client() -> None:
        with httpx.Client(timeout=30, headers={**AUTH, "Content-Type": "application/json"}) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{url}/predict", content=body)
                    results.append((r.status_code, r.headers.get("X-Kiln-Model-Version")))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                time.sleep(0.005)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    # A retrain on the same rows only rolls when it is strictly better: the same pipeline with more boosting rounds.
    from platform_defs.definitions import build_definitions

    params = world["spec"].trainer.params | {"num_boost_round": 60}
    stronger = world["spec"].model_copy(update={"trainer": world["spec"].trainer.model_copy(update={"params": params})})
    try:
        result = retrain(build_definitions([stronger]), stronger, world["instance"], progress=lambda _: None)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert result.success
    after = serving.state(NAME)
    assert after["model_version"] != before["model_version"] and after["url"] == before["url"]
    assert after["router_pid"] == before["router_pid"] and not pid_alive(before["backend_pid"])
    assert not os.path.exists(old_home) and os.path.isdir(serving.router_config(NAME)["champion"]["bentoml_home"])
    assert not errors, errors[:3]
    statuses = {s for s, _ in results}
    versions = [v for _, v in results]
    assert statuses == {200}, statuses
    assert versions[0] == before["model_version"] and versions[-1] == after["model_version"], (versions[0], versions[-1])
    assert len(results) > 50
    world["previous"] = before


def test_canary_share_and_shadow_never_served(world: dict[str, Any]) -> None:
    from kiln.process import pid_alive

    serving, url = world["serving"], world["url"]
    champion = serving.state(NAME)
    previous = world.get("previous")
    if previous is None:
        pytest.skip("needs the roll test's previous version as the challenger")
    challenger = serving.deploy_challenger(NAME, previous["bento"], previous["model_tag"], previous["model_version"],
                                           mode="canary", share=0.3)
    assert challenger["challenger"]["mode"] == "canary"
    n = 400
    arms: dict[str, str] = {}
    with httpx.Client(timeout=30, headers={**AUTH, "Content-Type": "application/json"}) as http:
        for i in range(n):
            row = _row(world, txn_id=f"canary-{i}")
            r = http.post(f"{url}/predict", content=json.dumps({"rows": [row]}).encode())
            assert r.status_code == 200, r.text
            arms[row["txn_id"]] = r.json()["model_version"]
            assert r.headers["x-kiln-arm"] == ("challenger" if arms[row["txn_id"]] == previous["model_version"] else "champion")
        share = sum(v == previous["model_version"] for v in arms.values()) / n
        assert abs(share - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5, share  # 4 sigma
        for key in list(arms)[:40]:  # stable: the same key always lands in the same arm
            r = http.post(f"{url}/predict", content=json.dumps({"rows": [_row(world, txn_id=key)]}).encode())
            assert r.json()["model_version"] == arms[key]

        report = serving.challenger_report(NAME)
        assert report["mode"] == "canary" and report["arms"][f"challenger:{previous['model_version']}"]["requests"] > 0
        assert report["weights"] == {"champion": 70, "challenger": 30}
        canary_served = sum(v == previous["model_version"] for v in arms.values()) + sum(
            arms[k] == previous["model_version"] for k in list(arms)[:40])
        assert report["versions"][previous["model_version"]]["requests"] == canary_served  # the backend's own count

        canary_home = serving.router_config(NAME)["challenger"]["bentoml_home"]
        shadow = serving.deploy_challenger(NAME, previous["bento"], previous["model_tag"], previous["model_version"], mode="shadow")
        assert not os.path.exists(canary_home)
        assert not pid_alive(challenger["challenger"]["pid"])  # the canary backend was replaced
        m = 100
        for i in range(m):
            r = http.post(f"{url}/predict", content=json.dumps({"rows": [_row(world, txn_id=f"shadow-{i}")]}).encode())
            assert r.status_code == 200 and r.json()["model_version"] == champion["model_version"]
            assert r.headers["x-kiln-arm"] == "champion"
    deadline = time.monotonic() + 60
    mirrored = 0
    while time.monotonic() < deadline:
        report = serving.challenger_report(NAME)
        mirrored = report["arms"].get(f"challenger:{previous['model_version']}", {}).get("requests", 0)
        if mirrored >= m:
            break
        time.sleep(0.5)
    assert mirrored == m
    serving.router_call(NAME, "/_kiln/flush")  # mirrored answers counted after the report's own flush are still buffered
    log = [json.loads(line) for line in Path(serving.router_config(NAME)["arm_log"]).read_text().splitlines()]
    shadow_rows = [e for e in log if e["arm"] == "challenger" and not e["served"]]
    assert len(shadow_rows) >= m and all(e["predictions"] for e in shadow_rows if e["status"] == 200)
    assert {e["arm"] for e in log} == {"champion", "challenger"}

    serving.abort_challenger(NAME)
    assert not pid_alive(shadow["challenger"]["pid"])
    assert _post(url, {"rows": world["rows"][:1]}).json()["model_version"] == champion["model_version"]

    # Promote from live metrics: a canary with full share that answers without errors is promoted, the old champion stops.
    serving.deploy_challenger(NAME, previous["bento"], previous["model_tag"], previous["model_version"], mode="canary", share=1.0)
    for _ in range(30):
        assert _post(url, {"rows": world["rows"][:1]}).status_code == 200
    decision = serving.judge_challenger(NAME, min_requests=20, max_p99_ratio=20.0)  # a noisy shared machine
    assert decision["action"] == "promote", decision
    assert decision["challenger"]["requests"] == 30 and decision["challenger"]["server_errors"] == 0  # its /metrics
    assert serving.state(NAME)["model_version"] == previous["model_version"]
    assert not pid_alive(champion["backend_pid"])
    assert _post(url, {"rows": world["rows"][:1]}).json()["model_version"] == previous["model_version"]


def test_a_stopping_backend_ships_its_buffered_prediction_log(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The served rows reach the state store as Parquet objects with the answer's predictions; rows still buffered
    when a backend stops are shipped by its shutdown hook (a flush interval far longer than the test: only the hook)."""
    import numpy as np
    import polars as pl

    from kiln.predlog import list_log_objects, parse_key, read_log_objects
    from kiln.settings import replica
    from resources.serving import stop_backend
    from tests.results import logged_rows, wait_for_flushed_log

    serving, state_root = world["serving"], world["serving"].state_root
    record = serving.state(NAME)
    # Before the new backend starts (BentoML clears the Prometheus folder its backends share): the champion's
    # earlier rows are all in the store, and it gets no request below.
    wait_for_flushed_log(world["url"], NAME)
    before = set(list_log_objects(state_root, NAME))
    monkeypatch.setenv("KILN_PREDICTION_LOG_FLUSH_SECONDS", "600")
    backend = serving.start_backend(NAME, record["bento"], record["model_tag"], record["model_version"])
    try:
        rows = world["rows"][:5]
        response = _post(backend["url"], {"rows": rows})
        assert response.status_code == 200, response.text
        assert set(list_log_objects(state_root, NAME)) == before  # buffered: the next flush is 10 minutes away
    finally:
        stop_backend(backend)  # SIGTERM, then waits for the process group to exit
    new = sorted(set(list_log_objects(state_root, NAME)) - before)
    assert len(new) == 1 and parse_key(new[0])[2].startswith(f"{replica()}-")  # <KILN_REPLICA>-<worker pid>
    shipped = read_log_objects(state_root, NAME, new)
    assert shipped.height == 5 and logged_rows(state_root, NAME) >= 5
    assert shipped["_model_version"].to_list() == [record["model_version"]] * 5
    np.testing.assert_allclose(shipped["_prediction"].to_numpy(), response.json()["predictions"], rtol=0, atol=0)
    assert shipped["txn_id"].cast(pl.String).to_list() == [str(r["txn_id"]) for r in rows]


def test_endpoint_bookkeeping_stays_local_when_the_state_root_is_on_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pids, router config and logs name processes on this machine: a local folder, never one named after ``s3://``."""
    from resources.serving import ServingResource

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bento = str(tmp_path / "bentoml")
    on_s3 = ServingResource(state_root="s3://bucket/state", bentoml_home=bento)
    assert on_s3.folder("p") == tmp_path / "home" / "serving" / "endpoints" / "p" and on_s3.folder("p").is_dir()
    assert on_s3.state("p") is None and not (tmp_path / "s3:").exists()
    assert ServingResource(state_root="s3://bucket/state", bentoml_home=bento, local_root=str(tmp_path / "ops")).folder("p") == (
        tmp_path / "ops" / "endpoints" / "p")
    local = ServingResource(state_root=str(tmp_path / "state"), bentoml_home=bento)
    assert local.folder("p") == tmp_path / "state" / "endpoints" / "p"  # a folder state root keeps its layout
