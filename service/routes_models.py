"""Model information (``GET /models``, ``GET /models/{name}``) and the admin reload."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from .routes_common import api_state, error_responses, find_slot, json_response, require_key
from .serving import ModelSlot

router = APIRouter(tags=["models"])

#: Snapshot metadata keys reported as-is by ``GET /models/{name}``.
_REPORTED = ("samples_trained", "steps", "last_stream_id", "prequential", "dead_letters",
             "skipped_steps", "created_at", "layer_stats")


class ModelInfo(BaseModel):
    name: str
    ready: bool
    version: int | None
    samples_trained: int | None = None
    prequential: dict[str, Any] | None = None
    snapshot_age_seconds: float | None = None
    snapshot: dict[str, Any] | None = None
    config: dict[str, Any]
    last_error: str | None = None
    pinned: int | None = None


def model_info(slot: ModelSlot) -> dict[str, Any]:
    """What the API knows about a model: served version, training progress, configuration."""
    served = slot.current
    meta = served.metadata if served else {}
    created = meta.get("created_at")
    return {
        "name": slot.name,
        "ready": served is not None,
        "version": served.version if served else None,
        "samples_trained": meta.get("samples_trained"),
        "prequential": meta.get("prequential"),
        "snapshot_age_seconds": (round(time.time() - created, 3)
                                 if isinstance(created, (int, float)) else None),
        "snapshot": {k: meta[k] for k in _REPORTED if k in meta} if served else None,
        "config": slot.config.model_dump(mode="json"),
        "last_error": slot.last_error,
        "pinned": served.version if served is not None and served.pinned else None,
    }


@router.get("/models", response_model=list[ModelInfo], summary="Every declared model")
async def list_models(request: Request) -> Response:
    return json_response([model_info(s) for s in api_state(request).server.slots.values()])


@router.get("/models/{name}", response_model=ModelInfo, summary="One model",
            responses=error_responses(404, 422, descriptions={422: "invalid path parameter"}))
async def get_model(request: Request, name: str) -> Response:
    return json_response(model_info(find_slot(request, name)))


@router.post("/admin/models/{name}/reload", response_model=ModelInfo, tags=["admin"],
             summary="Check for a newer snapshot now (admin key)",
             responses=error_responses(401, 403, 404, 413, 422, descriptions={
                 401: "the admin API key is missing", 403: "the admin API key is wrong",
                 422: "invalid path parameter"}))
async def reload_model(request: Request, name: str) -> Response:
    """Poll the snapshot store for this model at once instead of waiting for the poller."""
    require_key(request, "admin")
    slot = find_slot(request, name)
    await api_state(request).server.refresh(slot.name)
    return json_response(model_info(slot))
