"""The router: a small HTTP process (:mod:`serving.proxy` on uvloop) that owns an endpoint's public port.

It proxies every request to the pipeline's current backend (a `bentoml serve` process on an internal
port), so a deploy can start a new backend, switch the router to it and stop the old one without the
public URL ever refusing a request (zero-downtime roll). With a challenger it runs a release:

- ``canary``: a stable, hash-based share of requests (hash of ``X-Kiln-Request-Key`` or of the first
  row's key column) is served by the challenger;
- ``shadow``: every ``/predict`` is mirrored to the challenger and its answer is logged, never served.

Concurrent ``POST /predict`` requests to the same arm are *coalesced* (:class:`Coalescer`): while the backend is
busy with one combined request, arrivals queue, and the next upstream request carries all their rows (up to the
spec's ``serving.max_batch_rows``); each client gets its own slice of the predictions, answered exactly as the
backend would answer it alone. The backend then parses, validates and scores one request per batch instead of one
per client request, and the router makes one upstream round trip for many. If a combined request is refused (one
client's rows are invalid) or fails, each of its requests is sent again on its own, so every client gets its own
answer: a 4xx naming its own field, never a neighbour's.

With one champion and no release running, a client's keep-alive connection is *handed over* to a champion worker once
the router has answered its first ``POST /predict`` (:mod:`serving.handoff`): the worker answers the connection's
later requests itself (a third less CPU per request than proxying them), and gives the connection back for anything
that is the router's business. Every reload of the configuration first calls the handed connections back, and
``/_kiln/reload`` answers once they are back, so a roll, canary, shadow or promotion routes every later request.

Both arms are logged (arm, model version, status, latency, predictions) as JSON lines for the gate, and
counted in memory for ``/_kiln/arms``. Configuration is a JSON file written by ``ServingResource``;
``POST /_kiln/reload`` (loopback only, ``X-Kiln-Admin`` token from that file) makes the router re-read it.
On SIGTERM the router stops the backends it fronts.

Series at the router's ``/metrics`` (appended to the champion backend's own): ``kiln_router_requests_total``
``{arm, model_version, status}`` (the requests the router answered itself, not those on handed-over
connections), ``kiln_router_request_duration_seconds{arm}``, and the coalescing counts
``kiln_router_combined_requests_total{arm}`` (upstream requests that carried several client requests) and
``kiln_router_coalesced_requests_total{arm}`` (client requests answered from them).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.process import pid_alive
from serving.handoff import BackendChannels
from serving.proxy import HOP_HEADERS, JSON_HEADERS, Request, Response, ServerProtocol, Upstream, close_idle

PROTECTED = ("/predict", "/metadata")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
FLUSH_EVERY_S = 1.0
FLUSH_ROWS = 200
WARMUP_REQUESTS = 10
RESCAN_S = 5.0  # how often to look for a champion's worker channels while it has none
DEFAULT_BATCH_ROWS = 1000  # an upstream record without the spec's serving.max_batch_rows (written by an older Kiln)


def share_of(key: str) -> float:
    """A stable number in [0, 1) for a request key: the same key always lands in the same arm."""
    return zlib.crc32(key.encode("utf-8", "replace")) / 2**32


def request_key(headers: dict[bytes, bytes], body: bytes, key_column: str | None) -> str:
    """The request's routing key: ``X-Kiln-Request-Key``, else the first row's key column, else the body itself."""
    given = headers.get(b"x-kiln-request-key")
    if given:
        return given.decode("latin-1")
    if key_column:
        try:
            rows = json.loads(body)["rows"]
            return str(rows[0][key_column])
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    return body.decode("latin-1")


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


INTERNAL_HEADERS = frozenset({b"x-kiln-requests"})  # headers only the router sets towards its backends


class Router:
    """Routes requests to the arms' backends. ``config_path`` holds the upstreams and release settings (see ``ServingResource``)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: dict[str, Any] = {}
        self.generation = 0
        self.upstreams: dict[str, Upstream] = {}
        self.in_flight: dict[str, int] = {}
        self.arms: dict[str, ArmStats] = {}
        self.buffer: list[str] = []
        self.last_flush = time.monotonic()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.metrics: RouterMetrics | None = None
        self.coalescers: dict[str, Coalescer] = {}
        self.connections: set[ServerProtocol] = set()
        self.handoff: BackendChannels | None = None  # the champion's workers, while connections are handed to them
        self.recalling: dict[str, BackendChannels] = {}  # backends giving their connections back (by url)
        self._rescan_at = 0.0
        self.load()

    # configuration -------------------------------------------------------------------------------------------
    def load(self) -> None:
        self.flush()
        self.recall()
        before = self._arm_upstreams()
        self.config = json.loads(self.config_path.read_text())
        self.generation += 1
        after = self._arm_upstreams()
        # An arm's live numbers belong to one backend: a new backend (even of the same version) starts from zero.
        self.arms = {k: v for k, v in self.arms.items() if k in after and before.get(k) == after[k]}
        live = {u.get(k) for arm in ("champion", "challenger") if (u := self.config.get(arm)) for k in ("url", "lane_url")}
        for url in [u for u in self.upstreams if u not in live]:  # in-flight requests keep their connection; idle ones go
            self.upstreams.pop(url).close()

    # connection handoff (serving.handoff) -------------------------------------------------------------------------
    def recall(self) -> None:
        """Ask the champion's workers for the connections handed to them (before the routing changes)."""
        if self.handoff is not None:
            url = str((self.config.get("champion") or {}).get("url", ""))
            self.handoff.recall()
            if not self.handoff.recalled.is_set():
                self.recalling[url] = self.handoff
            self.handoff = None

    async def recalled(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until every recalled connection is back with the router."""
        deadline = time.monotonic() + timeout
        for url, channels in list(self.recalling.items()):
            try:
                await asyncio.wait_for(channels.recalled.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
            channels.close()
            self.recalling.pop(url, None)

    def hand_over(self, protocol: ServerProtocol, request: Request, response: Response) -> bool:
        """After a connection's ``POST /predict`` is answered: with one champion and nothing else to route (no canary, no
        shadow), hand the client's connection to a champion worker, which answers its next requests itself."""
        if request.path != "/predict" or response.status != 200 or self.config.get("challenger"):
            return False
        champion = self.config.get("champion") or {}
        folder = champion.get("handoff_dir")
        if not folder:
            return False
        now = time.monotonic()
        if self.handoff is None or self.handoff.folder != folder or (not self.handoff.channels and now > self._rescan_at):
            if self.handoff is not None:
                self.handoff.close()
            self.handoff = BackendChannels(folder, asyncio.get_running_loop(), self.adopt)
            self._rescan_at = now + RESCAN_S  # workers without channels (yet): look again later, not per request
        return bool(self.handoff.channels) and protocol.detach(self.handoff.hand)

    def adopt(self, sock: Any, prefix: bytes) -> None:
        """A connection given back by a worker: served here from now on, starting with the request it carried back."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(
            lambda: ServerProtocol(self.handle, self.connections, prefix=prefix, after=self.hand_over), sock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _arm_upstreams(self) -> dict[str, str]:
        return {f"{arm}:{u['version']}": u["url"] for arm in ("champion", "challenger") if (u := self.config.get(arm))}

    def api_key(self) -> str | None:
        return settings.api_key()

    def upstream(self, url: str) -> Upstream:
        pool = self.upstreams.get(url)
        if pool is None:
            pool = self.upstreams[url] = Upstream(url)
        return pool

    # requests ------------------------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """Answer one request: health, admin and metrics here, everything else from an arm's backend."""
        if any(name in INTERNAL_HEADERS for name, _ in request.raw_headers):
            # set only by the router itself (the coalescer's request count): a client's copy is dropped, never trusted
            kept = [(name, value) for name, value in request.raw_headers if name not in INTERNAL_HEADERS]
            request = Request(request.method, request.path, request.query, dict(kept), kept, request.body, request.client)
        path = request.path
        if path == "/livez":
            return Response(200, JSON_HEADERS, b'{"status":"ok","router":true}')
        if path.startswith("/_kiln/"):
            response = self._admin(request)
            if path == "/_kiln/reload" and response.status == 200:
                await self.recalled()  # answered once no client connection is left with a backend routed away from
            return response
        if path in PROTECTED and not self._authorized(request.headers):
            return Response(401, JSON_HEADERS, b'{"error":"unauthorized: send the API key as \'Authorization: Bearer <key>\'"}')
        if path == "/metrics":
            return await self._metrics(request)
        arm = "champion"
        challenger = self.config.get("challenger")
        if challenger and path == "/predict" and request.method == "POST":
            mode = self.config.get("mode", "none")
            if mode == "canary":
                if share_of(request_key(request.headers, request.body, self.config.get("key_column"))) < self.config.get("share", 0):
                    arm = "challenger"
            elif mode == "shadow":
                task = asyncio.get_running_loop().create_task(self._mirror(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        if path == "/predict" and request.method == "POST":
            response = await self._predict(arm, request)
        else:
            response = await self._forward(arm, request)
        response.headers.append((b"x-kiln-arm", arm.encode()))
        return response

    async def _predict(self, arm: str, request: Request) -> Response:
        """``POST /predict`` through the arm's coalescer when the body is a plain ``{"rows": [...]}``, else on its own."""
        upstream = self.config.get(arm) or self.config.get("champion") or {}
        rows = combinable_rows(request.body) if upstream.get("lane_url") else None  # only the lane counts combined requests
        if rows is None:
            return await self._forward(arm, request)
        coalescer = self.coalescers.get(arm)
        if coalescer is None:
            coalescer = self.coalescers[arm] = Coalescer(self, arm)
        return await coalescer.submit(request, rows)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        key = self.api_key()
        if not key:
            return True
        given = headers.get(b"x-api-key", b"").decode("latin-1")
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), key.encode())

    # proxying ------------------------------------------------------------------------------------------------
    async def _forward(self, arm: str, request: Request, body: bytes | None = None, record: bool = True) -> Response:
        """Send the request to an arm's upstream; on a refused or reset connection retry on the (possibly new) upstream.

        ``record=False``: a combined request, whose client requests the :class:`Coalescer` records one by one."""
        target = request.path.encode("latin-1") + (b"?" + request.query if request.query else b"")
        content = request.body if body is None else body
        for attempt in range(3):
            upstream = self.config.get(arm) or self.config.get("champion")
            if not upstream:
                return Response(503, JSON_HEADERS, b'{"error":"no backend is serving yet"}')
            url = upstream["url"]
            # /predict takes the backend's lane (same answer, no BentoML middleware); everything else its HTTP route.
            via = (upstream.get("lane_url") or url) if request.path == "/predict" else url
            self.in_flight[url] = self.in_flight.get(url, 0) + 1
            started = time.perf_counter()
            try:
                answer = await self.upstream(via).request(request.method, target, request.raw_headers, content)
            except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
                if attempt < 2:
                    await asyncio.sleep(0.05)
                    continue
                return Response(503, JSON_HEADERS, json.dumps({"error": f"backend unavailable: {exc}"}).encode())
            finally:
                self.in_flight[url] -= 1
            if request.path == "/predict" and record:
                self._record(arm if self.config.get(arm) else "champion", upstream["version"], answer.status,
                             time.perf_counter() - started, answer.body, served=True)
            answer.headers = [kv for kv in answer.headers if kv[0] not in HOP_HEADERS]
            return answer
        raise AssertionError("unreachable")

    async def _mirror(self, request: Request) -> None:
        """Shadow: the challenger scores the same request; its answer is logged and dropped."""
        challenger = self.config.get("challenger")
        if not challenger:
            return
        try:
            await self._predict("challenger", request)
        except Exception:  # noqa: BLE001 - a failing shadow must never affect the served answer
            self.arms.setdefault(f"challenger:{challenger['version']}", ArmStats()).add(599, 0.0, None)

    def _record(self, arm: str, version: str, status: int, seconds: float, content: bytes, served: bool) -> None:
        if self.metrics is None:
            self.metrics = RouterMetrics()
        self.metrics.observe(arm, version, status, seconds)
        if self.config.get("mode", "none") == "none" or not self.config.get("challenger"):
            return
        predictions = None
        if status == 200:
            try:
                predictions = json.loads(content)["predictions"]
            except (ValueError, KeyError, TypeError):
                predictions = None
        served = served and not (arm == "challenger" and self.config.get("mode") == "shadow")
        self.arms.setdefault(f"{arm}:{version}", ArmStats()).add(status, seconds, predictions)
        self.buffer.append(json.dumps({"ts": time.time(), "arm": arm, "model_version": version, "status": status,
                                       "latency_ms": round(seconds * 1000, 3), "served": served, "predictions": predictions}))
        if len(self.buffer) >= FLUSH_ROWS or time.monotonic() - self.last_flush > FLUSH_EVERY_S:
            self.flush()

    def observe_combined(self, arm: str, requests: int) -> None:
        if self.metrics is None:
            self.metrics = RouterMetrics()
        self.metrics.combined.labels(arm).inc()
        self.metrics.coalesced.labels(arm).inc(requests)

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

    async def _metrics(self, request: Request) -> Response:
        answer = await self._forward("champion", request, body=b"")
        content = answer.body
        if self.metrics is not None:
            content = content.rstrip(b"\n") + b"\n" + self.metrics.render()
        return Response(answer.status, [kv for kv in answer.headers if kv[0] == b"content-type"], content)

    # admin ---------------------------------------------------------------------------------------------------
    def _admin(self, request: Request) -> Response:
        token = str(self.config.get("admin_token", ""))
        given = request.headers.get(b"x-kiln-admin", b"").decode("latin-1")
        if request.client not in LOOPBACK or not token or not hmac.compare_digest(given.encode(), token.encode()):
            return Response(403, JSON_HEADERS, b'{"error":"admin endpoints are for the local ServingResource only"}')
        path = request.path
        if path == "/_kiln/reload" and request.method == "POST":
            try:
                self.load()
            except (OSError, ValueError) as exc:
                return Response(400, JSON_HEADERS, json.dumps({"error": f"config: {exc}"}).encode())
        elif path == "/_kiln/flush":
            self.flush()
        elif path != "/_kiln/state":
            return Response(404, JSON_HEADERS, b'{"error":"unknown admin path"}')
        state = {
            "generation": self.generation,
            "champion": self.config.get("champion"),
            "challenger": self.config.get("challenger"),
            "mode": self.config.get("mode", "none"),
            "share": self.config.get("share", 0),
            # a backend still holding handed-over connections counts as busy: ServingResource.drain waits for them
            "in_flight": {**self.in_flight, **{u: self.in_flight.get(u, 0) + 1 for u in self.recalling}},
            "arms": {k: v.summary() for k, v in self.arms.items()},
        }
        return Response(200, JSON_HEADERS, json.dumps(state).encode())

    # lifetime ------------------------------------------------------------------------------------------------
    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT; then stop accepting, let in-flight requests finish, and stop the backends."""
        loop = asyncio.get_running_loop()
        connections = self.connections
        server = await loop.create_server(lambda: ServerProtocol(self.handle, connections, after=self.hand_over), host, port,
                                          backlog=2048, reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sweeper = loop.create_task(close_idle(connections, stop))
        if ready is not None:
            ready.set()
        await stop.wait()
        server.close()
        deadline = time.monotonic() + 10
        while any(self.in_flight.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in [*self.tasks, sweeper]:
            task.cancel()
        for conn in list(connections):
            if conn.transport is not None:
                conn.transport.close()
        for pool in self.upstreams.values():
            pool.close()
        self.flush()
        stop_backends(self.config)


def combinable_rows(body: bytes) -> list[Any] | None:
    """The rows of a body that is exactly ``{"rows": [<one or more rows>]}`` (what a combined request can carry)."""
    import orjson

    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(payload) is not dict or len(payload) != 1:
        return None
    rows = payload.get("rows")
    return rows if type(rows) is list and rows else None


class Coalescer:
    """Combines concurrent ``/predict`` requests to one arm into one upstream request per batch.

    A request arriving while fewer than ``in_flight_limit`` combined requests are out goes at once (with whatever else
    is queued); otherwise it queues, and when an upstream answer comes back everything queued goes as the next
    request, up to the spec's ``max_batch_rows`` rows. No timer: an idle endpoint adds no delay, a busy one batches by
    itself. The backend answers a combined request with one prediction per row in order; each client gets its own
    slice as ``{"predictions": [...], "model_version": ...}``, the backend's own answer for its rows alone. A combined
    request that is refused or fails is not answered to anyone: each of its requests is sent again alone.
    """

    def __init__(self, router: Router, arm: str) -> None:
        self.router = router
        self.arm = arm
        self.queue: deque[tuple[Request, list[Any], asyncio.Future[Response]]] = deque()
        self.in_flight = 0

    def _upstream(self) -> dict[str, Any]:
        return self.router.config.get(self.arm) or self.router.config.get("champion") or {}

    async def submit(self, request: Request, rows: list[Any]) -> Response:
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.queue.append((request, rows, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        upstream = self._upstream()
        limit = int(upstream.get("max_batch_rows") or DEFAULT_BATCH_ROWS)
        in_flight_limit = max(1, int(upstream.get("workers") or 1))
        while self.queue and self.in_flight < in_flight_limit:
            batch = [self.queue.popleft()]
            rows = len(batch[0][1])
            while self.queue and rows + len(self.queue[0][1]) <= limit:
                rows += len(self.queue[0][1])
                batch.append(self.queue.popleft())
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self.router.tasks.add(task)
            task.add_done_callback(self.router.tasks.discard)

    async def _send(self, batch: list[tuple[Request, list[Any], asyncio.Future[Response]]]) -> None:
        try:
            if len(batch) == 1:
                await self._alone(batch[0][0], batch[0][2])
                return
            started = time.perf_counter()
            try:
                answers, version = await self._combined(batch)
            except Exception:  # noqa: BLE001 - whatever went wrong with the combined request, each one is sent alone
                answers, version = None, ""
            if answers is None:
                await asyncio.gather(*(self._alone(request, future) for request, _, future in batch))
                return
            seconds = time.perf_counter() - started
            self.router.observe_combined(self.arm, len(batch))
            for (_, _, future), answer in zip(batch, answers, strict=True):
                self.router._record(self.arm if self.router.config.get(self.arm) else "champion", version, answer.status,
                                    seconds, answer.body, served=True)
                if not future.done():
                    future.set_result(answer)
        finally:
            self.in_flight -= 1
            self._dispatch()

    async def _alone(self, request: Request, future: asyncio.Future[Response]) -> None:
        try:
            answer = await self.router._forward(self.arm, request)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting client, as a direct call would raise it
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(answer)

    async def _combined(self, batch: list[tuple[Request, list[Any], asyncio.Future[Response]]]) -> tuple[list[Response] | None, str]:
        """One upstream request for the batch: each client's answer and the model version that answered, or None when
        the backend did not answer 200 with one prediction per row."""
        import orjson

        first = batch[0][0]
        body = orjson.dumps({"rows": [row for _, rows, _ in batch for row in rows]})
        headers = [*first.raw_headers, (b"x-kiln-requests", b"%d" % len(batch))]
        combined = Request("POST", "/predict", b"", first.headers, headers, body, first.client)
        answer = await self.router._forward(self.arm, combined, record=False)
        if answer.status != 200:
            return None, ""
        content = orjson.loads(answer.body)
        predictions = content.get("predictions")
        if type(predictions) is not list or len(predictions) != sum(len(rows) for _, rows, _ in batch):
            return None, ""
        answers, offset = [], 0
        for _, rows, _ in batch:
            part = dict(content, predictions=predictions[offset:offset + len(rows)])
            offset += len(rows)
            answers.append(Response(200, list(answer.headers), orjson.dumps(part)))
        return answers, str(content.get("model_version", ""))


class RouterMetrics:
    """The router's own Prometheus series (one process, its own registry)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("kiln_router_requests", "Requests proxied to /predict by arm", ["arm", "model_version", "status"],
                                     registry=self.registry)
        self.latency = prom.Histogram("kiln_router_request_duration_seconds", "Upstream /predict time by arm", ["arm"],
                                      registry=self.registry,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))

        self.combined = prom.Counter("kiln_router_combined_requests", "Upstream /predict requests that carried several "
                                     "client requests (coalesced)", ["arm"], registry=self.registry)
        self.coalesced = prom.Counter("kiln_router_coalesced_requests", "Client /predict requests answered from a combined "
                                      "upstream request", ["arm"], registry=self.registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, arm: str, version: str, status: int, seconds: float) -> None:
        children = self._children.get((arm, version, status))
        if children is None:  # labels() takes a lock and builds a key: once per label set, not per request
            children = self._children[(arm, version, status)] = (self.requests.labels(arm, version, str(status)),
                                                                  self.latency.labels(arm))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        import prometheus_client as prom

        return bytes(prom.generate_latest(self.registry))


def stop_backends(config: dict[str, Any]) -> None:
    """Stop the backends the router fronts (each `bentoml serve` is its own process group)."""
    pids = [u["pid"] for arm in ("champion", "challenger") if (u := config.get(arm)) and u.get("pid")]
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + 20
    for pid in pids:
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Kiln endpoint router (proxy, roll, canary, shadow)")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    router = Router(args.config)
    try:
        import uvloop  # the event loop uvicorn would pick: libuv, faster per request than asyncio's default
    except ImportError:
        asyncio.run(router.serve(args.host, args.port))
    else:
        uvloop.run(router.serve(args.host, args.port))


if __name__ == "__main__":
    main()
