"""The API's Prometheus metrics, in one registry per app (so tests can build several apps).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` durations, base units)
and carry a ``model`` label wherever a model is involved. Two families:

* ``normprop_api_*``: what this API process did (requests, predictions, ingest, snapshot loads,
  swaps, Redis reachability).
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

__all__ = ["ApiMetrics", "SnapshotCollector", "layer_stats_summary"]

# Loopback predictions take ~1 ms; a slow scrape target or a cold load ~1 s.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
_SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
            "'redis_unavailable', 'request').", ["model", "reason"], registry=r)
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
        self.snapshot_collector: SnapshotCollector | None = None

    def watch_models(self, served: Callable[[], dict[str, ServedVersion | None]]) -> None:
        """Export the served snapshots' version, age and training metadata at scrape time."""
        self.snapshot_collector = SnapshotCollector(served)
        self.registry.register(self.snapshot_collector)


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
