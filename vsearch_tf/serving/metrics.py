"""Prometheus metrics of the search service, in a registry of its own (one per app, so several
apps in one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from vsearch_tf.serving.state import Snapshot

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Requests, errors and latency per route, model-call batch sizes, and the index served."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "method", "status")
        self.requests = Counter(
            "vsearch_requests", "HTTP requests answered.", labels, registry=self.registry
        )
        self.errors = Counter(
            "vsearch_errors",
            "HTTP requests answered with a 4xx or 5xx.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "vsearch_request_seconds",
            "Time from request to response.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vsearch_batch_size",
            "Queries per model call (micro-batching).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.index_info = Gauge(
            "vsearch_index_info",
            "The index version served (value 1), with its model fingerprint.",
            ("version", "model_fingerprint"),
            registry=self.registry,
        )
        self.index_vectors = Gauge(
            "vsearch_index_vectors", "Vectors in the index served.", registry=self.registry
        )
        self.reloads = Counter(
            "vsearch_index_reloads",
            "Index versions loaded (the first, then each hot reload).",
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def index_loaded(self, snapshot: Snapshot) -> None:
        self.index_info.clear()
        self.index_info.labels(snapshot.version, snapshot.fingerprint).set(1)
        self.index_vectors.set(snapshot.index.count)
        self.reloads.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
