"""Kiln's own Prometheus series for an endpoint, next to BentoML's built-in ``bentoml_service_*`` ones at ``/metrics``.

Created inside each server process (after BentoML has set ``PROMETHEUS_MULTIPROC_DIR``), through prometheus_client's
public API in its multiprocess mode, so every worker's counts reach the one ``/metrics`` answer: the front service's
workers count ``/predict`` answers, the model service's workers count scored batches. Names are listed in
:mod:`serving.service`.
"""

from __future__ import annotations

from typing import Any

from kiln.telemetry import LATENCY_EDGES_S

LATENCY_BUCKETS = LATENCY_EDGES_S  # one set of edges: the live histogram and the stored telemetry (kiln.telemetry)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class EndpointMetrics:
    """Requests by status, latency, batch sizes and the prediction-score distribution, labelled by model version."""

    def __init__(self, pipeline: str, model_version: str) -> None:
        import prometheus_client as prom

        labels = ["pipeline", "model_version"]
        self.values = {"pipeline": pipeline, "model_version": model_version}
        self.requests = prom.Counter("kiln_requests", "Prediction requests by HTTP status", [*labels, "status"])
        self.latency = prom.Histogram(
            "kiln_request_duration_seconds", "Time to answer /predict, parsing to response", labels, buckets=LATENCY_BUCKETS
        ).labels(**self.values)
        self.batch_rows = prom.Histogram("kiln_batch_rows", "Rows per scored batch", labels, buckets=BATCH_BUCKETS).labels(**self.values)
        self.batch_requests = prom.Histogram(
            "kiln_batch_requests", "Requests per scored batch", labels, buckets=BATCH_BUCKETS
        ).labels(**self.values)
        self.rows = prom.Counter("kiln_predicted_rows", "Rows scored", labels).labels(**self.values)
        self.score = prom.Histogram(
            "kiln_prediction_score", "Distribution of predicted scores", labels, buckets=SCORE_BUCKETS
        ).labels(**self.values)
        self._status: dict[int, Any] = {}

    def request(self, status: int, seconds: float) -> None:
        """One ``/predict`` request answered ``status`` in ``seconds``."""
        counter = self._status.get(status)
        if counter is None:
            counter = self._status[status] = self.requests.labels(**self.values, status=str(status))
        counter.inc()
        self.latency.observe(seconds)

    def batch(self, requests: int, predictions: Any) -> None:
        """Record a scored batch: its requests, its rows and each of its scores."""
        import numpy as np

        scores = np.asarray(predictions, dtype=float).ravel()
        self.batch_requests.observe(requests)
        self.batch_rows.observe(len(scores))
        self.rows.inc(len(scores))
        observe_each(self.score, scores)


def observe_each(histogram: Any, values: Any) -> None:
    """Observe every finite value of a numpy array on a prometheus_client histogram child.

    prometheus_client has no bulk observe (its maintainers point bulk use at custom collectors, which BentoML's
    multiprocess ``/metrics`` would not collect from every worker), so this is one public ``observe`` per value:
    about 2 us each in multiprocess mode, 2 ms for a 1,000-row request."""
    import numpy as np

    observe = histogram.observe
    for value in values[np.isfinite(values)].tolist():
        observe(value)
