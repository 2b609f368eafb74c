"""The BentoML service every pipeline's endpoint runs (`bentoml serve` of a Kiln bento).

The model comes from the bento model named by ``KILN_MODEL_TAG``; the pipeline spec travels
inside that model's metadata, so features are computed by the same code as `<p>/features`.

``POST /predict`` reads the raw body and validates it against the spec's schema on its own
(:mod:`serving.requests`): every bad request gets 4xx naming the field and reason, none gets 5xx.
Valid requests are scored in adaptive micro-batches (:mod:`serving.batching`, sized by the spec's
``serving.max_batch_rows`` and ``serving.max_latency_ms``): features, predict and the prediction log run
once per batch, and each request gets its own rows' predictions. The two routes are a raw ASGI app mounted
on the BentoML service (no web framework's per-request layers); BentoML serves ``/livez``, ``/readyz`` and
``/metrics``. Tracing spans are off (Kiln exports none; a span per request costs more than a prediction).

The router in front (:mod:`serving.router`) reaches ``/predict`` through a *lane*: with ``KILN_LANE_PORT`` set
(``ServingResource`` does), every worker also listens on that port (SO_REUSEPORT) with Kiln's lean HTTP/1.1
protocol (:mod:`serving.proxy`) and answers ``POST /predict`` with the same code as the BentoML route, minus
BentoML's per-request middleware (a third of a small request's CPU). The router coalesces concurrent client
requests into one lane request and says how many with ``X-Kiln-Requests`` (trusted on the loopback-only lane,
ignored on BentoML's route), so ``kiln_requests_total`` still counts client requests. BentoML's route stays the public one
(what a Kubernetes Service or a client without the router calls); its ``bentoml_service_*`` series count only
the requests that came that way, Kiln's ``kiln_*`` series count both.

With ``KILN_HANDOFF_DIR`` set (``ServingResource`` does), each worker also takes client connections the router hands over
(:mod:`serving.handoff`): their ``POST /predict`` requests are answered by :meth:`KilnService.front` (the lane's code,
the client's own headers, ``X-Kiln-Requests`` ignored), anything else goes back to the router with the connection.
Those clients share the machine's cores with the worker, so the batcher does not rest between batches for them.

With ``KILN_PREDICTION_LOG_ROOT`` set (``ServingResource`` and the Kubernetes Deployment do), each worker logs every scored
batch (the request rows plus ``_logged_at``, ``_model_version``, ``_prediction``) to a :class:`serving.predlog.PredictionShipper`,
which ships it as Parquet objects under ``<root>/predictions/<p>/`` and is flushed when the worker shuts down. The same
shipper writes the worker's ``/predict`` telemetry (answers by status class, rows, a latency histogram; :mod:`kiln.telemetry`)
under ``<root>/telemetry/<p>/``, so SLIs survive rolls and restarts and add up across replicas.

Answers carry the model version in the ``X-Kiln-Model-Version`` header. With ``KILN_API_KEY``
set, ``/predict`` and ``/metadata`` need ``Authorization: Bearer <key>`` (or ``X-API-Key``);
``/livez``, ``/readyz`` and ``/metrics`` stay open. Access logs are off unless ``KILN_ACCESS_LOG=1``;
workers come from ``KILN_WORKERS`` (set by ``ServingResource`` from ``serving.workers``, 0 = CPUs).

Prometheus series at ``GET /metrics``: BentoML's own (``bentoml_service_request_total``,
``bentoml_service_request_duration_seconds``, ``bentoml_service_request_in_progress``, ...) and Kiln's,
all labelled ``pipeline`` and ``model_version``:

- ``kiln_requests_total{status}``: /predict answers by HTTP status (200, 400, 401, 413, ...)
- ``kiln_request_duration_seconds``: histogram of /predict latency (body read to response)
- ``kiln_batch_rows``: histogram of rows per scored batch
- ``kiln_batch_requests``: histogram of requests per scored batch
- ``kiln_predicted_rows_total``: rows scored
- ``kiln_prediction_score``: histogram of predicted scores

The router in front of it (:mod:`serving.router`) adds ``kiln_router_*`` series at its own ``/metrics``.
"""

from __future__ import annotations

import dataclasses
import gc
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml

from kiln import settings
from kiln.features import compute_features
from kiln.spec import PipelineSpec
from serving.predlog import PredictionShipper
from serving.proxy import JSON_HEADERS, GiveBack, Request, Response
from serving.requests import MAX_BODY_BYTES, RequestError, Rows, frame_of, parse_request

JSON = b"application/json"
log = logging.getLogger(__name__)


def open_prediction_log(pipeline: str) -> PredictionShipper | None:
    """This worker's prediction-log shipper (:mod:`serving.predlog`), or None without ``KILN_PREDICTION_LOG_ROOT``.

    One shipper per worker process: the replica name is ``<KILN_REPLICA>-<pid>`` (two workers, or two backends of one
    pipeline on a host, never share a name or a seq), and its spill folder is ``<KILN_PREDICTION_LOG_SPILL_DIR>/<replica>``."""
    root = settings.prediction_log_root()
    if not root:
        return None
    replica = f"{settings.replica()}-{os.getpid()}"
    return PredictionShipper(
        root, pipeline, replica,
        flush_rows=settings.prediction_log_flush_rows(),
        flush_seconds=settings.prediction_log_flush_seconds(),
        spill_dir=Path(settings.prediction_log_spill_dir()) / replica,
        max_spill_rows=settings.prediction_log_max_spill_rows(),
    )


def api_key_ok(headers: Any, key: str | None) -> bool:
    """True when no key is configured, or the request carries it (``Authorization: Bearer`` or ``X-API-Key``)."""
    if not key:
        return True
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


def _auth_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw if k in (b"authorization", b"x-api-key")}


def _json(body: Any) -> bytes:
    import orjson

    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


class Endpoint:
    """The ASGI app mounted on the service: ``POST /predict`` and ``GET /metadata`` (the service instance does the work)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        service: KilnService = bentoml.get_current_service()
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope["method"]
        if path == "/predict" and method == "POST":
            status, content = await service.predict(scope, receive)
        elif path == "/metadata" and method == "GET":
            status, content = service.metadata(scope)
        elif path in ("/predict", "/metadata"):
            status, content = 405, b'{"error":"method not allowed: POST /predict, GET /metadata"}'
        else:
            status, content = 404, b'{"error":"not found: POST /predict, GET /metadata, /livez, /readyz, /metrics"}'
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", JSON), (b"content-length", str(len(content)).encode()),
            (b"x-kiln-model-version", service.version_header)]})
        await send({"type": "http.response.body", "body": content})


async def read_body(receive: Any) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"body: more than {MAX_BODY_BYTES} bytes; send fewer rows per request", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@bentoml.asgi_app(Endpoint(), path="/")
@bentoml.service(
    name="kiln",
    traffic={"timeout": 30},
    workers=settings.serving_workers(),
    logging={"access": {"enabled": settings.access_log()}},
    tracing={"excluded_urls": ["."]},  # every URL: no span per request (Kiln exports no traces)
)
class KilnService:
    """Predicts for rows of the spec's input columns; answers 4xx naming the field on bad input."""

    def __init__(self) -> None:
        from serving.batching import MicroBatcher
        from serving.metrics import EndpointMetrics

        self.model_ref = bentoml.models.get(settings.model_tag())
        info = self.model_ref.info
        self.spec = PipelineSpec.from_json(str(info.metadata["kiln_spec"]))
        self.labels = dict(info.labels)
        self.version = self.labels["mlflow_model_version"]
        self.version_header = self.version.encode("latin-1")
        self.predict_features = self._load_model()
        self.log = open_prediction_log(self.spec.name)
        self.api_key = settings.api_key()
        self.max_rows = self.spec.serving.max_batch_rows
        self.unknown_category = self.spec.serving.unknown_category
        self.metrics = EndpointMetrics(self.spec.name, self.version)
        # Clients whose connections the router hands over share this machine's cores: no rest between batches for them.
        self.batcher: MicroBatcher[Rows] = MicroBatcher(self.score, self.max_rows, self.spec.serving.max_latency_ms / 1000,
                                                        rest=not settings.handoff_dir())
        lane = settings.lane()
        if lane:
            self._open_lane(*lane)
        # Everything loaded so far (BentoML, polars, the model: millions of objects) lives as long as the worker; out of
        # the collector's sight, each full collection triggered by a batch's allocations no longer walks all of it.
        gc.freeze()

    def _load_model(self) -> Any:
        """A function from a features frame to a 1-D array of predictions (the one place a model is loaded)."""
        from kiln.trainers import load_predictor

        self.predictor = load_predictor(self.model_ref.path, self.spec, num_threads=1)  # LightGBM or torch, from the MLmodel
        return self.predictor.predict

    def score(self, parts: list[Rows]) -> Any:
        """One batch: several requests' rows -> features -> predictions (in order), logged and counted once."""
        import numpy as np

        frame = frame_of(parts, self.spec)
        predictions = np.asarray(self.predict_features(compute_features(frame, self.spec)), dtype=float).ravel()
        if self.log is not None:
            self._log_batch(frame, predictions)
        self.metrics.batch(sum(p.requests for p in parts), predictions)
        return predictions

    def _log_batch(self, frame: Any, predictions: Any) -> None:
        """Hand a scored batch to the prediction log: the request rows plus ``_logged_at`` (epoch seconds),
        ``_model_version`` and ``_prediction``; never fails the batch."""
        import polars as pl

        assert self.log is not None
        try:
            self.log.append(frame.with_columns(
                pl.lit(time.time()).alias("_logged_at"),
                pl.lit(self.version).alias("_model_version"),
                pl.Series("_prediction", predictions),
            ))
        except Exception:  # noqa: BLE001 - logging must never fail a prediction
            log.exception("prediction log of %s: could not log a batch", self.spec.name)

    @bentoml.on_shutdown
    def close_prediction_log(self) -> None:
        """Ship what is buffered before the worker exits (rows the store cannot take now stay in the spill folder)."""
        if self.log is not None:
            self.log.close()

    def answered(self, status: int, seconds: float, count: int = 1, rows: int = 0) -> None:
        """Count ``count`` /predict answers of ``status`` (``rows`` rows served): the live ``/metrics`` and the stored
        telemetry (:mod:`kiln.telemetry`, written by the prediction-log shipper). Every /predict answer passes here."""
        self.metrics.request(status, seconds, count)
        if self.log is not None:
            try:
                self.log.telemetry.request(status, seconds, count, rows)
            except Exception:  # noqa: BLE001 - telemetry must never fail a request
                log.exception("telemetry of %s: could not count an answer", self.spec.name)

    async def predict(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
        """Score rows: ``{"rows": [...]}`` -> ``{"predictions": [...], "model_version": "<n>"}``; 4xx names the field."""
        started = time.perf_counter()
        try:
            body = await read_body(receive)
        except RequestError as exc:
            self.answered(exc.status, time.perf_counter() - started)
            return exc.status, _json({"error": str(exc)})
        return await self.answer(scope["headers"], body, started)

    async def answer(self, headers: list[tuple[bytes, bytes]], body: bytes, started: float, requests: int = 1) -> tuple[int, bytes]:
        """The ``/predict`` answer for a request's raw headers and body (BentoML's HTTP route and the router's lane).

        ``requests`` > 1: the router combined that many client requests into this one (:class:`serving.router.Coalescer`);
        an answer of 200 counts for each of them. Any other answer counts for none: the router then sends each request
        again on its own, and those answers are the ones counted."""
        counted = 1 if requests == 1 else 0
        if self.api_key and not api_key_ok(_auth_headers(headers), self.api_key):
            self.answered(401, time.perf_counter() - started, counted)
            return 401, b'{"error":"unauthorized: send the API key as \'Authorization: Bearer <key>\'"}'
        try:
            rows = parse_request(body, self.spec, self.max_rows, self.unknown_category)
        except RequestError as exc:
            self.answered(exc.status, time.perf_counter() - started, counted)
            return exc.status, _json({"error": str(exc)})
        if requests > 1:
            rows = dataclasses.replace(rows, requests=requests)
        try:
            predictions = await self.batcher.submit(rows, rows.count)
        except Exception as exc:  # noqa: BLE001 - the model failed on valid rows: a server error, said as such
            self.answered(500, time.perf_counter() - started, counted)
            return 500, _json({"error": f"scoring failed: {type(exc).__name__}: {str(exc)[:300]}"})
        content = _json({"predictions": predictions, "model_version": self.version})
        self.answered(200, time.perf_counter() - started, requests, rows.count)
        return 200, content

    async def lane(self, request: Request) -> Response:
        """The router's lane (``KILN_LANE_PORT``): ``POST /predict`` only, answered exactly as on BentoML's route."""
        if request.path != "/predict" or request.method != "POST":
            return Response(404, JSON_HEADERS, b'{"error":"the router lane serves POST /predict only"}')
        requests = 1
        combined = request.headers.get(b"x-kiln-requests")  # set by the router's coalescer (the lane is loopback-only)
        if combined is not None and combined.isdigit():
            requests = max(1, min(int(combined), self.max_rows))
        status, content = await self.answer(request.raw_headers, request.body, time.perf_counter(), requests)
        return Response(status, [(b"content-type", JSON), (b"x-kiln-model-version", self.version_header)], content)

    async def front(self, request: Request) -> Response:
        """A client connection the router handed over (:mod:`serving.handoff`): its ``POST /predict`` requests are
        answered here as the router would answer them; anything else goes back to the router with the connection."""
        if request.path != "/predict" or request.method != "POST":
            raise GiveBack
        status, content = await self.answer(request.raw_headers, request.body, time.perf_counter())
        return Response(status, [(b"content-type", JSON), (b"x-kiln-model-version", self.version_header),
                                 (b"x-kiln-arm", b"champion")], content)

    def _open_handoff(self, folder: str, loop: Any, swept: set[Any]) -> None:
        """Take the client connections the router hands over on ``<folder>/<pid>.sock``; give them back when asked."""
        import asyncio
        import socket

        from serving.handoff import WorkerChannels
        from serving.proxy import ServerProtocol

        handed: dict[socket.socket, set[ServerProtocol]] = {}
        adopting: dict[socket.socket, set[asyncio.Task[Any]]] = {}

        def adopt(sock: socket.socket, channel: socket.socket) -> None:
            mine = handed.setdefault(channel, set())

            def made() -> ServerProtocol:
                protocol = ServerProtocol(self.front, swept, give_back=lambda fd, prefix: channels.given_back(channel, fd, prefix))
                mine.add(protocol)
                return protocol

            task = loop.create_task(loop.connect_accepted_socket(made, sock))
            pending = adopting.setdefault(channel, set())
            pending.add(task)
            task.add_done_callback(pending.discard)

        async def give_back(channel: socket.socket) -> None:
            """Every connection of the channel back to the router (each once idle), then ``done``."""
            await asyncio.gather(*adopting.pop(channel, set()), return_exceptions=True)  # handed over just before
            mine = handed.pop(channel, set())
            for protocol in list(mine):
                protocol.release(lambda fd, prefix: channels.given_back(channel, fd, prefix))
            deadline = time.monotonic() + 30.0
            while any(p.transport is not None for p in mine) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            channels.finished(channel)

        def give_back_all(channel: socket.socket) -> None:
            task = loop.create_task(give_back(channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        channels = WorkerChannels(folder, loop, adopt, give_back_all)
        self._handoff = channels

    def _open_lane(self, host: str, port: int) -> None:
        """Listen on the lane port (shared by all workers through SO_REUSEPORT) before the service reports ready."""
        import asyncio
        import socket

        from serving.proxy import ServerProtocol, close_idle

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)  # bound and listening now: connections queue until the server below accepts them
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        connections: set[ServerProtocol] = set()
        self._lane = loop.create_task(loop.create_server(lambda: ServerProtocol(self.lane, connections), sock=sock))
        self._lane_sweeper = loop.create_task(close_idle(connections, asyncio.Event()))  # idle keep-alive clients
        self._tasks: set[asyncio.Task[Any]] = set()
        folder = settings.handoff_dir()
        if folder:
            self._open_handoff(folder, loop, connections)

    def metadata(self, scope: dict[str, Any]) -> tuple[int, bytes]:
        """Pipeline, model version, MLflow run id, Dagster run id and training data version."""
        if self.api_key and not api_key_ok(_auth_headers(scope["headers"]), self.api_key):
            return 401, b'{"error":"unauthorized"}'
        return 200, _json({
            "pipeline": self.spec.name,
            "model_version": self.version,
            "mlflow_run_id": self.labels.get("mlflow_run_id"),
            "dagster_run_id": self.labels.get("dagster_run_id"),
            "features_data_version": self.labels.get("features_data_version"),
            "input_columns": self.spec.input_columns,
            "bento_model": str(self.model_ref.tag),
            "serving": self.spec.serving.model_dump(),
        })
