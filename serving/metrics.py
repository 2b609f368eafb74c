"""Kiln's own Prometheus series for an endpoint, next to BentoML's built-in ``bentoml_service_*`` ones at ``/metrics``.

Created inside the server worker (after BentoML has set ``PROMETHEUS_MULTIPROC_DIR``), so every worker's
counts reach the one ``/metrics`` answer. Names are listed in :mod:`serving.service`.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
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

    def request(self, status: int, seconds: float, count: int = 1) -> None:
        """``count`` requests answered ``status`` in ``seconds`` each (a combined request from the router counts for all
        the client requests in it; 0 counts nothing)."""
        if count < 1:
            return
        counter = self._status.get(status)
        if counter is None:
            counter = self._status[status] = self.requests.labels(**self.values, status=str(status))
        counter.inc(count)
        if count == 1:
            self.latency.observe(seconds)
        else:
            import numpy as np

            observe_many(self.latency, np.full(count, seconds), LATENCY_BUCKETS)

    def batch(self, requests: int, predictions: Any) -> None:
        """Record a scored batch: its requests, its rows and all its scores at once (bucket counts by numpy)."""
        import numpy as np

        scores = np.asarray(predictions, dtype=float).ravel()
        self.batch_requests.observe(requests)
        self.batch_rows.observe(len(scores))
        self.rows.inc(len(scores))
        observe_many(self.score, scores, SCORE_BUCKETS)


def observe_many(histogram: Any, values: Any, bounds: tuple[float, ...]) -> None:
    """Add many observations to a prometheus_client histogram child in O(buckets) Python steps."""
    import numpy as np

    finite = values[np.isfinite(values)]
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or total is None or len(buckets) != len(bounds) + 1:
        for v in finite.tolist():  # another prometheus_client layout: the public API, one value at a time
            histogram.observe(v)
        return
    index = np.searchsorted(np.asarray(bounds, dtype=float), finite, side="left")
    counts = np.bincount(index, minlength=len(bounds) + 1)
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(finite.sum()))
