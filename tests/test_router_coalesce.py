"""The router's coalescing of concurrent ``/predict`` requests (serving.router.Coalescer), against a small scoring
backend on a real socket: one upstream request per batch, each client its own slice, and every client its own
answer when the combined request is refused or fails."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from serving.proxy import JSON_HEADERS, Request, Response
from serving.router import Router
from tests.test_router_proxy import run, serve


class Backend:
    """Scores ``x * 2`` per row; refuses a body other than ``{"rows": [...]}`` and a row with ``bad`` (400 naming it);
    fails (500) any request of more than one row while ``fail_batches`` is set. Records the rows and
    ``X-Kiln-Requests`` of every request it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes | None, bytes]] = []
        self.fail_batches = False

    async def handle(self, request: Request) -> Response:
        try:
            payload = json.loads(request.body)
            rows = payload["rows"]
            assert set(payload) == {"rows"} and isinstance(rows, list) and rows
        except (ValueError, KeyError, TypeError, AssertionError):
            self.calls.append((0, request.headers.get(b"x-kiln-requests"), request.body))
            return Response(400, JSON_HEADERS, b'{"error":"body: expected {\\"rows\\": [...]}"}')
        self.calls.append((len(rows), request.headers.get(b"x-kiln-requests"), request.body))
        for i, row in enumerate(rows):
            if "bad" in row:
                return Response(400, JSON_HEADERS, json.dumps({"error": f"rows[{i}].bad: not a column"}).encode())
        if self.fail_batches and len(rows) > 1:
            return Response(500, JSON_HEADERS, b'{"error":"scoring failed"}')
        body = json.dumps({"predictions": [row["x"] * 2.0 for row in rows], "model_version": "7"}).encode()
        return Response(200, [*JSON_HEADERS, (b"x-kiln-model-version", b"7")], body)


def _router(tmp_path: Path, port: int, max_batch_rows: int) -> Router:
    url = f"http://127.0.0.1:{port}"
    config = {"champion": {"url": url, "lane_url": url, "version": "7", "workers": 1, "max_batch_rows": max_batch_rows},
              "challenger": None, "mode": "none", "admin_token": "t"}
    (tmp_path / "router.json").write_text(json.dumps(config))
    return Router(tmp_path / "router.json")


def _predict(body: Any, raw: bytes | None = None) -> Request:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    return Request("POST", "/predict", b"", dict(headers), headers, content, "127.0.0.1")


async def _scenario(tmp_path: Path, requests: list[Request], max_batch_rows: int = 4,
                    fail_batches: bool = False) -> tuple[list[Response], Backend]:
    backend = Backend()
    backend.fail_batches = fail_batches
    server, port, _ = await serve(backend.handle)
    router = _router(tmp_path, port, max_batch_rows)
    try:
        answers = await asyncio.gather(*(router.handle(r) for r in requests))
    finally:
        for pool in router.upstreams.values():
            pool.close()
        server.close()
    return list(answers), backend


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_KEY", raising=False)


def test_concurrent_requests_share_upstream_requests_and_get_their_own_slices(tmp_path: Path) -> None:
    requests = [_predict({"rows": [{"x": i}]}) for i in range(6)] + [_predict({"rows": [{"x": 10}, {"x": 11}]})]
    answers, backend = run(_scenario(tmp_path, requests))
    for i, answer in enumerate(answers[:6]):
        assert answer.status == 200 and json.loads(answer.body) == {"predictions": [i * 2.0], "model_version": "7"}
        assert (b"x-kiln-model-version", b"7") in answer.headers and (b"x-kiln-arm", b"champion") in answer.headers
    assert json.loads(answers[6].body)["predictions"] == [20.0, 22.0]
    # The first request goes at once; the others queue while it is out and go as batches of at most 4 rows.
    assert len(backend.calls) < len(requests) and all(rows <= 4 for rows, _, _ in backend.calls)
    combined = [(rows, n) for rows, n, _ in backend.calls if n is not None]
    assert combined and sum(int(n) for _, n in combined) + sum(1 for _, n, _ in backend.calls if n is None) == len(requests)


def test_a_refused_combined_request_is_resent_alone_so_each_client_gets_its_own_answer(tmp_path: Path) -> None:
    requests = [_predict({"rows": [{"x": 1}]}), _predict({"rows": [{"x": 2}]}), _predict({"rows": [{"x": 3, "bad": 1}]}),
                _predict({"rows": [{"x": 4}]})]
    answers, backend = run(_scenario(tmp_path, requests))
    assert [a.status for a in answers] == [200, 200, 400, 200]
    assert json.loads(answers[2].body)["error"] == "rows[0].bad: not a column"  # its own row index, not the batch's
    assert [json.loads(a.body)["predictions"] for a in (answers[0], answers[1], answers[3])] == [[2.0], [4.0], [8.0]]
    assert any(n is not None for _, n, _ in backend.calls)  # a combined request was tried, and refused


def test_a_failed_combined_request_is_resent_alone(tmp_path: Path) -> None:
    requests = [_predict({"rows": [{"x": i}]}) for i in range(5)]
    answers, backend = run(_scenario(tmp_path, requests, fail_batches=True))
    assert [a.status for a in answers] == [200] * 5
    assert [json.loads(a.body)["predictions"] for a in answers] == [[i * 2.0] for i in range(5)]
    assert any(rows > 1 for rows, _, _ in backend.calls)


def test_bodies_that_are_not_plain_rows_go_alone_and_unchanged(tmp_path: Path) -> None:
    odd = [b'{"rows": [{"x": 1}], "extra": 1}', b'{"rows": []}', b"not json", b'[{"x": 1}]']
    requests = [_predict({"rows": [{"x": 5}]})] + [_predict(None, raw=body) for body in odd]
    answers, backend = run(_scenario(tmp_path, requests))
    assert [a.status for a in answers] == [200, 400, 400, 400, 400]
    assert json.loads(answers[0].body)["predictions"] == [10.0]
    assert sorted(body for _, _, body in backend.calls if body in odd) == sorted(odd)  # each sent alone, as it was
    assert all(n is None for _, n, _ in backend.calls)


def test_a_clients_request_count_header_is_never_trusted(tmp_path: Path) -> None:
    """A client sending ``X-Kiln-Requests: 1000`` must not count as 1,000 requests: the router drops the header, and
    only its coalescer sets it (to the number of client requests it combined)."""
    def lying(body: Any) -> Request:
        headers = [(b"content-type", b"application/json"), (b"x-kiln-requests", b"1000")]
        return Request("POST", "/predict", b"", dict(headers), headers, json.dumps(body).encode(), "127.0.0.1")

    requests = [lying({"rows": [{"x": i}]}) for i in range(6)]
    answers, backend = run(_scenario(tmp_path, requests))
    assert [a.status for a in answers] == [200] * 6
    counts = [n for _, n, _ in backend.calls]
    assert b"1000" not in counts
    assert sum(int(n) for n in counts if n is not None) + counts.count(None) == len(requests)
