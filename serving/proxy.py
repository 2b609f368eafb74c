"""The router's HTTP/1.1 plumbing: a lean server protocol for the public port and keep-alive upstream pools.

The router forwards every request to a `bentoml serve` backend, so its own cost is added to every answer. Profiled,
uvicorn's ASGI layers plus an aiohttp client round trip cost about as much CPU per request as the backend spends
scoring; here one ``asyncio.Protocol`` per connection parses with httptools (the parser uvicorn uses), hands a
complete :class:`Request` to the router's handler and writes its :class:`Response` in one write, and upstream
requests reuse pooled keep-alive connections with the same parser. HTTP/1.1 keep-alive, pipelined requests (answered
in order), ``Expect: 100-continue``, chunked request bodies and ``Connection: close`` are handled; anything else is
the backend's business.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools

from serving.handoff import MAX_PREFIX_BYTES

MAX_BODY_BYTES = 64 * 1024 * 1024  # the backend refuses above 32 MiB with a 413 naming the limit; this only guards memory
IDLE_TIMEOUT_S = 30.0
UPSTREAM_TIMEOUT_S = 60.0
MAX_IDLE_UPSTREAM = 256
HOP_HEADERS = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive", b"expect",
                         b"upgrade", b"proxy-connection", b"te", b"trailer"})
JSON_HEADERS = [(b"content-type", b"application/json")]
_STATUS_LINES: dict[int, bytes] = {}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: bytes
    headers: dict[bytes, bytes]  # lower-case names; a repeated header keeps its last value
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    client: str


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


Handler = Callable[[Request], Awaitable[Response]]


class GiveBack(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a handler that does not answer this request itself: the connection goes back to its previous owner
    with the request unanswered (``ServerProtocol(give_back=...)``; :mod:`serving.handoff`)."""


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line


def error(status: int, message: str) -> Response:
    import json

    return Response(status, JSON_HEADERS, json.dumps({"error": message}).encode())


def request_bytes(request: Request) -> bytes:
    """A parsed request written back as HTTP/1.1 (what a given-back connection's new owner parses first)."""
    target = request.path.encode("latin-1") + (b"?" + request.query if request.query else b"")
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("latin-1"), target)]
    parts.extend(b"%s: %s\r\n" % kv for kv in request.raw_headers if kv[0] not in HOP_HEADERS or kv[0] in (b"host", b"connection"))
    parts.append(b"content-length: %d\r\n\r\n" % len(request.body))
    parts.append(request.body)
    return b"".join(parts)


def socket_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The descriptor behind an asyncio/uvloop transport (None once it is closing)."""
    if transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


class ServerProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer them in order through ``handler``."""

    def __init__(self, handler: Handler, connections: set[ServerProtocol], prefix: bytes = b"",
                 after: Callable[[ServerProtocol, Request, Response], bool] | None = None,
                 give_back: Callable[[int, bytes], bool] | None = None) -> None:
        """``prefix``: bytes to parse before the socket's own (a request handed over with its connection). ``after``:
        called once a request is answered and the connection idle; True when it took the connection away (see
        :meth:`detach`). ``give_back``: how to return the connection when the handler raises :class:`GiveBack`."""
        self.handler = handler
        self.connections = connections
        self.prefix = prefix
        self.after = after
        self.give_back = give_back
        self.giving_back: Callable[[int, bytes], bool] | None = None  # set by release(): give back once idle
        self._partial = False  # a request is being received (its head or body is not complete yet)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = ""
        self.pending: deque[tuple[Request, bool]] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.last_active = time.monotonic()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._refused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        self.connections.add(self)
        if self.prefix:
            prefix, self.prefix = self.prefix, b""
            self.data_received(prefix)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(error(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            if not self._refused:
                self._fail(error(400, f"malformed HTTP request: {exc}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", [], [], 0
        self._partial = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name == b"content-length" and value.strip().isdigit() and int(value) > MAX_BODY_BYTES:
                self._fail(error(413, f"body: more than {MAX_BODY_BYTES} bytes"))
                return
            if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            self._fail(error(413, f"body: more than {MAX_BODY_BYTES} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._partial = False
        if self._refused:
            return
        url = httptools.parse_url(self._url)
        request = Request(
            method=self.parser.get_method().decode("latin-1"), path=(url.path or b"/").decode("latin-1"), query=url.query or b"",
            headers=dict(self._headers), raw_headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body), client=self.client,
        )
        self.pending.append((request, self.parser.should_keep_alive()))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._answer())

    # answering
    async def _answer(self) -> None:
        while self.pending:
            request, keep_alive = self.pending.popleft()
            try:
                response = await self.handler(request)
            except GiveBack:
                if self._give_back_with(request):
                    return
                response = error(503, "this request cannot be served on this connection right now; send it again")
            except Exception as exc:  # noqa: BLE001 - a router bug must not take the connection down silently
                response = error(502, f"router error: {type(exc).__name__}: {exc}")
            if self.transport is None:
                return
            if request.method == "HEAD":  # the headers a GET would get, no body
                response = Response(response.status, [*response.headers, (b"content-length", b"%d" % len(response.body))], b"")
            self._write(response, keep_alive)
            self.last_active = time.monotonic()
            if not keep_alive:
                self.transport.close()
                return
            if not self.pending and not self._partial:
                if self.giving_back is not None and self._give_back_with(None):
                    return
                if self.after is not None and self.after(self, request, response):
                    return

    # handing the connection over ----------------------------------------------------------------------------------
    def idle(self) -> bool:
        """Between requests: nothing received and unanswered, nothing being answered, everything written."""
        return (self.transport is not None and not self.transport.is_closing() and not self.pending and not self._partial
                and not (self.worker and not self.worker.done()) and self.transport.get_write_buffer_size() == 0)

    def detach(self, send: Callable[[int], bool]) -> bool:
        """Hand the socket over between requests (the caller has dealt with any pending ones): ``send(fd)`` passes the
        descriptor on (True when it did); then this transport lets go of it without closing the connection (the
        receiver's copy keeps it open). False leaves the connection here."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._partial or transport.get_write_buffer_size():
            return False
        fd = socket_fd(transport)
        if fd is None:
            return False
        transport.pause_reading()
        if not send(fd):
            transport.resume_reading()
            return False
        self.connections.discard(self)
        self.transport = None
        transport.close()  # only this process's descriptor: no FIN while the new owner holds its copy
        return True

    def release(self, give_back: Callable[[int, bytes], bool]) -> None:
        """Give the connection back now if idle, else as soon as its request in progress is answered."""
        self.giving_back = give_back
        if self.idle():
            self._give_back_with(None)

    def _give_back_with(self, request: Request | None) -> bool:
        """Give the connection back with ``request`` (unanswered) and any pipelined ones as its prefix."""
        give_back = self.giving_back or self.give_back
        if give_back is None or self._partial:
            return False
        queued = ([request] if request is not None else []) + [r for r, _ in self.pending]
        prefix = b"".join(request_bytes(r) for r in queued)
        if len(prefix) > MAX_PREFIX_BYTES:
            return False
        if not self.detach(lambda fd: give_back(fd, prefix)):
            return False
        self.pending.clear()
        return True

    def _write(self, response: Response, keep_alive: bool) -> None:
        assert self.transport is not None
        parts = [status_line(response.status)]
        parts.extend(b"%s: %s\r\n" % kv for kv in response.headers)
        if not any(k == b"content-length" for k, _ in response.headers):
            parts.append(b"content-length: %d\r\n" % len(response.body))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(response.body)
        self.transport.write(b"".join(parts))

    def _fail(self, response: Response) -> None:
        """Answer a request that cannot be parsed or accepted, then close (the stream is out of step)."""
        self._refused = True
        if self.transport is not None and not self.transport.is_closing():
            self._write(response, keep_alive=False)
            self.transport.close()

    def idle_for(self, now: float) -> float:
        return 0.0 if self.pending or (self.worker and not self.worker.done()) else now - self.last_active


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.future: asyncio.Future[Response] | None = None
        self.keep_alive = True
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.keep_alive = False
        if self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionResetError(f"backend closed the connection: {exc or 'EOF'}"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.future is not None and not self.future.done():
                self.future.set_exception(ConnectionResetError(f"backend sent a malformed response: {exc}"))
            self.close()

    def on_message_begin(self) -> None:
        self._headers, self._body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        if self.future is not None and not self.future.done():
            self.future.set_result(Response(self.parser.get_status_code(), self._headers, body))

    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.future

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.keep_alive

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """A pool of keep-alive connections to one backend (``http://host:port``)."""

    def __init__(self, url: str) -> None:
        parsed = httptools.parse_url(url.encode())
        if parsed.host is None or parsed.port is None:
            raise ValueError(f"upstream URL {url!r}: expected http://host:port")
        self.url = url
        self.host = parsed.host.decode()
        self.port = int(parsed.port)
        self.host_header = f"{self.host}:{self.port}".encode()
        self.idle: list[UpstreamConnection] = []

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                      timeout: float = UPSTREAM_TIMEOUT_S) -> Response:
        """Send one request on a pooled (or new) connection; raises ConnectionError/TimeoutError when the backend is gone."""
        loop = asyncio.get_running_loop()
        conn = None
        while self.idle:
            candidate = self.idle.pop()
            if candidate.usable:
                conn = candidate
                break
        if conn is None:
            _, conn = await loop.create_connection(UpstreamConnection, self.host, self.port)
        # HEAD goes out as GET: the response parser cannot be told that a HEAD answer's content-length has no body.
        wire = b"GET" if method == "HEAD" else method.encode()
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n" % (wire, target, self.host_header, len(body))]
        parts.extend(b"%s: %s\r\n" % kv for kv in headers if kv[0] not in HOP_HEADERS)
        parts.append(b"\r\n")
        parts.append(body)
        future = conn.send(b"".join(parts))
        timer = loop.call_later(timeout, _expire, future)
        try:
            response = await future
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
        conn.future = None
        if conn.usable and len(self.idle) < MAX_IDLE_UPSTREAM:
            self.idle.append(conn)
        else:
            conn.close()
        return response

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"the backend did not answer within {UPSTREAM_TIMEOUT_S:.0f} s"))


async def close_idle(connections: set[ServerProtocol], stop: asyncio.Event) -> None:
    """Close client connections idle for longer than ``IDLE_TIMEOUT_S`` (keep-alive clients that went quiet)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=5.0)
        except TimeoutError:
            pass
        now = time.monotonic()
        for conn in list(connections):
            if conn.idle_for(now) > IDLE_TIMEOUT_S and conn.transport is not None:
                conn.transport.close()
