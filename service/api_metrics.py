"""The API's Prometheus metrics, in one registry per app (so tests can build several apps).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` durations, base units)
and carry a ``model`` label wherever a model is involved. Two families:

* ``normprop_api_*``: what this API process did (requests, predictions, ingest, snapshot loads,
  swaps, Redis reachability).
* ``normprop_served_*``: what users actually got, from delayed labels joined to served
  predictions; model-wide (shared counters in Redis, every replica reports the same figures).
* ``normprop_snapshot_*``: the training state recorded in the snapshot each model is *serving*
  (samples trained, prequential metrics, per-layer input mean/std), read from its JSON
  metadata at scrape time, so one scrape of the API shows what the served model is.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .serving import ServedVersion

__all__ = ["ApiMetrics", "ServedCollector", "SnapshotCollector", "layer_stats_summary"]

# Loopback predictions take ~1 ms; a slow scrape target or a cold load ~1 s.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
_SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Labels arrive from seconds (clicks) to days (chargebacks) after the prediction.
_DELAY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0,
                  7 * 86400.0)


class ApiMetrics:
    """Every metric the API exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "normprop_api_request_duration_seconds",
            "HTTP request latency from the first byte received to the last byte sent.",
            ["route", "method", "status", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.predictions = Counter(
            "normprop_api_predictions_total", "Instances predicted.", ["model"], registry=r)
        self.ingest_accepted = Counter(
            "normprop_api_ingest_accepted_total", "Samples accepted by POST /ingest and XADDed.",
            ["model"], registry=r)
        self.ingest_rejected = Counter(
            "normprop_api_ingest_rejected_total",
            "Samples refused by POST /ingest, by reason (a codec reason, 'backlog', "
            "'redis_unavailable', 'write_unconfirmed', 'idempotency_key_reused', 'request').",
            ["model", "reason"],
            registry=r)
        self.snapshot_load_failures = Counter(
            "normprop_api_snapshot_load_failures_total",
            "Snapshots that failed to read or validate and were not swapped in.",
            ["model"], registry=r)
        self.snapshot_loads = Counter(
            "normprop_api_snapshot_swaps_total", "Snapshots swapped in.", ["model"], registry=r)
        self.swap_seconds = Histogram(
            "normprop_api_snapshot_swap_seconds",
            "From a snapshot's publication (its created_at) to serving it.",
            ["model"], buckets=_SWAP_BUCKETS, registry=r)
        self.load_seconds = Histogram(
            "normprop_api_snapshot_load_seconds",
            "Reading, validating and folding one snapshot (off the event loop).",
            ["model"], buckets=_SWAP_BUCKETS, registry=r)
        self.redis_up = Gauge(
            "normprop_api_redis_up", "1 if the last Redis ping succeeded, else 0.", registry=r)
        # Delayed labels (service/routes_labels.py): what this process did.
        self.labels_joined = Counter(
            "normprop_api_labels_total",
            "Labels received by this process, by result (accepted, duplicate, unknown, "
            "invalid, backlog).", ["model", "result"], registry=r)
        self.label_delay = Histogram(
            "normprop_api_label_delay_seconds",
            "From serving a prediction to joining its label (labels joined by this process).",
            ["model"], buckets=_DELAY_BUCKETS, registry=r)
        self.labels_expired = Counter(
            "normprop_api_predictions_expired_total",
            "Predictions whose label_ttl_seconds passed unlabelled, swept by this process "
            "(the model-wide count is normprop_served_expired_total).", ["model"], registry=r)
        self.label_store_failures = Counter(
            "normprop_api_label_store_failures_total",
            "Predictions answered but not kept for labels (Redis unavailable).",
            ["model"], registry=r)
        self.snapshot_collector: SnapshotCollector | None = None
        self.served_collector: ServedCollector | None = None

    def watch_models(self, served: Callable[[], dict[str, ServedVersion | None]]) -> None:
        """Export the served snapshots' version, age and training metadata at scrape time."""
        self.snapshot_collector = SnapshotCollector(served)
        self.registry.register(self.snapshot_collector)

    def watch_served(self, served: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export model-wide served-prediction accuracy (shared in Redis) at scrape time."""
        self.served_collector = ServedCollector(served)
        self.registry.register(self.served_collector)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _total(value: Any) -> float | None:
    """A count, or the sum of a ``{reason: count}`` mapping."""
    if isinstance(value, dict):
        return sum(v for v in (_number(x) for x in value.values()) if v is not None)
    return _number(value)


def _mean(value: Any) -> float | None:
    """A scalar from a number or a list of numbers (per-unit statistics are averaged)."""
    if isinstance(value, list):
        nums = [v for v in (_number(x) for x in value) if v is not None]
        return sum(nums) / len(nums) if nums else None
    return _number(value)


def layer_stats_summary(layer_stats: Any) -> list[tuple[str, float | None, float | None]]:
    """``(layer, mean, std)`` from a snapshot's ``layer_stats``, whatever its exact shape.

    Accepts a list of ``{"name"|"layer", "mean", "std"}`` or a mapping ``name -> {mean, std}``;
    per-unit lists are averaged (the paper's fig. 2 plots these averages). Anything else is
    ignored rather than failing a scrape.
    """
    items: Iterable[tuple[str, Any]]
    if isinstance(layer_stats, dict):
        items = layer_stats.items()
    elif isinstance(layer_stats, list):
        items = ((str(s.get("name", s.get("layer", i))) if isinstance(s, dict) else str(i), s)
                 for i, s in enumerate(layer_stats))
    else:
        return []
    out = []
    for name, stats in items:
        if isinstance(stats, dict):
            mean = _mean(stats.get("mean", stats.get("input_mean")))
            std = _mean(stats.get("std", stats.get("input_std")))
            out.append((str(name), mean, std))
    return out


class SnapshotCollector(Collector):
    """Gauges and counters computed from each served version's metadata at scrape time."""

    def __init__(self, served: Callable[[], dict[str, ServedVersion | None]]) -> None:
        self._served = served

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        version = GaugeMetricFamily("normprop_api_snapshot_version",
                                    "Snapshot version this API serves (0: none yet).",
                                    labels=["model"])
        age = GaugeMetricFamily("normprop_api_snapshot_age_seconds",
                                "Seconds since the served snapshot was created.",
                                labels=["model"])
        samples = CounterMetricFamily("normprop_snapshot_samples_trained",
                                      "Samples the served snapshot was trained on.",
                                      labels=["model"])
        steps = CounterMetricFamily("normprop_snapshot_steps",
                                    "Optimiser steps behind the served snapshot.",
                                    labels=["model"])
        dead = CounterMetricFamily("normprop_snapshot_dead_letters",
                                   "Dead-lettered entries recorded in the served snapshot.",
                                   labels=["model"])
        skipped = CounterMetricFamily("normprop_snapshot_skipped_steps",
                                      "Non-finite steps skipped, recorded in the served snapshot.",
                                      labels=["model"])
        preq = {key: GaugeMetricFamily(f"normprop_snapshot_prequential_{key}",
                                       f"Prequential (test-then-train) {key.replace('_', ' ')} "
                                       "recorded in the served snapshot.", labels=["model"])
                for key in ("accuracy", "window_accuracy", "mae", "window_mae", "loss")}
        layer_mean = GaugeMetricFamily("normprop_snapshot_layer_input_mean",
                                       "Mean over units of each hidden layer's standardised input "
                                       "mean (NormProp keeps it near 0).", labels=["model", "layer"])
        layer_std = GaugeMetricFamily("normprop_snapshot_layer_input_std",
                                      "Mean over units of each hidden layer's standardised input "
                                      "std (NormProp keeps it near 1).", labels=["model", "layer"])
        for model, served in self._served().items():
            if served is None:
                version.add_metric([model], 0)
                continue
            meta = served.metadata
            version.add_metric([model], served.version)
            created = _number(meta.get("created_at"))
            if created is not None:
                age.add_metric([model], max(0.0, now - created))
            for family, key in ((samples, "samples_trained"), (steps, "steps"),
                                (skipped, "skipped_steps"), (dead, "dead_letters")):
                v = _total(meta.get(key))
                if v is not None:
                    family.add_metric([model], v)
            prequential = meta.get("prequential")
            if isinstance(prequential, dict):
                for key, family in preq.items():
                    v = _number(prequential.get(key))
                    if v is not None:
                        family.add_metric([model], v)
            for layer, mean, std in layer_stats_summary(meta.get("layer_stats")):
                if mean is not None:
                    layer_mean.add_metric([model, layer], mean)
                if std is not None:
                    layer_std.add_metric([model, layer], std)
        yield version
        yield age
        yield samples
        yield steps
        yield dead
        yield skipped
        yield from preq.values()
        yield layer_mean
        yield layer_std


class ServedCollector(Collector):
    """Served-prediction accuracy per model from the cached Redis counters (``read_served``)."""

    def __init__(self, served: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._served = served

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counters = {key: CounterMetricFamily(f"normprop_served_{key}", doc, labels=["model"])
                    for key, doc in (
                        ("labelled", "Served predictions joined to their label (model-wide)."),
                        ("correct", "Labelled classification predictions that were right."),
                        ("expired", "Served predictions whose label never came within "
                                    "label_ttl_seconds."))}
        pending = GaugeMetricFamily("normprop_served_pending",
                                    "Served predictions still awaiting a label.", labels=["model"])
        gauges = {key: GaugeMetricFamily(f"normprop_served_{key}", doc, labels=["model", "scope"])
                  for key, doc in (
                      ("accuracy", "Accuracy of the predictions users got, against the labels "
                                   "that came later; scope total or window."),
                      ("log_loss", "Log-loss of the served class probabilities; scope total or "
                                   "window."),
                      ("mae", "Mean absolute error of served regression values; scope total or "
                              "window."))}
        classification = {"accuracy", "log_loss"}
        for model, stats in self._served().items():
            for key, family in counters.items():
                family.add_metric([model], float(stats.get(key, 0)))
            pending.add_metric([model], float(stats.get("pending", 0)))
            regression = stats.get("task") == "regression"
            for key, family in gauges.items():
                if (key in classification) == regression:
                    continue
                for scope, field in (("total", key), ("window", f"window_{key}")):
                    v = _number(stats.get(field))
                    if v is not None:
                        family.add_metric([model, scope], v)
        yield from counters.values()
        yield pending
        yield from gauges.values()
