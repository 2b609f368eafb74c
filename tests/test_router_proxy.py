"""The router's HTTP/1.1 plumbing (serving/proxy.py) over real sockets on 127.0.0.1: keep-alive reuse, pipelining,
chunked bodies with ``Expect: 100-continue``, malformed requests, and a backend that went away."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from serving.proxy import JSON_HEADERS, Request, Response, ServerProtocol, Upstream


async def echo(request: Request) -> Response:
    body = b'{"method":"%s","path":"%s","len":%d}' % (request.method.encode(), request.path.encode(), len(request.body))
    return Response(200, [*JSON_HEADERS, (b"x-seen-key", request.headers.get(b"x-key", b"-"))], body)


async def serve(handler: Any = echo) -> tuple[asyncio.base_events.Server, int, set[ServerProtocol]]:
    connections: set[ServerProtocol] = set()
    server = await asyncio.get_running_loop().create_server(lambda: ServerProtocol(handler, connections), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_upstream_pool_reuses_one_keep_alive_connection() -> None:
    async def go() -> None:
        server, port, connections = await serve()
        pool = Upstream(f"http://127.0.0.1:{port}")
        for i in range(20):
            answer = await pool.request("POST", b"/predict?x=1", [(b"x-key", b"k%d" % i)], b"abc")
            assert answer.status == 200 and answer.body == b'{"method":"POST","path":"/predict","len":3}'
            assert (b"x-seen-key", b"k%d" % i) in answer.headers
        assert len(connections) == 1 and len(pool.idle) == 1
        pool.close()
        server.close()

    run(go())


def test_real_client_keep_alive_and_status_line() -> None:
    async def go() -> None:
        server, port, _ = await serve()
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                r = await client.post(f"http://127.0.0.1:{port}/x", content=b"12345", headers={"X-Key": "v"})
                assert r.status_code == 200 and r.json() == {"method": "POST", "path": "/x", "len": 5}
                assert r.headers["x-seen-key"] == "v" and r.http_version == "HTTP/1.1"
        server.close()

    run(go())


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # two pipelined requests, answered in order, the second closing the connection
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
         [b'"path":"/a"', b"connection: close", b'"path":"/b"']),
        # a chunked body after Expect: 100-continue
        (b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
         b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", [b"HTTP/1.1 100 Continue", b'"len":5']),
        (b"NOT HTTP AT ALL\r\n\r\n", [b"HTTP/1.1 400 Bad Request", b"malformed HTTP request"]),
        (b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", [b"HTTP/1.1 413"]),
    ],
)
def test_raw_http_edge_cases(data: bytes, expected: list[bytes]) -> None:
    async def go() -> bytes:
        server, port, _ = await serve()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, _raw, port, data)
        finally:
            server.close()

    out = run(go())
    positions = [out.find(piece) for piece in expected]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out[:600]


def test_a_handler_error_is_a_502_and_the_connection_survives() -> None:
    async def broken(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("bug")
        return await echo(request)

    async def go() -> None:
        server, port, _ = await serve(broken)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(f"http://127.0.0.1:{port}/boom")
            assert r.status_code == 502 and "RuntimeError" in r.json()["error"]
            assert (await client.get(f"http://127.0.0.1:{port}/ok")).status_code == 200
        server.close()

    run(go())


def test_a_backend_that_went_away_raises_a_connection_error() -> None:
    async def go() -> None:
        server, port, connections = await serve()
        pool = Upstream(f"http://127.0.0.1:{port}")
        assert (await pool.request("GET", b"/", [], b"")).status == 200
        server.close()
        for conn in list(connections):  # the backend stops: its keep-alive connections close
            assert conn.transport is not None
            conn.transport.close()
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await pool.request("GET", b"/", [], b"")

    run(go())


def test_head_is_answered_with_headers_only_through_the_pool() -> None:
    async def go() -> None:
        server, port, _ = await serve()
        front, front_port, _ = await serve(lambda r: Upstream(f"http://127.0.0.1:{port}").request(r.method, r.path.encode(), [], b""))
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.head(f"http://127.0.0.1:{front_port}/h")
            assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
        front.close()
        server.close()

    run(go())
