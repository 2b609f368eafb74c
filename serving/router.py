"""The local router: a thin aiohttp server that owns an endpoint's public port and forwards to `bentoml serve` backends.

Locally the public port belongs to this router for good, so a deploy can start a new backend, switch the router to
it and stop the old one without the public URL ever refusing a request (zero-downtime roll). It parses no HTTP itself:
aiohttp's server takes the client requests and an ``aiohttp.ClientSession`` (a pooled, keep-alive client) sends them
on. Where a request goes is the *route table* of :func:`kiln.release.route_table` (the same table the Kubernetes
HTTPRoute is rendered from), written into the router's config by ``ServingResource``:

- ``none``: the champion serves everything;
- ``canary``: a stable share of ``POST /predict`` requests (the challenger's weight of 100; the share of a request is
  a hash of its first row's key column, else of its body, :func:`share_of`) is served by the challenger;
- ``shadow``: every ``POST /predict`` is also sent to the challenger (the mirror); its answer is counted and logged,
  never served.

The router drops every ``X-Kiln-*`` header a client sends (internal headers are never a client's), passes the
client's ``X-Request-ID`` on (or makes one) and logs each 5xx with it, and adds ``X-Kiln-Arm`` to every answer. The
backends validate, authorize and count requests themselves (:mod:`serving.service`); per-version numbers for a release
decision come from their own ``/metrics`` (``ServingResource.judge_challenger``). The router also keeps live counts
per arm (requests, errors, latency, scores) for ``/_kiln/state`` and logs both arms' answers as JSON lines
(``arm_log``).

Configuration is a JSON file written by ``ServingResource``; ``POST /_kiln/reload`` (loopback only, ``X-Kiln-Admin``
token from that file) makes the router re-read it. Requests already sent to a backend finish there; ``/_kiln/state``
says how many are still in flight per backend URL, so ``ServingResource.drain`` stops an old backend only once none
is. On SIGTERM the router stops accepting, lets in-flight requests finish, and stops the backends it fronts.

Series at the router's ``/metrics`` (appended to the champion backend's own): ``kiln_router_requests_total``
``{arm, model_version, status}`` and ``kiln_router_request_duration_seconds{arm}`` (``/predict`` requests forwarded,
mirrored ones included as arm ``challenger``).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import time
import uuid
import zlib
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.process import stop_groups
from serving.collector import settle
from serving.requests import MAX_BODY_BYTES  # the backends' limit: a larger body gets 413 here, never reaches them

if TYPE_CHECKING:
    from kiln.release import RouteTable

log = logging.getLogger("kiln.router")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
FLUSH_EVERY_S = 1.0
FLUSH_ROWS = 200
WARMUP_REQUESTS = 10
UPSTREAM_TIMEOUT_S = 60.0
BODY_TIMEOUT_S = 20.0  # the longest wait for the rest of a request's announced body
RETRIES = 3  # a connection refused or reset before any answer is retried on the (possibly new) upstream
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp sets itself: never forwarded in either direction.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"})


def share_of(key: str) -> float:
    """A stable number in [0, 1) for a request key: the same key always lands in the same arm."""
    return zlib.crc32(key.encode("utf-8", "replace")) / 2**32


def request_key(body: bytes, key_column: str | None) -> str:
    """The request's routing key: the first row's key column, else the body itself (its first 4 KB)."""
    if key_column:
        try:
            import orjson

            rows = orjson.loads(body)["rows"]
            return str(rows[0][key_column])
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    return body[:4096].decode("latin-1")


def forwarded_headers(headers: Any) -> list[tuple[str, str]]:
    """A client's request headers as sent to a backend: no hop-by-hop header and no ``X-Kiln-*`` header."""
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_HEADERS and not k.lower().startswith("x-kiln-")]


class ArmStats:
    """Live counts of one arm: requests, server errors, latencies (recent window) and prediction scores."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.rows = 0
        self.score_sum = 0.0
        self.latencies: deque[float] = deque(maxlen=10_000)

    def add(self, status: int, seconds: float, predictions: list[float] | None) -> None:
        self.requests += 1
        self.errors += status >= 500
        self.client_errors += 400 <= status < 500
        if self.requests > WARMUP_REQUESTS:  # a fresh backend's first answers (lazy imports, caches) are not its latency
            self.latencies.append(seconds)
        if predictions:
            self.rows += len(predictions)
            self.score_sum += float(sum(predictions))

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def p(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None

        return {
            "requests": self.requests, "server_errors": self.errors, "client_errors": self.client_errors, "rows": self.rows,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "mean_score": self.score_sum / self.rows if self.rows else None, "p50_ms": p(0.5), "p99_ms": p(0.99),
        }


def routes_config(table: RouteTable) -> dict[str, Any]:
    """A route table (:func:`kiln.release.route_table`) as the router's config holds it (JSON): served backends by role
    with their weights of 100, and the mirror (shadow) target."""
    return {
        "mode": table.mode,
        "backends": [{"role": b.role, "version": b.version, "name": b.name, "weight": b.weight} for b in table.backends],
        "mirror": {"role": table.mirror.role, "version": table.mirror.version, "name": table.mirror.name} if table.mirror else None,
    }


class Upstream:
    """Where one routed request goes: the arm and the backend record (``url``, ``version``, ...) of the config."""

    def __init__(self, arm: str, record: dict[str, Any]) -> None:
        self.arm = arm
        self.record = record

    @property
    def url(self) -> str:
        return str(self.record["url"])

    @property
    def version(self) -> str:
        return str(self.record.get("version", ""))


class Routes:
    """The route table of the router's config: served arms with weights of 100 and the mirror (shadow) target."""

    def __init__(self, config: dict[str, Any]) -> None:
        table = config.get("routes") or {}
        self.mode = str(table.get("mode") or config.get("mode") or "none")
        by_role = {"champion": config.get("champion"), "challenger": config.get("challenger")}
        self.backends: list[tuple[Upstream, int]] = []
        for backend in table.get("backends") or ([{"role": "champion", "weight": 100}] if by_role["champion"] else []):
            record = by_role.get(backend["role"])
            if record:
                self.backends.append((Upstream(backend["role"], record), int(backend["weight"])))
        mirror = table.get("mirror")
        record = by_role.get(mirror["role"]) if mirror else None
        self.mirror = Upstream(mirror["role"], record) if mirror and record else None
        self.key_column = config.get("key_column")

    def pick(self, request_path: str, method: str, body: bytes) -> Upstream | None:
        """The upstream that serves a request: by weight for ``POST /predict`` (a stable key share), else the champion."""
        if not self.backends:
            return None
        if len(self.backends) == 1 or request_path != "/predict" or method != "POST":
            return next((u for u, _ in self.backends if u.arm == "champion"), self.backends[0][0])
        point = share_of(request_key(body, self.key_column)) * 100
        edge = 0.0
        for upstream, weight in sorted(self.backends, key=lambda b: b[0].arm != "challenger"):  # challenger first
            edge += weight
            if point < edge:
                return upstream
        return self.backends[-1][0]


class RouterMetrics:
    """The router's own Prometheus series (one process, its own registry)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("kiln_router_requests", "Requests forwarded to /predict by arm", ["arm", "model_version", "status"],
                                     registry=self.registry)
        self.latency = prom.Histogram("kiln_router_request_duration_seconds", "Upstream /predict time by arm", ["arm"],
                                      registry=self.registry,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))

    def observe(self, arm: str, version: str, status: int, seconds: float) -> None:
        self.requests.labels(arm, version, str(status)).inc()
        self.latency.labels(arm).observe(seconds)

    def render(self) -> bytes:
        import prometheus_client as prom

        return bytes(prom.generate_latest(self.registry))


class Router:
    """Routes requests to the arms' backends. ``config_path`` holds the upstreams and route table (see ``ServingResource``)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: dict[str, Any] = {}
        self.routes = Routes({})
        self.generation = 0
        self.in_flight: dict[str, int] = {}
        self.arms: dict[str, ArmStats] = {}
        self.buffer: list[str] = []
        self.last_flush = time.monotonic()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.metrics = RouterMetrics()
        self.session: Any = None  # aiohttp.ClientSession, opened in serve()
        self.max_body = MAX_BODY_BYTES
        self.stopping: asyncio.Event | None = None  # set by SIGTERM/SIGINT (or stop()): serve() winds down
        self.load()

    # configuration -------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Re-read the config file; later requests follow the new route table, requests in flight finish where they are."""
        self.flush()
        before = self._arm_upstreams()
        config = json.loads(self.config_path.read_text())
        routes = Routes(config)
        self.config, self.routes = config, routes
        self.generation += 1
        after = self._arm_upstreams()
        # An arm's live numbers belong to one backend: a new backend (even of the same version) starts from zero.
        self.arms = {k: v for k, v in self.arms.items() if k in after and before.get(k) == after[k]}

    def _arm_upstreams(self) -> dict[str, str]:
        return {f"{arm}:{u['version']}": u["url"] for arm in ("champion", "challenger") if (u := self.config.get(arm))}

    # requests ------------------------------------------------------------------------------------------------
    async def handle(self, request: Any) -> Any:
        """Answer one request: health, admin and metrics here, everything else from an arm's backend."""
        from aiohttp import web

        path = request.path
        if path == "/livez":
            return web.json_response({"status": "ok", "router": True})
        if path.startswith("/_kiln/"):
            return await self._admin(request)
        if path == "/metrics":
            return await self._metrics()
        refused = self._refuse_before_reading(request)
        if refused is not None:
            return refused
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except TimeoutError:  # a client that announced more than it sends: answer and close, never hold the connection
            response = web.json_response({"error": f"body: not received within {BODY_TIMEOUT_S:.0f}s "
                                                   f"(Content-Length {request.content_length})"}, status=408)
            response.force_close()
            return response
        rid = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        headers = [*((k, v) for k, v in forwarded_headers(request.headers) if k.lower() != "x-request-id"), ("X-Request-ID", rid)]
        upstream = self.routes.pick(path, request.method, body)
        if path == "/predict" and request.method == "POST" and self.routes.mirror is not None:
            task = asyncio.get_running_loop().create_task(self._mirror(self.routes.mirror, request.path_qs, headers, body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        response = await self._forward(upstream, request.method, request.path_qs, headers, body, served=True)
        if response.status >= 500:
            log.error("%s %s answered %d (request id %s)", request.method, path, response.status, rid)
        return response

    def _refuse_before_reading(self, request: Any) -> Any:
        """413 for a declared body over the limit and 415 for an encoded body, answered before any of it is read (aiohttp
        would otherwise decompress it, or read up to the limit first); None when the request may go on."""
        from aiohttp import web

        if request.content_length is not None and request.content_length > self.max_body:
            response = web.json_response({"error": f"body: Content-Length {request.content_length} exceeds the limit of "
                                                   f"{self.max_body} bytes; send fewer rows per request"}, status=413)
            response.force_close()  # the unread body would otherwise be taken for the next request
            return response
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            response = web.json_response({"error": f"Content-Encoding: {encoding[:40]!r} is not accepted; send plain JSON"},
                                         status=415)
            response.force_close()
            return response
        return None

    async def _send(self, upstream: Upstream, method: str, target: str, headers: list[tuple[str, str]],
                    body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request to a backend: its status, headers (no hop-by-hop) and body; counted in flight for the drain."""
        url = upstream.url
        self.in_flight[url] = self.in_flight.get(url, 0) + 1
        try:
            async with self.session.request(method, url + target, headers=headers, data=body if body else None,
                                            skip_auto_headers=("Content-Type",), allow_redirects=False) as answer:
                content = await answer.read()
                kept = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS]
                return answer.status, kept, content
        finally:
            self.in_flight[url] -= 1
            if not self.in_flight[url]:
                del self.in_flight[url]

    async def _forward(self, upstream: Upstream | None, method: str, target: str, headers: list[tuple[str, str]],
                       body: bytes, served: bool) -> Any:
        """Send a request to its upstream; a refused or reset connection is retried on the route table's current one."""
        import aiohttp
        from aiohttp import web

        path = target.split("?", 1)[0]
        for attempt in range(RETRIES):
            if upstream is None:
                return web.json_response({"error": "no backend is serving yet"}, status=503)
            started = time.perf_counter()
            try:
                status, kept, content = await self._send(upstream, method, target, headers, body)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:  # refused, reset, or no answer in time
                if attempt < RETRIES - 1 and not isinstance(exc, TimeoutError):
                    await asyncio.sleep(0.05)
                    upstream = self.routes.pick(path, method, body) if served else self.routes.mirror  # after a reload
                    continue
                return web.json_response({"error": f"backend unavailable: {type(exc).__name__}: {str(exc)[:200]}"}, status=503)
            if path == "/predict":
                self._record(upstream, status, time.perf_counter() - started, content, served)
            response = web.Response(status=status, body=content, headers=kept)
            response.headers["X-Kiln-Arm"] = upstream.arm
            return response
        raise AssertionError("unreachable")

    async def _mirror(self, upstream: Upstream, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Shadow: the challenger scores the same request; its answer is counted and logged, never served."""
        try:
            await self._forward(upstream, "POST", target, headers, body, served=False)
        except Exception:  # noqa: BLE001 - a failing shadow must never affect the served answer
            self.arms.setdefault(f"challenger:{upstream.version}", ArmStats()).add(599, 0.0, None)

    def _record(self, upstream: Upstream, status: int, seconds: float, content: bytes, served: bool) -> None:
        self.metrics.observe(upstream.arm, upstream.version, status, seconds)
        if self.routes.mode == "none" or not self.config.get("challenger"):
            return
        predictions = None
        if status == 200:
            try:
                predictions = json.loads(content)["predictions"]
            except (ValueError, KeyError, TypeError):
                predictions = None
        self.arms.setdefault(f"{upstream.arm}:{upstream.version}", ArmStats()).add(status, seconds, predictions)
        self.buffer.append(json.dumps({"ts": time.time(), "arm": upstream.arm, "model_version": upstream.version, "status": status,
                                       "latency_ms": round(seconds * 1000, 3), "served": served, "predictions": predictions}))
        if len(self.buffer) >= FLUSH_ROWS or time.monotonic() - self.last_flush > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer or not self.config.get("arm_log"):
            self.buffer.clear()
            return
        path = Path(self.config["arm_log"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write("\n".join(self.buffer) + "\n")
        self.buffer.clear()

    async def _metrics(self) -> Any:
        """The champion backend's ``/metrics`` with the router's own series appended."""
        from aiohttp import web

        champion = self.routes.pick("/metrics", "GET", b"")
        response = await self._forward(champion, "GET", "/metrics", [], b"", served=True)
        if response.status != 200:
            return response
        content = bytes(response.body).rstrip(b"\n") + b"\n" + self.metrics.render()
        return web.Response(status=200, body=content, content_type="text/plain", charset="utf-8")

    # admin ---------------------------------------------------------------------------------------------------
    async def _admin(self, request: Any) -> Any:
        from aiohttp import web

        token = str(self.config.get("admin_token", ""))
        given = request.headers.get("X-Kiln-Admin", "")
        if request.remote not in LOOPBACK or not token or not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response({"error": "admin endpoints are for the local ServingResource only"}, status=403)
        path = request.path
        if path == "/_kiln/reload" and request.method == "POST":
            try:
                self.load()
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return web.json_response({"error": f"config: {exc}"}, status=400)
        elif path == "/_kiln/flush":
            self.flush()
        elif path != "/_kiln/state":
            return web.json_response({"error": "unknown admin path"}, status=404)
        return web.json_response({
            "generation": self.generation,
            "champion": self.config.get("champion"),
            "challenger": self.config.get("challenger"),
            "mode": self.routes.mode,
            "share": self.config.get("share", 0),
            "weights": {u.arm: w for u, w in self.routes.backends},
            "mirror": self.routes.mirror.arm if self.routes.mirror else None,
            "in_flight": dict(self.in_flight),
            "arms": {k: v.summary() for k, v in self.arms.items()},
        })

    # lifetime ------------------------------------------------------------------------------------------------
    def app(self) -> Any:
        """The aiohttp application: every path to :meth:`handle`; aiohttp's own errors (413, bad requests) as JSON."""
        from aiohttp import web

        @web.middleware
        async def json_errors(request: Any, handler: Any) -> Any:
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return web.json_response({"error": f"{request.path}: {exc.reason}"}, status=exc.status)

        app = web.Application(client_max_size=self.max_body, middlewares=[json_errors])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT; then stop accepting, let in-flight requests finish, and stop the backends."""
        import aiohttp
        from aiohttp import web

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S), cookie_jar=aiohttp.DummyCookieJar())
        # auto_decompress=False: an encoded request body reaches `handle` as sent and gets its 415 there (aiohttp would
        # otherwise decode gzip itself and refuse an encoding it has no decoder for with a bare 400)
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=10.0,
                               auto_decompress=False)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=2048, reuse_address=True).start()
        settle()  # what is loaded lives as long as the router: frozen; full collections rare (serving.collector)
        loop = asyncio.get_running_loop()
        stop = self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await runner.cleanup()  # stops accepting, waits (bounded) for the requests being answered
            for task in list(self.tasks):
                task.cancel()
            await self.session.close()
            self.flush()
            stop_backends(self.config)


def stop_backends(config: dict[str, Any]) -> None:
    """Stop the backends the router fronts (each `bentoml serve` is its own process group), within 20 s together."""
    stop_groups([u.get("pid") for arm in ("champion", "challenger") if (u := config.get(arm))], timeout_s=20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Kiln endpoint router (roll, canary, shadow)")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router = Router(args.config)
    try:
        import uvloop  # libuv: faster per request than asyncio's default loop
    except ImportError:
        asyncio.run(router.serve(args.host, args.port))
    else:
        uvloop.run(router.serve(args.host, args.port))


if __name__ == "__main__":
    main()
