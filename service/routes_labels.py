"""Delayed labels: ``POST /predict`` remembers what it served, ``POST /label`` joins the label.

The online-learning loop as users live it: a prediction is served now, its true label arrives
later (a chargeback, a click, a sensor reading), and only then can the sample be trained on.
For a model with ``label_ttl_seconds`` set:

1. ``POST /predict`` stores, per instance, a hash ``np:{model}:pred:{id}`` (features as float32
   bytes, the answering version, the prediction, its outputs, the time) that expires after the
   TTL, and adds the id to the sorted set ``np:{model}:pending`` scored by that expiry (ms, the
   Redis server's clock, the same instant the key expires at). The id is the caller's or a new
   random one, returned with the prediction.
2. ``POST /label`` validates ``y`` with the stream codec, then runs :data:`LABEL_SCRIPT`, which
   atomically checks the stored prediction, XADDs the joined sample to ``np:{model}:samples``
   (the ingest path: same entry format, same backlog bound), deletes the prediction, leaves a
   tombstone ``np:{model}:labelled:{id}`` holding the stream entry ID for another TTL, removes
   the id from the pending set and updates the model-wide served-accuracy counters. Because the
   whole join is one script, two API replicas can never both enqueue a sample: the second sees
   the tombstone (409) or nothing (404, unknown or expired).
3. Every replica runs :data:`SWEEP_SCRIPT` each second: ids whose expiry score is below the
   server's time left the pending set unlabelled; they are removed and counted as expired in
   the same script, so each prediction ends exactly once, labelled or expired, whichever
   replica sees it.

Served accuracy (what users actually got, beside the worker's test-then-train accuracy) is
computed from the shared hash ``np:{model}:served`` and the capped list
``np:{model}:served:window`` (the last :data:`SERVED_WINDOW` labelled predictions), so every
replica reports the same model-wide figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from redis.exceptions import NoScriptError, RedisError
from starlette.responses import Response

from . import keys
from .codec import DecodeError
from .routes_common import (BODY_ERRORS, ApiError, ApiState, ErrorBody, api_state,
                            error_responses, find_slot, inline_schema, json_response,
                            read_json_object, require_key)
from .serving import ModelSlot, ServedVersion
from .settings import label_key

__all__ = ["SERVED_WINDOW", "store_predictions", "read_served", "refresh_served",
           "watch_labels", "router"]

log = logging.getLogger("normprop.api")
router = APIRouter(tags=["labels"])

#: Labelled predictions in the sliding-window served metrics.
SERVED_WINDOW = 1000
#: Longest prediction id accepted (it is part of a Redis key).
MAX_ID_LENGTH = 200
#: Expired ids removed per sweep script call (several calls per sweep when more are due).
SWEEP_BATCH = 1000
SWEEP_SECONDS = 1.0
_EPS = 1e-15

#: KEYS: pending set, then (prediction, tombstone) per instance. ARGV: ttl_ms, version, then
#: (id, token, x, prediction, outputs) per instance. Returns 0, or the 1-based index of the
#: first id already pending or labelled (nothing stored then).
STORE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + tonumber(ARGV[1])
local n = (#KEYS - 1) / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 * i], KEYS[2 * i + 1]) > 0 then return i end
end
for i = 1, n do
  local a = 3 + (i - 1) * 5
  redis.call('HSET', KEYS[2 * i], 't', ARGV[a + 1], 'x', ARGV[a + 2], 'v', ARGV[2],
             'p', ARGV[a + 3], 'o', ARGV[a + 4], 'at', now)
  redis.call('PEXPIREAT', KEYS[2 * i], expires)
  redis.call('ZADD', KEYS[1], expires, ARGV[a])
end
return 0
"""

#: KEYS: prediction, tombstone, pending set, samples stream, served totals, served window.
#: ARGV: id, token, tombstone ttl ms, max backlog, window size, correct (0/1), log-loss,
#: absolute error, then the stream entry's fields. Returns {status, stream id, delay ms}.
LABEL_SCRIPT = """
local token = redis.call('HGET', KEYS[1], 't')
if not token then
  local sid = redis.call('GET', KEYS[2])
  if sid then return {'labelled', sid, ''} end
  return {'unknown', '', ''}
end
if token ~= ARGV[2] then return {'changed', '', ''} end
if redis.call('XLEN', KEYS[4]) + 1 > tonumber(ARGV[4]) then return {'backlog', '', ''} end
local at = tonumber(redis.call('HGET', KEYS[1], 'at'))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sid = redis.call('XADD', KEYS[4], '*', unpack(ARGV, 9))
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], sid, 'PX', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'labelled', 1)
redis.call('HINCRBY', KEYS[5], 'correct', ARGV[6])
redis.call('HINCRBYFLOAT', KEYS[5], 'log_loss', ARGV[7])
redis.call('HINCRBYFLOAT', KEYS[5], 'abs_error', ARGV[8])
redis.call('HINCRBYFLOAT', KEYS[5], 'delay_ms', now - at)
redis.call('LPUSH', KEYS[6], ARGV[6] .. ' ' .. ARGV[7] .. ' ' .. ARGV[8])
redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[5]) - 1)
return {'ok', sid, tostring(now - at)}
"""

#: KEYS: pending set, served totals. ARGV: batch. Ids whose expiry is strictly before now:
#: their prediction key is gone (Redis expires a key once now > its PEXPIREAT time).
SWEEP_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('HINCRBY', KEYS[2], 'expired', #ids)
end
return #ids
"""


class LabelItem(BaseModel):
    id: str = Field(..., description="the id /predict returned (or that you sent with it)")
    y: int | float | str | list[float] = Field(..., description="class index (your own label for "
                                               "a model with classes/open_classes), or "
                                               "regression target(s)")


class LabelRequest(BaseModel):
    model: str = Field("default", description="a declared model's name")
    labels: list[LabelItem] = Field(..., description="at most NP_MAX_INSTANCES labels")


class LabelResult(BaseModel):
    id: Any
    status: int = Field(..., description="202 joined and enqueued; 404 unknown or expired id; "
                        "409 already labelled; 422 bad label; 429 backlog full")
    result: str = Field(..., description="'accepted' or an error code")
    message: str | None = None
    stream_id: str | None = Field(None, description="the training stream entry")
    version: int | None = Field(None, description="the version that served the prediction")
    correct: bool | None = Field(None, description="classification: was the prediction right")
    delay_seconds: float | None = Field(None, description="from prediction to label")


class LabelResponse(BaseModel):
    model: str
    accepted: int
    results: list[LabelResult]


# -- predict side -------------------------------------------------------------------------
def prediction_ids(body: dict[str, Any], n: int) -> list[str]:
    """The request's ``ids`` (validated) or ``n`` new random ones."""
    given = body.get("ids")
    if given is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if not isinstance(given, list) or len(given) != n:
        raise ApiError(422, "bad_ids", f"'ids' must be a list of {n} strings, one per instance")
    for i, v in enumerate(given):
        if not isinstance(v, str) or not 0 < len(v) <= MAX_ID_LENGTH:
            raise ApiError(422, "bad_ids", f"ids[{i}] must be a string of 1 to "
                                           f"{MAX_ID_LENGTH} characters", index=i)
    if len(set(given)) != n:
        raise ApiError(422, "bad_ids", "'ids' must be unique within a request")
    return given


async def store_predictions(state: ApiState, slot: ModelSlot, served: ServedVersion,
                            x: np.ndarray, out: np.ndarray, ids: list[str]) -> bool:
    """Keep what was served for ``label_ttl_seconds`` (one script call); False if Redis is
    unavailable (the predictions are still answered, they just cannot be labelled)."""
    ttl = slot.config.label_ttl_seconds
    assert ttl is not None
    if state.redis is None or not state.redis_ok:
        state.metrics.label_store_failures.labels(slot.name).inc(len(ids))
        return False
    model = slot.name
    keys_: list[str] = [keys.pending_predictions(model)]
    argv: list[Any] = [int(ttl * 1000), served.version]
    classification = slot.config.task == "classification"
    x32 = np.ascontiguousarray(x, dtype="<f4")
    out32 = np.ascontiguousarray(out, dtype="<f4")
    label_map = served.label_map
    for i, pid in enumerate(ids):
        keys_ += [keys.prediction_key(model, pid), keys.labelled_key(model, pid)]
        if not classification:
            predicted: Any = ""
        elif label_map is not None:  # the user's label, as JSON (outputs in label_map order)
            predicted = json.dumps(label_map[int(out32[i].argmax())]) if label_map else "null"
        else:
            predicted = int(out32[i].argmax())
        argv += [pid, uuid.uuid4().hex, x32[i].tobytes(), predicted, out32[i].tobytes()]
    try:
        clash = await _run_script(state, STORE_SCRIPT, keys_, argv)
    except (RedisError, OSError) as exc:
        log.warning("model %r: predictions not stored for labels: %s", model, exc)
        state.metrics.label_store_failures.labels(model).inc(len(ids))
        return False
    if clash:
        i = int(clash) - 1
        raise ApiError(409, "duplicate_id", f"id {ids[i][:80]!r} (instance {i}) is already "
                       "awaiting a label or was labelled; use a new id", index=i)
    return True


_SHAS: dict[str, str] = {}


async def _run_script(state: ApiState, script: str, keys_: list[str], argv: list[Any]) -> Any:
    """EVALSHA, loading the script on first use (and again after a Redis restart)."""
    assert state.redis is not None
    sha = _SHAS.get(script)
    if sha is not None:
        try:
            return await state.redis.evalsha(sha, len(keys_), *keys_, *argv)
        except NoScriptError:
            pass
    _SHAS[script] = await state.redis.script_load(script)
    return await state.redis.evalsha(_SHAS[script], len(keys_), *keys_, *argv)


# -- label side ---------------------------------------------------------------------------
def _score(slot: ModelSlot, stored: dict[bytes, bytes], y: Any) -> tuple[int, float, float]:
    """(correct, log-loss, absolute error) of the stored prediction against label ``y``."""
    outputs = np.frombuffer(stored[b"o"], dtype="<f4")
    served = slot.current
    if slot.config.task == "classification" and served is not None \
            and served.label_map is not None:
        # Outputs are in the answering version's label order; an open set's map only grows
        # (labels keep their unit), so the current map gives the label's position.
        keys_map = [label_key(v) for v in served.label_map]
        idx = keys_map.index(label_key(y)) if label_key(y) in keys_map else len(outputs)
        p = float(outputs[idx]) if idx < len(outputs) else 0.0
        predicted = json.loads(stored[b"p"]) if stored[b"p"] else None
        correct = int(predicted is not None and label_key(predicted) == label_key(y))
        return correct, -math.log(max(p, _EPS)), 0.0
    if slot.config.task == "classification":
        p = float(outputs[int(y)])
        correct = int(int(stored[b"p"]) == int(y))
        return correct, -math.log(max(p, _EPS)), 0.0
    err = float(np.abs(outputs.astype(np.float64) - np.asarray(y, dtype=np.float64)).mean())
    return 0, 0.0, err


def _error(pid: Any, status: int, code: str, message: str) -> dict[str, Any]:
    return {"id": pid, "status": status, "result": code, "message": message}


def _join_call(state: ApiState, slot: ModelSlot, pid: str, y: Any,
               stored: dict[bytes, bytes]) -> tuple[list[str], list[Any], int]:
    """KEYS and ARGV of :data:`LABEL_SCRIPT` for one label whose prediction read as
    ``stored`` (empty: the script only reports 409 or 404), and whether it was correct."""
    model = slot.name
    ttl = slot.config.label_ttl_seconds or 0.0
    token, correct, loss, err = "", 0, 0.0, 0.0
    fields: dict[str, bytes] = {"y": b"0"}  # never written without a token
    if stored:
        correct, loss, err = _score(slot, stored, y)
        x = np.frombuffer(stored[b"x"], dtype="<f4")
        token = stored[b"t"].decode()
        fields = slot.codec.encode(x, y, binary=True, sample_id=pid)
    argv: list[Any] = [pid, token, max(1000, int(ttl * 1000)), state.settings.max_backlog,
                       SERVED_WINDOW, correct, repr(loss), repr(err)]
    for k, v in fields.items():
        argv += [k, v]
    keys_ = [keys.prediction_key(model, pid), keys.labelled_key(model, pid),
             keys.pending_predictions(model), keys.samples_stream(model),
             keys.served_totals(model), keys.served_window(model)]
    return keys_, argv, correct


async def _run_scripts(state: ApiState, script: str,
                       calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    """Many calls of one script in one pipelined round trip (each call atomic on its own)."""
    assert state.redis is not None
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        sha = _SHAS.get(script)
        if sha is None or attempt:
            sha = _SHAS[script] = await state.redis.script_load(script)
        async with state.redis.pipeline(transaction=False) as pipe:
            for i in todo:
                keys_, argv = calls[i]
                pipe.evalsha(sha, len(keys_), *keys_, *argv)
            out = await pipe.execute(raise_on_error=False)
        missing = []
        for i, r in zip(todo, out):
            if isinstance(r, NoScriptError):  # Redis restarted: load it and run those again
                missing.append(i)
            elif isinstance(r, Exception):
                raise r
            else:
                results[i] = r
        if not missing:
            break
        todo = missing
    else:
        raise NoScriptError("the label script could not be loaded")
    return results


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _join_all(state: ApiState, slot: ModelSlot, todo: list[tuple[int, str, Any]]
                    ) -> list[dict[str, Any]]:
    """Join every label in one read and one script round trip; per-item results."""
    assert state.redis is not None
    model = slot.name
    async with state.redis.pipeline(transaction=False) as pipe:
        for _, pid, _ in todo:
            pipe.hgetall(keys.prediction_key(model, pid))
        stored: list[dict[bytes, bytes]] = await pipe.execute()
    calls = [_join_call(state, slot, pid, y, s) for (_, pid, y), s in zip(todo, stored)]
    replies = await _run_scripts(state, LABEL_SCRIPT, [(k, a) for k, a, _ in calls])
    for j, reply in enumerate(replies):
        for _ in range(3):  # stored again under the same id between our read and the join
            if _text(reply[0]) != "changed":
                break
            _, pid, y = todo[j]
            stored[j] = await state.redis.hgetall(keys.prediction_key(model, pid))
            calls[j] = _join_call(state, slot, pid, y, stored[j])
            reply = (await _run_scripts(state, LABEL_SCRIPT, [calls[j][:2]]))[0]
        replies[j] = reply
    return [_result(state, slot, pid, stored[j], calls[j][2], replies[j])
            for j, (_, pid, _) in enumerate(todo)]


def _result(state: ApiState, slot: ModelSlot, pid: str, stored: dict[bytes, bytes],
            correct: int, reply: Any) -> dict[str, Any]:
    status, sid, delay = (_text(v) for v in reply)
    model = slot.name
    m = state.metrics
    if status == "ok":
        delay_s = int(delay) / 1000.0
        m.labels_joined.labels(model, "accepted").inc()
        m.label_delay.labels(model).observe(delay_s)
        out: dict[str, Any] = {"id": pid, "status": 202, "result": "accepted", "stream_id": sid,
                               "version": int(stored[b"v"]), "delay_seconds": delay_s}
        if slot.config.task == "classification":
            out["correct"] = bool(correct)
        return out
    if status == "labelled":
        m.labels_joined.labels(model, "duplicate").inc()
        return _error(pid, 409, "already_labelled", f"id {pid[:80]!r} was already labelled "
                      f"(stream entry {sid}); nothing was added")
    if status == "backlog":
        m.labels_joined.labels(model, "backlog").inc()
        return _error(pid, 429, "backlog_full", "the training stream's backlog is full; the "
                      "prediction is kept, retry later")
    m.labels_joined.labels(model, "unknown").inc()
    ttl = slot.config.label_ttl_seconds or 0.0
    return _error(pid, 404, "unknown_id", f"no prediction {pid[:80]!r} awaits a label: never "
                  f"made, or older than label_ttl_seconds={ttl:g} (expired)")


def _label_responses() -> dict[int | str, dict[str, Any]]:
    """The error statuses, and those that are every item's common status (a LabelResponse)."""
    out = error_responses(*BODY_ERRORS, 401, 403, 404, 409, 429, 503, descriptions={
        400: "malformed JSON, or the model has no label_ttl_seconds",
        401: "the ingest API key is missing", 403: "the ingest API key is wrong",
        404: "unknown model (an error), or every id unknown or expired (the results)",
        409: "every id already labelled (the results)",
        422: "a bad request (an error), or every label invalid (the results)",
        429: "every item found the backlog full (the results); retry after Retry-After",
        503: "Redis unavailable; nothing was labelled, retry after Retry-After"})
    for status in (404, 409, 422, 429):
        out[status]["model"] = ErrorBody | LabelResponse
    out[207] = {"model": LabelResponse, "description": "per-item results differ (see each "
                                                       "item's status)"}
    return out


@router.post("/label", status_code=202, response_model=LabelResponse,
             summary="Join delayed labels to stored predictions and train on them",
             response_description="every label joined and enqueued",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": inline_schema(LabelRequest.model_json_schema())}}}},
             responses=_label_responses())
async def label(request: Request) -> Response:
    """Per item: 202 joined (the sample is on the training stream), 404 unknown or expired id,
    409 already labelled, 422 bad label, 429 backlog full. The response status is the items'
    common status, or 207 when they differ."""
    state = api_state(request)
    require_key(request, "ingest")
    body, _ = await read_json_object(request)
    slot = find_slot(request, body.get("model"))
    if slot.config.label_ttl_seconds is None:
        raise ApiError(400, "labels_disabled", f"model {slot.name!r} keeps no predictions for "
                       "labels; set label_ttl_seconds in its configuration")
    items = body.get("labels")
    if not isinstance(items, list) or not items:
        raise ApiError(422, "bad_request", "'labels' must be a non-empty list of "
                                           "{\"id\": ..., \"y\": ...} objects")
    if len(items) > state.settings.max_instances:
        raise ApiError(422, "too_many_labels", f"{len(items)} labels; at most "
                       f"{state.settings.max_instances} per request")
    if state.redis is None or not state.redis_ok:
        raise ApiError(503, "redis_unavailable", "predictions are kept in Redis, which is "
                       "unavailable; nothing was labelled, retry later",
                       headers={"Retry-After": "1"})
    results: list[dict[str, Any] | None] = [None] * len(items)
    todo: list[tuple[int, str, Any]] = []
    for i, item in enumerate(items):
        pid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(pid, str) or not pid \
                or len(pid) > MAX_ID_LENGTH or "y" not in item:
            results[i] = _error(pid, 422, "bad_request", f"labels[{i}] must be "
                                "{\"id\": <string>, \"y\": <label>}")
            continue
        try:
            y = slot.codec.validate_y(item["y"])
        except DecodeError as exc:
            results[i] = _error(pid, 422, exc.reason, f"labels[{i}]: {exc.detail}")
            continue
        todo.append((i, pid, y.tolist() if isinstance(y, np.ndarray) else y))
    if todo:
        try:
            joined = await _join_all(state, slot, todo)
        except (RedisError, OSError) as exc:
            raise ApiError(503, "redis_unavailable", f"Redis failed ({type(exc).__name__}); "
                           "labels already joined stay joined, retrying the rest is safe",
                           headers={"Retry-After": "1"}) from None
        for (i, _, _), res in zip(todo, joined):
            results[i] = res
    for r in results:
        assert r is not None
        if r["status"] == 422:
            state.metrics.labels_joined.labels(slot.name, "invalid").inc()
    statuses = {r["status"] for r in results if r is not None}
    status = statuses.pop() if len(statuses) == 1 else 207
    accepted = sum(1 for r in results if r is not None and r["status"] == 202)
    return json_response({"model": slot.name, "accepted": accepted, "results": results}, status,
                         {"Retry-After": "1"} if status == 429 else None)


# -- shared served metrics ------------------------------------------------------------------
async def read_served(state: ApiState, model: str) -> dict[str, Any]:
    """Model-wide served-prediction metrics from Redis (the same in every replica)."""
    assert state.redis is not None
    async with state.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.served_totals(model))
        pipe.lrange(keys.served_window(model), 0, SERVED_WINDOW - 1)
        pipe.zcard(keys.pending_predictions(model))
        totals_raw, window_raw, pending = await pipe.execute()
    totals = {k.decode(): float(v) for k, v in totals_raw.items()}
    n = int(totals.get("labelled", 0))
    rows = [tuple(float(v) for v in w.split()) for w in window_raw]
    w = len(rows)
    out: dict[str, Any] = {
        "labelled": n, "correct": int(totals.get("correct", 0)),
        "expired": int(totals.get("expired", 0)), "pending": int(pending), "window": w,
        "accuracy": totals.get("correct", 0) / n if n else None,
        "log_loss": totals.get("log_loss", 0.0) / n if n else None,
        "mae": totals.get("abs_error", 0.0) / n if n else None,
        "mean_delay_seconds": totals.get("delay_ms", 0.0) / n / 1000 if n else None,
        "window_accuracy": sum(r[0] for r in rows) / w if w else None,
        "window_log_loss": sum(r[1] for r in rows) / w if w else None,
        "window_mae": sum(r[2] for r in rows) / w if w else None,
    }
    return out


async def refresh_served(state: ApiState) -> None:
    """Re-read every label-enabled model's served metrics into ``state.served``."""
    if state.redis is None or not state.redis_ok:
        return
    for slot in state.server.slots.values():
        if slot.config.label_ttl_seconds is None:
            continue
        try:
            stats = await asyncio.wait_for(read_served(state, slot.name), 1.0)
            state.served[slot.name] = {**stats, "task": slot.config.task}
        except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("served metrics of %r not refreshed: %s", slot.name, exc)


async def sweep_expired(state: ApiState) -> int:
    """Count (once, model-wide) predictions whose TTL passed unlabelled."""
    swept = 0
    for slot in state.server.slots.values():
        if slot.config.label_ttl_seconds is None:
            continue
        while True:
            n = int(await _run_script(state, SWEEP_SCRIPT,
                                      [keys.pending_predictions(slot.name),
                                       keys.served_totals(slot.name)], [SWEEP_BATCH]))
            if n:
                state.metrics.labels_expired.labels(slot.name).inc(n)
            swept += n
            if n < SWEEP_BATCH:
                break
    return swept


async def watch_labels(state: ApiState) -> None:
    """Every second: sweep expired predictions, refresh the shared served metrics."""
    if not any(s.config.label_ttl_seconds for s in state.server.slots.values()):
        return
    while True:
        if state.redis is not None and state.redis_ok:
            try:
                await sweep_expired(state)
            except (RedisError, OSError) as exc:
                log.debug("expiry sweep failed: %s", exc)
            await refresh_served(state)
        await asyncio.sleep(SWEEP_SECONDS)
