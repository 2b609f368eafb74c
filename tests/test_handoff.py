"""Connection handoff (serving/handoff.py) over real sockets: one client TCP connection moves from a router to a
worker and back (SCM_RIGHTS over AF_UNIX SOCK_SEQPACKET), requests are answered by whoever holds it, nothing is lost
on the way, and a recall brings every connection back. Both ends run in one event loop here (asyncio and uvloop);
`tests/test_serving.py` covers the real router and `bentoml serve` workers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from serving.handoff import BackendChannels, WorkerChannels
from serving.proxy import JSON_HEADERS, GiveBack, Request, Response, ServerProtocol


def _answer(who: str, request: Request) -> Response:
    return Response(200, JSON_HEADERS, json.dumps({"by": who, "path": request.path, "body": request.body.decode()}).encode())


class Client:
    """One raw keep-alive HTTP/1.1 connection (so the test knows every request used the same socket)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        self.sock.sendall(b"%s %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (method.encode(), path.encode(), len(body), body))
        return self.read()

    def read(self) -> dict[str, Any]:
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        assert head.startswith(b"HTTP/1.1 200"), head
        return dict(json.loads(rest[:length]))

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        return chunk

    def close(self) -> None:
        self.sock.close()


async def _world(folder: str) -> tuple[Any, int, BackendChannels, WorkerChannels, set[ServerProtocol], set[ServerProtocol]]:
    loop = asyncio.get_running_loop()
    router_conns: set[ServerProtocol] = set()
    worker_conns: set[ServerProtocol] = set()
    held: dict[Any, set[ServerProtocol]] = {}

    async def router(request: Request) -> Response:
        return _answer("router", request)

    async def worker(request: Request) -> Response:
        if request.path != "/predict":
            raise GiveBack
        return _answer("worker", request)

    def adopt(sock: socket.socket, channel: socket.socket) -> None:  # worker side
        def made() -> ServerProtocol:
            protocol = ServerProtocol(worker, worker_conns, give_back=lambda fd, prefix: workers.given_back(channel, fd, prefix))
            held.setdefault(channel, set()).add(protocol)
            return protocol

        loop.create_task(loop.connect_accepted_socket(made, sock))

    def give_back_all(channel: socket.socket) -> None:
        async def go() -> None:
            await asyncio.sleep(0.01)
            mine = held.pop(channel, set())
            for protocol in mine:
                protocol.release(lambda fd, prefix: workers.given_back(channel, fd, prefix))
            while any(p.transport is not None for p in mine):
                await asyncio.sleep(0.005)
            workers.finished(channel)

        loop.create_task(go())

    workers = WorkerChannels(folder, loop, adopt, give_back_all)

    def returned(sock: socket.socket, prefix: bytes) -> None:  # router side
        loop.create_task(loop.connect_accepted_socket(lambda: ServerProtocol(router, router_conns, prefix=prefix, after=hand_over), sock))

    channels = BackendChannels(folder, loop, returned)

    def hand_over(protocol: ServerProtocol, request: Request, response: Response) -> bool:
        return request.path == "/predict" and protocol.detach(channels.hand)

    server = await loop.create_server(lambda: ServerProtocol(router, router_conns, after=hand_over), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], channels, workers, router_conns, worker_conns


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_connection_moves_to_the_worker_and_back_without_losing_a_request(loop_kind: str) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="kiln-h-") as folder:
            server, port, channels, workers, router_conns, worker_conns = await _world(folder)
            client = Client(port)

            def call(method: str, path: str, body: bytes = b"") -> Any:
                return loop.run_in_executor(None, client.request, method, path, body)

            try:
                assert (await call("POST", "/predict", b"1"))["by"] == "router"  # first request: the router, then handed over
                assert (await call("POST", "/predict", b"2")) == {"by": "worker", "path": "/predict", "body": "2"}
                assert len(worker_conns) == 1 and channels.handed == 1
                # not the worker's business: the connection goes back with the request, which the router answers
                assert (await call("GET", "/metrics")) == {"by": "router", "path": "/metrics", "body": ""}
                assert not worker_conns
                assert (await call("POST", "/predict", b"3"))["by"] == "router"
                assert (await call("POST", "/predict", b"4"))["by"] == "worker"  # handed over again
                # two requests sent at once (pipelined) on the worker's connection: both answered, in order
                both = b"".join(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n%d" % i for i in (5, 6))
                await loop.run_in_executor(None, client.sock.sendall, both)
                answers = [await loop.run_in_executor(None, client.read) for _ in range(2)]
                assert [a["body"] for a in answers] == ["5", "6"] and {a["by"] for a in answers} == {"worker"}
                # recall: every connection comes back, and the router answers from then on
                channels.recall()
                await asyncio.wait_for(channels.recalled.wait(), 10)
                assert not worker_conns
                assert (await call("POST", "/predict", b"7"))["by"] == "router"
                assert (await call("GET", "/livez"))["by"] == "router"
            finally:
                client.close()
                server.close()
                channels.close()
                workers.close()

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(asyncio.wait_for(go(), timeout=30))
    else:
        asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_a_busy_connection_is_given_back_once_its_request_is_answered() -> None:
    """A recall while the worker is still answering: the answer is written first, then the connection moves."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix="kiln-h-") as folder:
            server, port, channels, workers, _, worker_conns = await _world(folder)
            gate = asyncio.Event()
            slow_handler_seen = asyncio.Event()
            client = Client(port)
            try:
                assert (await loop.run_in_executor(None, client.request, "POST", "/predict", b"1"))["by"] == "router"
                assert (await loop.run_in_executor(None, client.request, "POST", "/predict", b"2"))["by"] == "worker"
                (protocol,) = worker_conns

                async def slow(request: Request) -> Response:
                    slow_handler_seen.set()
                    await gate.wait()
                    return _answer("worker-slow", request)

                protocol.handler = slow
                pending = loop.run_in_executor(None, client.request, "POST", "/predict", b"3")
                await asyncio.wait_for(slow_handler_seen.wait(), 10)
                channels.recall()
                await asyncio.sleep(0.1)
                assert not channels.recalled.is_set() and protocol.transport is not None  # still answering: kept
                gate.set()
                assert (await pending)["by"] == "worker-slow"
                await asyncio.wait_for(channels.recalled.wait(), 10)
                assert (await loop.run_in_executor(None, client.request, "POST", "/predict", b"4"))["by"] == "router"
            finally:
                client.close()
                server.close()
                channels.close()
                workers.close()

    asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_handoff_folders_of_gone_backends_are_swept_and_live_or_young_ones_kept(tmp_path):
    """``start_backend`` sweeps the ``kiln-h-*`` folders stopped backends left behind: only old folders whose every
    ``<pid>.sock`` names a dead process go; a live worker's, a young one and one holding other files stay."""
    import subprocess
    import sys

    from resources.serving import sweep_handoff_dirs

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(done.stdout)
    old = time.time() - 3600

    def folder(name: str, files: list[str], mtime: float | None = old) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file in files:
            (path / file).touch()
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    gone = folder("kiln-h-gone", [f"{dead_pid}.sock"])
    empty = folder("kiln-h-empty", [])
    live = folder("kiln-h-live", [f"{dead_pid}.sock", f"{os.getpid()}.sock"])
    young = folder("kiln-h-young", [f"{dead_pid}.sock"], mtime=None)
    other = folder("kiln-h-other", [f"{dead_pid}.sock", "notes.txt"])
    unrelated = folder("elsewhere", [f"{dead_pid}.sock"])

    removed = sweep_handoff_dirs(str(tmp_path))

    assert sorted(removed) == sorted([str(gone), str(empty)])
    assert not gone.exists() and not empty.exists()
    assert live.exists() and young.exists() and other.exists() and unrelated.exists()


def test_stopping_a_backend_removes_its_handoff_folder_and_nothing_else(tmp_path):
    from resources.serving import remove_handoff_dir, stop_backend

    ours = tmp_path / "kiln-h-abc"
    ours.mkdir()
    (ours / "123.sock").touch()
    foreign = tmp_path / "somewhere"
    foreign.mkdir()
    stop_backend({"pid": None, "handoff_dir": str(ours)})
    remove_handoff_dir(str(foreign))
    stop_backend(None)
    stop_backend({"pid": None})  # a backend recorded before handoff folders existed
    assert not ours.exists() and foreign.exists()
