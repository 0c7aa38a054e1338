"""What every route shares: the app's state, JSON errors, API-key checks and body parsing.

Errors are always JSON ``{"error": <code>, "message": <human text>, ...}`` (:class:`ErrorBody`)
so a caller can branch on ``error`` and show ``message``; 4xx for the caller's mistakes, never
a 500 for bad input. Every route declares each status it can answer in the OpenAPI schema
(:func:`error_responses`), so the schema is a complete contract (checked by schemathesis in
``tests/reliability/test_schemathesis.py``).

A body is read as JSON only after a bracket count shows it nests at most
:data:`MAX_JSON_DEPTH` levels (no route needs more than six), so no parser and no validator
below recurses deeply on hostile input.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from redis.asyncio import Redis
from starlette.responses import Response

from .api_metrics import ApiMetrics
from .serving import ModelServer, ModelSlot
from .settings import Settings

__all__ = ["ApiError", "ApiState", "ErrorBody", "BODY_ERRORS", "MAX_JSON_DEPTH",
           "json_response", "error_response", "error_responses", "api_state", "read_json_object",
           "require_key", "find_slot", "inline_schema", "nesting_exceeds", "Features",
           "describe_deployment"]

#: Deepest nesting of arrays and objects a request body may have. The deepest legitimate body
#: is an ingest of images: object > samples > sample > x with three dimensions (6 levels).
MAX_JSON_DEPTH = 32


#: One instance's features: ``num_features`` numbers, or nested as the model's ``input_shape``
#: (up to three dimensions), e.g. ``[[0, 1], [2, 3]]`` for a 2x2 image.
Features = list[float | list[float | list[float]]]


class ErrorBody(BaseModel):
    """Every error answer: ``error`` to branch on, ``message`` to show a person."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(..., description="a stable code, e.g. unknown_model, bad_x, nonfinite, "
                       "unauthorized, body_too_large", examples=["unknown_model"])
    message: str = Field(..., description="what was wrong, for people")
    index: int | None = Field(None, description="the instance, sample or label at fault")
    detail: list[dict[str, Any]] | None = Field(None, description="parameter validation errors")


#: What each error status means on every route that can answer it (a route may say more).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "malformed JSON (or not UTF-8, or a lone surrogate), or nested more than "
         f"{MAX_JSON_DEPTH} levels",
    401: "the route's API key is missing (X-API-Key or Authorization: Bearer)",
    403: "the API key is wrong",
    404: "unknown model",
    409: "conflict",
    413: "the body is over NP_MAX_BODY_BYTES",
    415: "the body is not application/json",
    422: "invalid request: the message names the field, instance or sample and why",
    429: "the training stream's backlog is full; retry after Retry-After",
    503: "unavailable; retry after Retry-After",
}
#: The statuses any route that reads a JSON body can answer.
BODY_ERRORS = (400, 413, 415, 422)

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 0}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "the scheme to authenticate with",
                                          "schema": {"type": "string"}}}


def error_responses(*statuses: int, descriptions: dict[int, str] | None = None
                    ) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the :class:`ErrorBody` schema, its
    description (``descriptions`` overrides :data:`ERROR_DESCRIPTIONS`) and its headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": (
            (descriptions or {}).get(status) or ERROR_DESCRIPTIONS[status])}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        elif status == 401:
            entry["headers"] = _WWW_AUTHENTICATE
        out[status] = entry
    return out


class ApiError(Exception):
    """Raised by a route to answer ``status`` with a JSON error body."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


@dataclass
class ApiState:
    """Everything the routes need, built by the app factory and opened by its lifespan."""

    settings: Settings
    metrics: ApiMetrics
    server: ModelServer
    redis: Redis | None = None
    #: A client that never retries, for the ingest transaction: a retry after a timeout can
    #: run the same MULTI twice (Redis executes what the timed-out connection had sent once
    #: it answers again), so a lost reply is reported as "may have been written" instead.
    redis_writes: Redis | None = None
    #: The last Redis ping's outcome; ingest answers 503 at once while it is False.
    redis_ok: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Model-wide served-prediction metrics per label-enabled model, read from Redis
    #: (``routes_labels.refresh_served``); what /metrics and the dashboard report.
    served: dict[str, dict[str, Any]] = field(default_factory=dict)


try:  # optional: parses and writes JSON ~5x faster than the standard library
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def dumps(body: Any) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(body)
    return json.dumps(body, separators=(",", ":")).encode()


def _json_int(text: str) -> int | float:
    """An integer literal as orjson reads it: an int within 64 bits, else a float (``inf``
    past 1e308), so no Python int too large for a float ever reaches numpy or ``float()``."""
    if len(text) <= 20:
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(text)


#: A ``\uD800``-``\uDFFF`` escape: half of a surrogate pair, or a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads(raw: bytes) -> Any:
    """Parse JSON; the standard library's parser is the fallback and the error reporter.

    The fallback also reads ``NaN``/``Infinity`` (the routes then answer the clearer 422
    "nonfinite" naming the field); it reads integers as orjson does (:func:`_json_int`) and
    refuses lone surrogates (``"\\ud800"``: not Unicode, no Redis key or stream field can
    hold them) with a ``ValueError``.
    """
    if _orjson is not None:
        try:
            return _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            pass
    body = json.loads(raw, parse_int=_json_int)
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff "
                             "without its pair), which is not Unicode") from None
    return body


_NOT_MARKS = bytes(c for c in range(256) if c not in b'[]{}"')


def _max_depth(marks: bytes) -> int:
    """Deepest nesting in a string of brackets and quotes (brackets inside quotes ignored)."""
    k = np.frombuffer(marks, dtype=np.uint8)
    step = (k & 2).astype(np.int32) - 1  # '[' and '{' have bit 1 set: +1; ']' and '}': -1
    quote = k == 0x22
    if quote.any():
        step[quote | (np.cumsum(quote, dtype=np.int32) & 1 == 1)] = 0
    return int(np.cumsum(step).max())


def nesting_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    r"""Whether the JSON text ``raw`` nests arrays and objects more than ``limit`` deep.

    Linear and non-recursive, at C speed. A body with at most ``limit`` opening brackets
    cannot nest deeper (most bodies end there); otherwise escaped backslashes and quotes are
    dropped, only brackets and quotes are kept (``bytes.translate``) and counted, skipping
    what lies between quotes. Exact for valid JSON; anything else the parser refuses (400).

    >>> nesting_exceeds(b'[[[1]]]', 3), nesting_exceeds(b'[[[[1]]]]', 3)
    (False, True)
    >>> nesting_exceeds(b'["[[[[", "\\\\", {"a": "\\"]]]]"}]', 3)
    False
    >>> nesting_exceeds(b'{"]": [{"]]": [1]}]}', 3)
    True
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:  # fewer openings than the limit: done
        return False
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = raw.translate(None, _NOT_MARKS)
    return len(marks) > limit and _max_depth(marks) > limit


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response without FastAPI's response-model pass (the hot paths build plain dicts)."""
    return Response(dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None, **extra: Any) -> Response:
    return json_response({"error": code, "message": message, **extra}, status, headers)


def api_state(request: Request) -> ApiState:
    return request.app.state.np  # type: ignore[no-any-return]


async def read_json_object(request: Request) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object (and its raw bytes); 400 for malformed JSON, 415/422 else."""
    ctype = request.headers.get("content-type", "application/json")
    if "json" not in ctype.split(";")[0]:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.body()
    if nesting_exceeds(raw):
        raise ApiError(400, "nested_too_deep", "the body nests arrays or objects more than "
                       f"{MAX_JSON_DEPTH} levels deep")
    try:
        body = loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "bad_request", "the body must be a JSON object")
    return body, raw


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def require_key(request: Request, which: Literal["ingest", "admin", "predict"]) -> None:
    """401 without a key, 403 with a wrong one; nothing when that key is not configured.

    Compared with ``hmac.compare_digest`` (constant time); keys are never logged or echoed.
    """
    settings = api_state(request).settings
    expected: SecretStr | None = getattr(settings, f"{which}_api_key")
    if expected is None or not expected.get_secret_value():
        return
    presented = _presented_key(request)
    if presented is None:
        raise ApiError(401, "unauthorized",
                       f"this route needs the {which} API key (header X-API-Key or "
                       "Authorization: Bearer)", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise ApiError(403, "forbidden", f"the {which} API key is wrong")


def find_slot(request: Request, name: Any) -> ModelSlot:
    """The declared model ``name`` (404 otherwise); labels the request's metrics with it."""
    state = api_state(request)
    if name is None:
        name = state.settings.models[0].name
    if not isinstance(name, str):
        raise ApiError(422, "bad_request", "'model' must be a string")
    slot = state.server.slots.get(name)
    if slot is None:
        known = ", ".join(sorted(state.server.slots))
        raise ApiError(404, "unknown_model", f"no model named {name[:80]!r}; declared: {known}")
    request.scope["np.model"] = name
    return slot


#: The security schemes of the routes that need a key (``require_key``), by role.
SECURITY_SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerToken": {"type": "http", "scheme": "bearer"},
}


def describe_deployment(openapi: dict[str, Any], settings: Settings,
                        roles: dict[str, str]) -> dict[str, Any]:
    """Make an app's OpenAPI schema say what this deployment is: its models (the ``name``
    path parameter and the ``model`` body field list the declared names, and each model has
    an example body of its own shape) and which routes need a key (``roles``: operation path
    -> ingest, admin or predict; declared only where that key is configured). Changes
    ``openapi`` in place and returns it."""
    names = [m.name for m in settings.models]
    configured = {role for role in ("ingest", "admin", "predict")
                  if (key := getattr(settings, f"{role}_api_key")) is not None
                  and key.get_secret_value()}
    examples = _body_examples(settings)
    for path, operations in openapi.get("paths", {}).items():
        for operation in operations.values():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if media is not None and examples.get(path):
                media["examples"] = examples[path]
            for param in operation.get("parameters", []):
                if param.get("in") == "path" and param.get("name") == "name":
                    param["schema"] = {**param.get("schema", {}), "enum": names,
                                       "description": "a declared model's name"}
            body = operation.get("requestBody", {}).get("content", {}).get(
                "application/json", {}).get("schema", {})
            model = body.get("properties", {}).get("model")
            if isinstance(model, dict):
                model["enum"] = names
                model["default"] = names[0]
            if roles.get(path) in configured:
                operation["security"] = [{"ApiKeyHeader": []}, {"BearerToken": []}]
    if configured:
        openapi.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    return openapi


def _body_examples(settings: Settings) -> dict[str, dict[str, Any]]:
    """A request body per declared model for /predict, /ingest and /label (the docs' "try it
    out" works as it stands): zeros of the model's feature count and its first label."""
    out: dict[str, dict[str, Any]] = {"/predict": {}, "/ingest": {}, "/label": {}}
    for m in settings.models:
        x = [0.0] * m.num_features
        y: Any = ([0.0] * m.num_targets if m.num_targets > 1 else 0.0) \
            if m.task == "regression" else ((m.classes or ["a"])[0] if m.label_set != "indices"
                                            else 0)
        summary = f"model {m.name!r}"
        out["/predict"][m.name] = {"summary": summary,
                                   "value": {"model": m.name, "instances": [x]}}
        out["/ingest"][m.name] = {"summary": summary,
                                  "value": {"model": m.name, "samples": [{"x": x, "y": y}]}}
        if m.label_ttl_seconds is not None:
            out["/label"][m.name] = {"summary": summary, "value": {
                "model": m.name, "labels": [{"id": "an id /predict returned", "y": y}]}}
    return out


def inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined, fit for ``openapi_extra``."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(dict(defs[ref.split("/")[-1]]))
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]
