"""``POST /ingest``: validate a batch of samples with the stream codec, then XADD them all.

All or nothing: every sample is validated before anything is written (a bad one answers 422
naming its index and reason), and the XADDs go in one MULTI/EXEC pipeline, so a request either
enters the stream whole or not at all, in one round trip. The stream is never trimmed here
(DESIGN section 3): past ``max_backlog`` untrained entries ingest answers 429 instead.

With an ``Idempotency-Key`` header the XADDs and a record of them (the samples' digest and the
entry IDs, kept ``NP_INGEST_IDEMPOTENCY_TTL_SECONDS``) go in one Lua script instead: a retry
with the same key -- after a 503 ``write_unconfirmed`` or a lost connection -- finds the record
and gets the first answer's IDs (``"replayed": true``), so the samples enter the stream once.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.responses import Response

from . import keys
from .codec import DecodeError, EntryCodec
from .routes_common import (BODY_ERRORS, ApiError, ApiState, Features, api_state,
                            error_responses, find_slot, inline_schema, json_response,
                            read_json_object, require_key)

router = APIRouter(tags=["ingest"])

#: Retry-After (seconds) when Redis is unreachable or the backlog is full.
RETRY_AFTER_SECONDS = 1


class IngestSample(BaseModel):
    x: Features = Field(..., description="num_features numbers (nested allowed for images)")
    y: int | float | str | list[float] = Field(..., description="class index (your own label "
                                               "for a model with classes/open_classes), or "
                                               "regression target(s)")
    id: str | None = Field(None, description="your own id for the sample (kept in dead letters)")


class IngestRequest(BaseModel):
    model: str = Field("default", description="a declared model's name")
    samples: list[IngestSample] = Field(..., description="at most NP_MAX_INSTANCES samples")


class IngestResponse(BaseModel):
    model: str
    accepted: int
    ids: list[str] = Field(..., description="the stream entry IDs, in the order sent")
    replayed: bool = Field(False, description="true when an earlier request with the same "
                                              "Idempotency-Key wrote these entries")


#: Longest Idempotency-Key accepted (printable ASCII); a UUID is 36.
MAX_IDEMPOTENCY_KEY = 200

#: XADD every sample and record what was written under the request's key, atomically; a key
#: already recorded writes nothing and returns the record. ARGV: ttl ms, the samples' digest,
#: the sample count, then per sample its field count and field/value pairs.
_IDEMPOTENT_XADD = """
local prev = redis.call('GET', KEYS[2])
if prev then return {1, prev} end
local n = tonumber(ARGV[3])
local i = 4
local ids = {}
for e = 1, n do
  local nf = tonumber(ARGV[i]); i = i + 1
  local args = {KEYS[1], '*'}
  for f = 1, 2 * nf do args[#args + 1] = ARGV[i]; i = i + 1 end
  ids[e] = redis.call('XADD', unpack(args))
end
local record = ARGV[2] .. ' ' .. table.concat(ids, ',')
redis.call('SET', KEYS[2], record, 'PX', ARGV[1])
return {0, record}
"""


def _numbers_only(value: Any) -> bool:
    """JSON numbers, possibly nested in lists (numpy would silently take "1" or true)."""
    if isinstance(value, list):
        return all(_numbers_only(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def encode_sample(codec: EntryCodec, index: int, sample: Any) -> dict[str, bytes]:
    """XADD fields for one request sample; :class:`ApiError` 422 naming it if it is bad."""
    def bad(reason: str, detail: str) -> ApiError:
        return ApiError(422, reason, f"sample {index}: {detail}", index=index)

    if not isinstance(sample, dict):
        raise bad("bad_request", "a sample must be an object {\"x\": [...], \"y\": ...}")
    if "x" not in sample:
        raise bad("missing_x", "the sample has no 'x'")
    if "y" not in sample:
        raise bad("missing_label", "the sample has no 'y'")
    x, y, sample_id = sample["x"], sample["y"], sample.get("id")
    if not isinstance(x, list) or not _numbers_only(x):
        raise bad("bad_x", "'x' must be a (nested) list of numbers")
    if not _numbers_only(y) and not (isinstance(y, str) and codec.label_set != "indices"):
        raise bad("bad_label", "'y' must be a number (a class index) or a list of numbers")
    if isinstance(y, float) and not math.isfinite(y):
        raise bad("nonfinite", "'y' must be finite")
    if sample_id is not None and not isinstance(sample_id, str):
        raise bad("bad_request", "'id' must be a string")
    try:
        return codec.encode(x, y, binary=True, sample_id=sample_id)
    except DecodeError as exc:
        raise bad(exc.reason, exc.detail) from None
    except (ValueError, TypeError):
        raise bad("bad_x", "'x' must be a rectangular list of numbers") from None


@router.post("/ingest", status_code=202, response_model=IngestResponse,
             summary="Append labelled samples to a model's training stream",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": inline_schema(IngestRequest.model_json_schema())}}},
                 "parameters": [{
                     "name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "minLength": 1,
                                "maxLength": MAX_IDEMPOTENCY_KEY},
                     "description": "makes a retry safe: a request with a key already used "
                                    "(within NP_INGEST_IDEMPOTENCY_TTL_SECONDS) writes "
                                    "nothing and answers the first request's IDs"}]},
             responses=error_responses(
                 *BODY_ERRORS, 401, 403, 404, 429, 503, descriptions={
                     401: "the ingest API key is missing", 403: "the ingest API key is wrong",
                     422: "a bad sample (names its index and reason), or an Idempotency-Key "
                          "used before for other samples; nothing was written",
                     503: "Redis unavailable (code redis_unavailable: nothing was written, "
                          "retry after Retry-After), or its reply to the write was lost "
                          "(code write_unconfirmed: the samples may have been written)"}))
async def ingest(request: Request) -> Response:
    """Validate every sample, then XADD them in one atomic pipeline; 202 with the IDs."""
    state = api_state(request)
    require_key(request, "ingest")
    body, _ = await read_json_object(request)
    slot = find_slot(request, body.get("model"))
    rejected = state.metrics.ingest_rejected
    samples = body.get("samples")
    if not isinstance(samples, list) or not samples:
        rejected.labels(slot.name, "request").inc()
        raise ApiError(422, "bad_request", "'samples' must be a non-empty list of "
                                           "{\"x\": [...], \"y\": ...} objects")
    n = len(samples)
    if n > state.settings.max_instances:
        rejected.labels(slot.name, "request").inc(n)
        raise ApiError(422, "too_many_samples",
                       f"{n} samples; at most {state.settings.max_instances} per request")
    try:
        entries = [encode_sample(slot.codec, i, s) for i, s in enumerate(samples)]
    except ApiError as exc:
        rejected.labels(slot.name, exc.code).inc(n)
        raise
    idempotency_key = _idempotency_key(request)
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if state.redis is None or not state.redis_ok:
        rejected.labels(slot.name, "redis_unavailable").inc(n)
        raise ApiError(503, "redis_unavailable", "the stream is unavailable (Redis is down); "
                       "nothing was written, retry later", headers=retry)
    stream = keys.samples_stream(slot.name)
    writer = state.redis_writes or state.redis
    try:
        backlog = await _xlen(writer, stream)
        if backlog + n > state.settings.max_backlog:
            rejected.labels(slot.name, "backlog").inc(n)
            raise ApiError(429, "backlog_full", f"{backlog} samples wait for training (limit "
                           f"{state.settings.max_backlog}); nothing was written, retry later",
                           headers=retry)
    except (RedisConnectionError, RedisTimeoutError, OSError, RedisError) as exc:
        _redis_failed(state, exc)
        rejected.labels(slot.name, "redis_unavailable").inc(n)
        raise ApiError(503, "redis_unavailable", f"the stream is unavailable "
                       f"({type(exc).__name__}); nothing was written, retry later",
                       headers=retry) from None
    try:
        # One try only (``redis_writes`` never retries): after a timeout Redis may still run
        # the MULTI it had received, and a retry would write the samples twice.
        if idempotency_key is None:
            async with writer.pipeline(transaction=True) as pipe:
                for fields in entries:
                    pipe.xadd(stream, fields)  # type: ignore[arg-type]
                ids = await pipe.execute()
            replayed = False
        else:
            ttl = state.settings.ingest_idempotency_ttl_seconds
            replayed, ids = await write_idempotent(writer, stream, keys.ingest_request(
                slot.name, idempotency_key), entries, ttl)
    except IdempotencyConflict:
        rejected.labels(slot.name, "idempotency_key_reused").inc(n)
        raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used for other "
                       "samples; nothing was written") from None
    except (RedisConnectionError, RedisTimeoutError, OSError, RedisError) as exc:
        _redis_failed(state, exc)
        if not isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
            # Redis answered with an error: EXEC aborted, nothing was written.
            rejected.labels(slot.name, "redis_unavailable").inc(n)
            raise ApiError(503, "redis_unavailable", f"Redis refused the write "
                           f"({type(exc).__name__}); nothing was written, retry later",
                           headers=retry) from None
        rejected.labels(slot.name, "write_unconfirmed").inc(n)
        raise ApiError(503, "write_unconfirmed", f"Redis did not confirm the write "
                       f"({type(exc).__name__}): the {n} samples may or may not have been "
                       f"written; a retry can duplicate them", headers=retry) from None
    if not replayed:
        state.metrics.ingest_accepted.labels(slot.name).inc(n)
    return json_response({"model": slot.name, "accepted": n,
                          "ids": [i.decode() if isinstance(i, bytes) else str(i) for i in ids],
                          "replayed": replayed}, status=202)


class IdempotencyConflict(Exception):
    """An Idempotency-Key already recorded for different samples."""


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key as a digest (Redis key material), or None; 400 if bad."""
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_IDEMPOTENCY_KEY or not raw.isprintable() or not raw.isascii():
        raise ApiError(400, "bad_idempotency_key", f"Idempotency-Key must be 1 to "
                       f"{MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return hashlib.sha256(raw.encode()).hexdigest()


def samples_digest(entries: list[dict[str, bytes]]) -> str:
    """SHA-256 of the encoded samples, to tell a retry from a reuse of its key."""
    h = hashlib.sha256()
    for fields in entries:
        for name in sorted(fields):
            value = fields[name]
            data = value if isinstance(value, bytes) else str(value).encode()
            h.update(f"{name}:{len(data)}:".encode())
            h.update(data)
        h.update(b"\n")
    return h.hexdigest()


async def write_idempotent(writer: Redis, stream: str, record_key: str,
                           entries: list[dict[str, bytes]], ttl_seconds: float
                           ) -> tuple[bool, list[str]]:
    """XADD ``entries`` once per key: ``(replayed, ids)``. Raises
    :class:`IdempotencyConflict` if the key recorded other samples."""
    digest = samples_digest(entries)
    args: list[Any] = [max(1, int(ttl_seconds * 1000)), digest, len(entries)]
    for fields in entries:
        args.append(len(fields))
        for name, value in fields.items():
            args += [name, value]
    script = writer.register_script(_IDEMPOTENT_XADD)
    replayed, record = await script(keys=[stream, record_key], args=args)
    text = record.decode() if isinstance(record, bytes) else str(record)
    stored_digest, _, ids = text.partition(" ")
    if stored_digest != digest:
        raise IdempotencyConflict(record_key)
    return bool(replayed), ids.split(",") if ids else []


def _redis_failed(state: ApiState, exc: BaseException) -> None:
    """A connection-level failure marks Redis down until the next successful ping."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
        state.redis_ok = False
        state.metrics.redis_up.set(0)


async def _xlen(writer: Redis, stream: str) -> int:
    """XLEN on the write client, once more on a fresh connection if the pooled one was dead
    (a Redis restart closes it; XLEN is safe to repeat). This also leaves the MULTI that
    follows a live connection, so a restart does not turn into a false "write unconfirmed"."""
    try:
        return int(await writer.xlen(stream))
    except (RedisConnectionError, OSError):
        return int(await writer.xlen(stream))
