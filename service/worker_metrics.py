"""Prometheus metrics of the training worker (label ``model``; per-layer gauges add ``layer``).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` base units) and share
the ``normprop_worker_`` prefix so they never collide with the API's metrics. Counters count
this process's work (they restart at 0 with the process, as Prometheus' ``rate()`` expects);
the totals a model has accumulated over its life are in the snapshot metadata.

Every model's metrics live in one :class:`WorkerMetrics` with its own registry, so tests (and a
process that runs several workers) never share global state. Per-model children are looked up
once (:meth:`WorkerMetrics.for_model`) so the hot path does no label lookups.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["WorkerMetrics", "ModelMetrics", "BATCH_BUCKETS"]

#: Batch sizes are powers of two up to the largest ``max_batch`` one would configure.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
_CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class ModelMetrics:
    """The label-bound children of one model (cheap to update on the hot path)."""

    samples: Any
    steps: Any
    batch_size: Any
    loss: Any
    accuracy: Any
    window_accuracy: Any
    mae: Any
    window_mae: Any
    lag: Any
    snapshot_version: Any
    snapshot_age: Any
    checkpoint_duration: Any
    redis_up: Any
    lease_held: Any
    samples_per_second: Any
    _parent: WorkerMetrics
    _model: str

    def dead_letter(self, reason: str, n: int = 1) -> None:
        self._parent.dead_letters.labels(self._model, reason).inc(n)

    def skipped(self, reason: str) -> None:
        self._parent.skipped_steps.labels(self._model, reason).inc()

    def layer(self, layer: str, mean: float, std: float) -> None:
        self._parent.layer_input_mean.labels(self._model, layer).set(mean)
        self._parent.layer_input_std.labels(self._model, layer).set(std)


class WorkerMetrics:
    """The worker's metric families in a private registry; :meth:`serve` exposes them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "normprop_worker_"
        self.samples = Counter(p + "samples_trained", "Samples trained (one SGD step each "
                               "batch).", ["model"], registry=r)
        self.steps = Counter(p + "steps", "SGD steps taken (skipped steps excluded).", ["model"],
                             registry=r)
        self.batch_size = Histogram(p + "batch_size", "Samples per training step (1 on a "
                                    "trickle, up to max_batch on a backlog).", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.loss = Gauge(p + "loss", "Training loss of the last step (pre-update).", ["model"],
                          registry=r)
        self.accuracy = Gauge(p + "prequential_accuracy", "Test-then-train accuracy over every "
                              "trained sample.", ["model"], registry=r)
        self.window_accuracy = Gauge(p + "prequential_window_accuracy", "Test-then-train "
                                     "accuracy over the last samples (sliding window).",
                                     ["model"], registry=r)
        self.mae = Gauge(p + "prequential_mae", "Test-then-train mean absolute error (regression).",
                         ["model"], registry=r)
        self.window_mae = Gauge(p + "prequential_window_mae", "Test-then-train MAE over the "
                                "sliding window (regression).", ["model"], registry=r)
        self.lag = Gauge(p + "stream_lag", "Stream entries not yet trained (undelivered plus "
                         "delivered-but-untrained).", ["model"], registry=r)
        self.snapshot_version = Gauge(p + "snapshot_version", "Newest snapshot version written.",
                                      ["model"], registry=r)
        self.snapshot_age = Gauge(p + "snapshot_age_seconds", "Seconds since the newest snapshot "
                                  "was written.", ["model"], registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Malformed entries moved to the "
                                    "dead-letter stream.", ["model", "reason"], registry=r)
        self.skipped_steps = Counter(p + "skipped_steps", "Steps skipped for a non-finite loss "
                                     "or gradient.", ["model", "reason"], registry=r)
        self.layer_input_mean = Gauge(p + "layer_input_mean", "Mean over units of each hidden "
                                      "layer's standardised input (NormProp keeps it near 0).",
                                      ["model", "layer"], registry=r)
        self.layer_input_std = Gauge(p + "layer_input_std", "Mean over units of each hidden "
                                     "layer's input std (NormProp keeps it near 1).",
                                     ["model", "layer"], registry=r)
        self.checkpoint_duration = Histogram(p + "checkpoint_duration_seconds", "Time to write "
                                             "a checkpoint and ack what it covers.", ["model"],
                                             buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.redis_up = Gauge(p + "redis_up", "1 while the worker's Redis connection works.",
                              ["model"], registry=r)
        self.lease_held = Gauge(p + "lease_held", "1 while this worker holds the model's lease.",
                                ["model"], registry=r)
        self.samples_per_second = Gauge(p + "samples_per_second", "Training throughput since "
                                        "the model was (re)loaded.", ["model"], registry=r)
        self._server: Any = None
        self._lock = threading.Lock()

    def for_model(self, model: str) -> ModelMetrics:
        """Children bound to ``model``; creating them also makes the series appear at 0."""
        return ModelMetrics(
            samples=self.samples.labels(model), steps=self.steps.labels(model),
            batch_size=self.batch_size.labels(model), loss=self.loss.labels(model),
            accuracy=self.accuracy.labels(model),
            window_accuracy=self.window_accuracy.labels(model), mae=self.mae.labels(model),
            window_mae=self.window_mae.labels(model), lag=self.lag.labels(model),
            snapshot_version=self.snapshot_version.labels(model),
            snapshot_age=self.snapshot_age.labels(model),
            checkpoint_duration=self.checkpoint_duration.labels(model),
            redis_up=self.redis_up.labels(model), lease_held=self.lease_held.labels(model),
            samples_per_second=self.samples_per_second.labels(model),
            _parent=self, _model=model,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` in a daemon thread; returns the bound port."""
        with self._lock:
            if self._server is None:
                self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
            return int(self._server.server_port)

    def shutdown(self) -> None:
        """Stop the HTTP server, if one was started."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
