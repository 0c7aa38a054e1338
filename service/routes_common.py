"""What every route shares: the app's state, JSON errors, API-key checks and body parsing.

Errors are always JSON ``{"error": <code>, "message": <human text>, ...}`` so a caller can
branch on ``error`` and show ``message``; 4xx for the caller's mistakes, never a 500 for bad
input.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.responses import Response

from .api_metrics import ApiMetrics
from .serving import ModelServer, ModelSlot
from .settings import Settings

__all__ = ["ApiError", "ApiState", "json_response", "error_response", "api_state",
           "read_json_object", "require_key", "find_slot", "inline_schema"]


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


def loads(raw: bytes) -> Any:
    """Parse JSON; the standard library's parser is the fallback and the error reporter
    (it also reads ``NaN``/``Infinity``, so those get the clearer 422 "nonfinite")."""
    if _orjson is not None:
        try:
            return _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(raw)


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
