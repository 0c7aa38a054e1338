"""The live dashboard: ``GET /dashboard`` (one static page) polling ``GET /dashboard/data``.

Nothing is built and nothing is fetched from the internet: ``service/static/dashboard.html``,
``dashboard.js`` and ``dashboard.css`` are served by the app itself and draw their charts as
SVG with a few dozen lines of vanilla JavaScript.

The page polls one JSON endpoint. Its data is a bounded history (``NP_DASHBOARD_HISTORY``
points, one every ``NP_DASHBOARD_SAMPLE_SECONDS``) kept in this API process by
:func:`watch_dashboard`, which samples per model:

* from the served snapshot's metadata: version, age, pin, samples trained, test-then-train
  (prequential) accuracy or MAE, loss, per-layer input mean/std (the paper's fig. 2, live);
  between two versions, samples/s trained and the mean batch (samples per step);
* from Redis: stream lag (XINFO GROUPS ``lag``, else the stream length), dead letters by
  reason (the worker's exact counts hash), the model-wide served accuracy of delayed labels;
* optionally, from the worker's ``/metrics`` (``NP_DASHBOARD_WORKER_METRICS_URL``): the exact
  batch-size histogram.

The history lives in one process: each replica has its own, starting when it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import httpx
from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from . import keys
from .api_metrics import layer_stats_summary
from .routes_common import ApiState, api_state, json_response
from .routes_labels import refresh_served

__all__ = ["DashboardHistory", "sample_once", "watch_dashboard", "router"]

log = logging.getLogger("normprop.api")
router = APIRouter(tags=["dashboard"])

_STATIC = {"dashboard.js": "text/javascript; charset=utf-8",
           "dashboard.css": "text/css; charset=utf-8"}


def _static(name: str) -> bytes:
    return resources.files("service").joinpath("static", name).read_bytes()


@dataclass
class ModelHistory:
    """One model's time series (parallel deques) and what the last sample needs to diff."""

    maxlen: int
    series: dict[str, deque[Any]] = field(default_factory=dict)
    layers: dict[str, dict[str, deque[Any]]] = field(default_factory=dict)
    latest: dict[str, Any] = field(default_factory=dict)
    #: (version, created_at, samples_trained, steps) of the last two distinct versions.
    versions: deque[tuple[int, float, float, float]] = field(
        default_factory=lambda: deque(maxlen=2))
    #: Cumulative worker batch-size histogram at the first scrape (the mix is since then).
    batch_base: dict[str, float] | None = None

    def add(self, point: dict[str, Any], layers: dict[str, tuple[Any, Any]]) -> None:
        n = len(self.series.get("t", ()))
        for key, value in point.items():
            column = self.series.setdefault(key, deque([None] * n, maxlen=self.maxlen))
            column.append(value)
        for key, column in self.series.items():
            if key not in point:
                column.append(None)
        for name, (mean, std) in layers.items():
            entry = self.layers.setdefault(name, {
                "mean": deque([None] * n, maxlen=self.maxlen),
                "std": deque([None] * n, maxlen=self.maxlen)})
            entry["mean"].append(mean)
            entry["std"].append(std)
        for name, entry in self.layers.items():
            if name not in layers:
                entry["mean"].append(None)
                entry["std"].append(None)


class DashboardHistory:
    """Every model's :class:`ModelHistory` in this API process."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.models: dict[str, ModelHistory] = {}

    def model(self, name: str) -> ModelHistory:
        if name not in self.models:
            self.models[name] = ModelHistory(self.maxlen)
        return self.models[name]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


async def _redis_view(state: ApiState, model: str) -> dict[str, Any]:
    """Stream lag and dead letters by reason; {} while Redis is unavailable."""
    if state.redis is None or not state.redis_ok:
        return {}
    try:
        async with state.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.samples_stream(model))
            pipe.hgetall(keys.dead_letter_counts(model))
            length, dead = await pipe.execute()
        try:
            groups = await state.redis.xinfo_groups(keys.samples_stream(model))
        except RedisError:  # no stream or group yet
            groups = []
        lag = None
        for g in groups:
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == keys.CONSUMER_GROUP:
                lag = g.get("lag")
        return {"lag": int(lag) if lag is not None else int(length), "stream_length": int(length),
                "dead_letters": {k.decode(): int(v) for k, v in dead.items()}}
    except (RedisError, OSError) as exc:
        log.debug("dashboard: Redis view of %r failed: %s", model, exc)
        return {}


async def _worker_batches(state: ApiState, client: httpx.AsyncClient | None
                          ) -> dict[str, dict[str, float]]:
    """``model -> {le: cumulative count}`` from the worker's batch-size histogram."""
    url = state.settings.dashboard_worker_metrics_url
    if not url or client is None:
        return {}
    try:
        text = (await client.get(url)).text
    except httpx.HTTPError:
        return {}
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "normprop_worker_batch_size_bucket":
                    out.setdefault(s.labels.get("model", ""), {})[s.labels["le"]] = s.value
    except ValueError:
        return {}
    return out


def _batch_mix(history: ModelHistory, cumulative: dict[str, float]) -> list[dict[str, Any]]:
    """Steps per batch-size bucket since the first scrape (from cumulative ``le`` counts)."""
    if history.batch_base is None:
        history.batch_base = dict(cumulative)
    def le(k: str) -> float:
        return float("inf") if k == "+Inf" else float(k)
    mix, below = [], 0.0
    for k in sorted(cumulative, key=le):
        count = cumulative[k] - history.batch_base.get(k, 0.0)
        label = k if k == "+Inf" else f"{le(k):g}"
        mix.append({"le": label, "steps": max(0.0, count - below)})
        below = max(below, count)
    while mix and mix[-1]["steps"] == 0:  # buckets above the largest batch seen
        mix.pop()
    return mix


async def sample_once(state: ApiState, history: DashboardHistory,
                      client: httpx.AsyncClient | None = None) -> None:
    """Append one point per model to ``history``."""
    now = time.time()
    await refresh_served(state)
    batches = await _worker_batches(state, client)
    for name, slot in state.server.slots.items():
        h = history.model(name)
        served = slot.current
        meta = served.metadata if served is not None else {}
        point: dict[str, Any] = {"t": round(now, 3)}
        latest: dict[str, Any] = {"name": name, "task": slot.config.task,
                                  "labels_enabled": slot.config.label_ttl_seconds is not None,
                                  "last_error": slot.last_error}
        if served is not None:
            created = _num(meta.get("created_at"))
            samples = _num(meta.get("samples_trained"))
            steps = _num(meta.get("steps"))
            point.update(version=served.version, samples_trained=samples,
                         snapshot_age=round(now - created, 3) if created else None)
            if created is not None and samples is not None and steps is not None and (
                    not h.versions or h.versions[-1][0] != served.version):
                h.versions.append((served.version, created, samples, steps))
            if len(h.versions) == 2:
                (_, c0, s0, k0), (_, c1, s1, k1) = h.versions
                if c1 > c0 and s1 >= s0:
                    point["samples_per_second"] = round((s1 - s0) / (c1 - c0), 2)
                if k1 > k0 and s1 >= s0:
                    point["mean_batch"] = round((s1 - s0) / (k1 - k0), 3)
            preq = meta.get("prequential") if isinstance(meta.get("prequential"), dict) else {}
            for key in ("accuracy", "window_accuracy", "mae", "window_mae", "loss"):
                if _num(preq.get(key)) is not None:
                    point[f"prequential_{key}"] = preq[key]
            latest.update(version=served.version, pinned=served.pinned,
                          created_at=created, samples_trained=samples,
                          dead_letters=meta.get("dead_letters") or {})
        stats = state.served.get(name)
        if stats:
            for key in ("accuracy", "window_accuracy", "log_loss", "window_log_loss", "mae",
                        "window_mae"):
                if stats.get(key) is not None:
                    point[f"served_{key}"] = stats[key]
            latest["served"] = {k: stats.get(k) for k in
                                ("labelled", "correct", "expired", "pending",
                                 "mean_delay_seconds")}
        view = await _redis_view(state, name)
        if "lag" in view:
            point["lag"] = view["lag"]
            latest["dead_letters"] = view["dead_letters"]
        if name in batches:
            latest["batch_mix"] = _batch_mix(h, batches[name])
            latest["batch_mix_source"] = "worker"
        layers = {layer: (mean, std) for layer, mean, std in
                  layer_stats_summary(meta.get("layer_stats"))}
        h.add(point, layers)
        h.latest = latest


async def watch_dashboard(state: ApiState, history: DashboardHistory) -> None:
    """Sample every ``dashboard_sample_seconds`` until cancelled."""
    async with httpx.AsyncClient(timeout=0.5) as client:
        while True:
            try:
                await sample_once(state, history, client)
            except Exception:  # noqa: BLE001 - the dashboard must never take serving down
                log.exception("dashboard sample failed")
            await asyncio.sleep(state.settings.dashboard_sample_seconds)


def _history(request: Request) -> DashboardHistory:
    return request.app.state.np_dashboard  # type: ignore[no-any-return]


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return Response(_static("dashboard.html"), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def dashboard_static(name: str) -> Response:
    if name not in _STATIC:
        return json_response({"error": "not_found", "message": "no such file"}, 404)
    return Response(_static(name), media_type=_STATIC[name],
                    headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/data", summary="The dashboard's time series, per model")
async def dashboard_data(request: Request) -> Response:
    """Per model: the latest state and a bounded history of every series the page draws."""
    history = _history(request)
    state = api_state(request)
    models = {}
    for name in state.server.slots:
        h = history.model(name)
        models[name] = {
            **h.latest,
            "series": {k: list(v) for k, v in h.series.items()},
            "layers": {layer: {k: list(v) for k, v in d.items()} for layer, d in h.layers.items()},
        }
    return json_response({"now": time.time(), "sample_seconds":
                          state.settings.dashboard_sample_seconds, "models": models})
