"""The BentoML service every pipeline's endpoint runs (`bentoml serve serving.service:KilnService` of a Kiln bento).

The model comes from the bento model named by ``KILN_MODEL_TAG``; the pipeline spec travels inside that model's
metadata (``kiln_spec``), so features are computed by the same code as `<p>/features`. The spec is read when this
module is imported, and the request model of ``POST /predict`` is generated from it (:func:`serving.requests.row_model`):
``/docs.json`` lists every input column with its type and limits, and a typed client (``bentoml.SyncHTTPClient``)
works. Without ``KILN_MODEL_TAG`` (``bentoml build`` imports the module to describe the service) the rows are
untyped objects; the served endpoint always has the tag.

:class:`KilnService` serves ``POST /predict {"rows": [...]}`` -> ``{"predictions": [...], "model_version": "<n>"}``,
``GET /metadata``, and BentoML's ``/livez``, ``/readyz``, ``/metrics``, ``/docs.json``. In front of its routes sits
:class:`Front`, an ASGI middleware (BentoML's ``add_asgi_middleware``) that validates every ``/predict`` request with
:mod:`serving.requests` before BentoML parses it: every bad request gets a 4xx ``{"error": "..."}`` naming the field
and the row (``rows[3].amount: ...``), none gets a 5xx. It answers 401 without the API key, 405 for another method on
``/predict`` or ``/metadata``, 415 for a body that is not JSON (a ``Content-Type`` other than JSON, or any
``Content-Encoding`` such as gzip), 413 beyond the body limit or ``serving.max_batch_rows`` rows; text is limited to
``serving.max_string_chars``. It drops every ``X-Kiln-*`` header a client sends (no internal header is trusted), gives
each request an id (the client's ``X-Request-ID`` when it is a plain token, else a new one; returned as
``X-Request-ID``), logs every 5xx with that id, adds ``X-Kiln-Model-Version`` to every answer, and counts every
``/predict`` answer once (``kiln_requests_total``, the latency histogram and the stored telemetry). A request not
answered within the spec's ``serving.timeout_s`` gets BentoML's 504 (``traffic.timeout``); once warm, the worker
freezes what it has loaded and makes full garbage collections rare (:mod:`serving.collector`).

Valid requests are scored in adaptive micro-batches (:class:`serving.batching.MicroBatcher`, sized by the spec's
``serving.max_batch_rows`` and ``serving.max_latency_ms``) in the worker process: features, predict and the prediction
log run once per batch, and each request gets its own rows' predictions. Not BentoML's ``batchable`` APIs: measured
head to head on one worker with 1-row requests at 16 connections (figures in :mod:`serving.batching`), a batchable
model service behind ``bentoml.depends`` served about a third of the requests per second, and connections to it were
reset under load (BentoML issue 4971); a batchable API on the same service, reached through BentoML's in-process self
client, did no better.

With ``KILN_PREDICTION_LOG_ROOT`` set (``ServingResource`` and the Kubernetes Deployment do), each worker logs every
scored batch (the request rows plus ``_logged_at``, ``_model_version``, ``_prediction``) to a
:class:`serving.predlog.PredictionShipper`, which ships it as Parquet objects under ``<root>/predictions/<p>/`` and is
flushed when the worker shuts down. The same shipper writes the worker's ``/predict`` telemetry (answers by status
class, rows, a latency histogram; :mod:`kiln.telemetry`) under ``<root>/telemetry/<p>/``, so SLIs survive rolls and
restarts and add up across replicas.

With ``KILN_API_KEY`` set, ``/predict`` and ``/metadata`` need ``Authorization: Bearer <key>`` (or ``X-API-Key``);
``/livez``, ``/readyz`` and ``/metrics`` stay open. Access logs are off unless ``KILN_ACCESS_LOG=1``; workers come from
``KILN_WORKERS`` (set by ``ServingResource`` from ``serving.workers``, 0 = CPUs). Tracing spans are off (Kiln exports
none).

Prometheus series at ``GET /metrics``: BentoML's own (``bentoml_service_request_total``,
``bentoml_service_request_duration_seconds``, ``bentoml_service_request_in_progress``, ...) and Kiln's, all labelled
``pipeline`` and ``model_version``:

- ``kiln_requests_total{status}``: /predict answers by HTTP status (200, 400, 401, 405, 413, 415, 500, ...)
- ``kiln_request_duration_seconds``: histogram of /predict latency (request to response)
- ``kiln_batch_rows``: histogram of rows per scored batch
- ``kiln_batch_requests``: histogram of requests per scored batch
- ``kiln_predicted_rows_total``: rows scored
- ``kiln_prediction_score``: histogram of predicted scores

The local router in front of the backends (:mod:`serving.router`) adds ``kiln_router_*`` series at its own ``/metrics``.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, cast

import bentoml
from pydantic import BaseModel, Field

from kiln import settings
from kiln.features import compute_features
from kiln.spec import PipelineSpec
from serving.collector import settle
from serving.predlog import PredictionShipper
from serving.requests import MAX_BODY_BYTES, RequestError, Rows, example_row, frame_of, parse_request, parse_rows, row_model

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 1000  # without a spec (bentoml build): the spec's default serving.max_batch_rows
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a client's X-Request-ID is kept only when it is a plain token
JSON = b"application/json"
PROTECTED = ("/predict", "/metadata")


def served_spec() -> tuple[PipelineSpec | None, str]:
    """The spec of the bento model ``KILN_MODEL_TAG`` names and the tag; ``(None, "")`` without the variable."""
    try:
        tag = settings.model_tag()
    except RuntimeError:
        return None, ""
    return PipelineSpec.from_json(str(bentoml.models.get(tag).info.metadata["kiln_spec"])), tag


SPEC, MODEL_TAG = served_spec()
Row: Any = row_model(SPEC) if SPEC is not None else dict[str, Any]
MAX_ROWS = SPEC.serving.max_batch_rows if SPEC is not None else DEFAULT_BATCH_ROWS
DEFAULT_TIMEOUT_S = 10.0  # without a spec (bentoml build): the spec's default serving.timeout_s
SERVICE_CONFIG: dict[str, Any] = {
    # BentoML's request deadline (504 beyond). Its TimeoutMiddleware keeps a timer alive this long after every request,
    # so it also bounds what the garbage collector walks (serving.collector).
    "traffic": {"timeout": SPEC.serving.timeout_s if SPEC is not None else DEFAULT_TIMEOUT_S},
    "workers": settings.serving_workers(),
    "logging": {"access": {"enabled": settings.access_log()}},
    "tracing": {"excluded_urls": ["."]},  # every URL: no span per request (Kiln exports no traces)
}


class Prediction(BaseModel):
    """The answer of ``POST /predict``: one prediction per row, in order, and the model version that made them."""

    predictions: list[float]
    model_version: str


def open_prediction_log(pipeline: str) -> PredictionShipper | None:
    """This process's prediction-log shipper (:mod:`serving.predlog`), or None without ``KILN_PREDICTION_LOG_ROOT``.

    One shipper per worker process: the replica name is ``<KILN_REPLICA>-<pid>`` (two workers, or two backends of one
    pipeline on a host, never share a name or a seq), and its spill folder is ``<KILN_PREDICTION_LOG_SPILL_DIR>/<replica>``.
    A new worker takes over the spill files of workers of this replica that died (``adopt_dead``): BentoML restarts a
    killed worker under a new pid, and what the dead one had spilled is still shipped, under its own keys."""
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
        adopt_dead=True,
    )


def api_key_ok(headers: dict[bytes, bytes], key: str | None) -> bool:
    """True when no key is configured, or the request carries it (``Authorization: Bearer`` or ``X-API-Key``)."""
    if not key:
        return True
    given = headers.get(b"x-api-key", b"").decode("latin-1")
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


def _json(body: Any) -> bytes:
    import orjson

    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _served() -> tuple[PipelineSpec, str]:
    if SPEC is None:
        raise RuntimeError("KILN_MODEL_TAG is not set: the endpoint does not know which bento model to serve")
    return SPEC, MODEL_TAG


def _spec_labels() -> tuple[PipelineSpec, bentoml.Model, dict[str, str]]:
    spec, tag = _served()
    ref = bentoml.models.get(tag)
    return spec, ref, dict(ref.info.labels)


# The rows Front validated for the request being served: the API reads them instead of parsing the body again.
VALIDATED: ContextVar[Rows | None] = ContextVar("kiln_validated_rows", default=None)


@bentoml.service(name="kiln", **SERVICE_CONFIG)
class KilnService:
    """Predicts for rows of the spec's input columns; answers 4xx naming the field and row on bad input (:class:`Front`)."""

    def __init__(self) -> None:
        from kiln.trainers import load_predictor
        from serving.batching import MicroBatcher
        from serving.metrics import EndpointMetrics

        self.spec, self.model_ref, self.labels = _spec_labels()
        self.version = self.labels["mlflow_model_version"]
        self.version_header = self.version.encode("latin-1")
        self.api_key = settings.api_key()
        self.max_rows = self.spec.serving.max_batch_rows
        self.unknown_category = self.spec.serving.unknown_category
        self.predictor = load_predictor(self.model_ref.path, self.spec, num_threads=1)  # LightGBM, torch or sklearn
        self.log = open_prediction_log(self.spec.name)
        self.metrics = EndpointMetrics(self.spec.name, self.version)
        self.batcher: MicroBatcher[Rows] = MicroBatcher(self.score, self.max_rows, self.spec.serving.max_latency_ms / 1000)
        self._warm_up()
        settle()  # what is loaded lives as long as the worker: frozen; full collections rare (serving.collector)

    def _warm_up(self) -> None:
        """Validate, featurize and score one example row (not logged, not counted) before the worker takes requests:
        lazy initialisation in polars and the model is paid here, not by the first client (a fresh backend's first
        answers would otherwise be its slowest, and a canary's p99 judged on them)."""
        try:
            rows = parse_request(_json({"rows": [example_row(self.spec)]}), self.spec, self.max_rows, "allow")
            self.predictor.predict(compute_features(frame_of([rows], self.spec), self.spec))
        except Exception:  # noqa: BLE001 - a warm-up never stops a worker from serving
            log.warning("warm-up of %s failed; the first request pays for initialisation", self.spec.name, exc_info=True)

    @bentoml.api(route="/predict")
    async def predict(self, rows: Annotated[list[Row], Field(min_length=1, max_length=MAX_ROWS)]) -> Prediction:
        """Score rows of the pipeline's input columns: one prediction per row, in order."""
        valid = VALIDATED.get()
        if valid is None:  # not through Front (an in-process call): the same rules, on the typed rows
            records = [r if isinstance(r, dict) else r.model_dump(by_alias=True, mode="json") for r in rows]
            frame = parse_rows(records, self.spec, self.max_rows, self.unknown_category)
            valid = Rows(frame.height, frame=frame)
        predictions = await self.batcher.submit(valid, valid.count)
        return Prediction(predictions=list(map(float, predictions)), model_version=self.version)

    def score(self, parts: list[Rows]) -> Any:
        """One batch: several requests' rows -> features -> predictions (in order), logged and counted once."""
        import numpy as np

        frame = frame_of(parts, self.spec)
        predictions = np.asarray(self.predictor.predict(compute_features(frame, self.spec)), dtype=float).ravel()
        if self.log is not None:
            self._log_batch(frame, predictions)
        self.metrics.batch(len(parts), predictions)
        return predictions

    def _log_batch(self, frame: Any, predictions: Any) -> None:
        """Hand a scored batch to the prediction log: the request rows plus ``_logged_at`` (epoch seconds),
        ``_model_version`` and ``_prediction``; never fails the batch."""
        import polars as pl

        assert self.log is not None
        n = frame.height
        try:  # hstack, not with_columns: no query plan per batch (~20 us against ~150 us for a batch of a few rows)
            self.log.append(frame.hstack([
                pl.Series("_logged_at", [time.time()] * n, dtype=pl.Float64),
                pl.Series("_model_version", [self.version] * n, dtype=pl.String),
                pl.Series("_prediction", predictions, dtype=pl.Float64),
            ]))
        except Exception:  # noqa: BLE001 - logging must never fail a prediction
            log.exception("prediction log of %s: could not log a batch", self.spec.name)

    def answered(self, status: int, seconds: float, rows: int = 0) -> None:
        """Count one /predict answer of ``status`` (``rows`` rows served): the live ``/metrics`` and the stored telemetry
        (:mod:`kiln.telemetry`, written by the prediction-log shipper). Every /predict answer passes here once."""
        self.metrics.request(status, seconds)
        if self.log is not None:
            try:
                self.log.telemetry.request(status, seconds, 1, rows)
            except Exception:  # noqa: BLE001 - telemetry must never fail a request
                log.exception("telemetry of %s: could not count an answer", self.spec.name)

    def metadata(self) -> dict[str, Any]:
        """Pipeline, model version, MLflow run id, Dagster run id and training data version."""
        return {
            "pipeline": self.spec.name,
            "model_version": self.version,
            "mlflow_run_id": self.labels.get("mlflow_run_id"),
            "dagster_run_id": self.labels.get("dagster_run_id"),
            "features_data_version": self.labels.get("features_data_version"),
            "input_columns": self.spec.input_columns,
            "bento_model": str(self.model_ref.tag),
            "serving": self.spec.serving.model_dump(),
        }

    @bentoml.on_shutdown
    def close_prediction_log(self) -> None:
        """Ship what is buffered before the worker exits (rows the store cannot take now stay in the spill folder)."""
        if self.log is not None:
            self.log.close()


# ------------------------------------------------------------------------------------------------ validation in front
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Refused(Exception):
    """A request answered by :class:`Front` itself: ``status`` and the ``{"error": ...}`` message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_id(headers: dict[bytes, bytes]) -> str:
    """The client's ``X-Request-ID`` when it is a plain token of at most 128 characters, else a new one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


def json_content(headers: dict[bytes, bytes]) -> bool:
    """True for a body said to be JSON (``application/json``, ``application/*+json``) or not said to be anything."""
    kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return not kind or kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int | None = None) -> bytes | None:
    """The request body, refused with 413 beyond ``limit`` bytes (said or sent; default :data:`MAX_BODY_BYTES`);
    None when the client went away."""
    limit = MAX_BODY_BYTES if limit is None else limit
    said = headers.get(b"content-length", b"")
    too_big = said.isdigit() and int(said) > limit
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if too_big or size > limit:
            # Read on (up to twice the limit, kept nowhere) so the client, still sending, gets the answer, not a reset.
            if more and size <= 2 * limit:
                too_big = True
                continue
            raise Refused(413, f"body: more than {limit} bytes; send fewer rows per request")
        chunks.append(chunk)
        if not more:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Front:
    """ASGI middleware in front of :class:`KilnService`'s routes (see the module doc): validation, auth, 405/413/415,
    request ids, the model-version header, 5xx logging and one count per ``/predict`` answer.

    ``service`` returns the serving :class:`KilnService` instance (BentoML's current service; a test passes its own)."""

    def __init__(self, app: Any, service: Callable[[], Any] | None = None) -> None:
        self.app = app
        self.service = service or current_service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        raw = scope.get("headers") or []
        kept = [(k, v) for k, v in raw if not k.lower().startswith(b"x-kiln-")]  # internal headers: never a client's
        if len(kept) != len(raw):
            scope = dict(scope, headers=kept)
        headers = {k.lower(): v for k, v in kept}
        rid = request_id(headers)
        service = self.service()
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope["method"]
        answer: dict[str, int] = {}
        extra = [(b"x-request-id", rid.encode("latin-1"))]
        if service is not None:
            extra.append((b"x-kiln-model-version", service.version_header))

        async def send_with(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = status = int(message["status"])
                message = dict(message, headers=[*(message.get("headers") or []), *extra])
                if status >= 500:
                    log.error("%s %s answered %d (request id %s)", method, path, status, rid)
            await send(message)

        if path not in PROTECTED:
            await self.app(scope, receive, send_with)
            return
        rows = 0
        try:
            if service is None:
                raise Refused(503, "the service is starting; retry")
            if path == "/metadata":
                if method != "GET":
                    raise Refused(405, "method not allowed: GET /metadata")
                if not api_key_ok(headers, service.api_key):
                    raise Refused(401, "unauthorized: send the API key as 'Authorization: Bearer <key>'")
                await respond(send_with, 200, _json(service.metadata()))
                return
            valid = await self._validate(service, scope, receive, headers)
            if valid is None:
                return  # the client went away before its body arrived: nobody to answer
            body, parsed = valid
            token = VALIDATED.set(parsed)
            try:
                await self.app(scope, replay(body, receive), send_with)
            finally:
                VALIDATED.reset(token)
            rows = parsed.count if answer.get("status") == 200 else 0
        except Refused as exc:
            await respond(send_with, exc.status, _json({"error": str(exc)}))
        except Exception:
            log.exception("%s %s failed (request id %s)", method, path, rid)
            if "status" not in answer:
                await respond(send_with, 500, _json({"error": f"internal error; request id {rid}"}))
            else:
                raise
        finally:
            if path == "/predict" and service is not None and "status" in answer:
                service.answered(answer["status"], time.perf_counter() - started, rows)

    async def _validate(self, service: Any, scope: Scope, receive: Receive,
                        headers: dict[bytes, bytes]) -> tuple[bytes, Rows] | None:
        """The body and its valid rows, or :class:`Refused` with the status and message the client gets."""
        if scope["method"] != "POST":
            raise Refused(405, "method not allowed: POST /predict")
        if not api_key_ok(headers, service.api_key):
            raise Refused(401, "unauthorized: send the API key as 'Authorization: Bearer <key>'")
        if not json_content(headers):
            kind = headers.get(b"content-type", b"").decode("latin-1")[:100]
            raise Refused(415, f"body: Content-Type {kind!r} is not JSON; send application/json")
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            raise Refused(415, f"body: Content-Encoding {encoding.decode('latin-1')[:50]!r} is not accepted; send plain JSON")
        body = await read_body(receive, headers)
        if body is None:
            return None
        try:
            return body, parse_request(body, service.spec, service.max_rows, service.unknown_category)
        except RequestError as exc:
            raise Refused(exc.status, str(exc)) from None


def current_service() -> Any:
    """The serving :class:`KilnService` instance, or None before BentoML has made it."""
    try:
        return bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the client's own messages (a disconnect)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def respond(send: Send, status: int, content: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", JSON), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


cast(Any, KilnService).add_asgi_middleware(Front)  # a Service object at run time (the decorator keeps the class's type)
