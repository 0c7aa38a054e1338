"""Snapshot versions (admin key): list them, pin the API to one, unpin.

A pin is the ``PINNED`` file in the model's snapshot directory (:class:`SnapshotStore.pin`),
so every API replica on the same volume serves the pinned version within one poll period, the
pin survives restarts and Redis outages, and the worker's retention never deletes it. The
replica that receives the request validates the version first (read, shapes, finiteness,
fold) and serves it before answering; a version that is missing answers 404 and one that
fails validation 422, and in both cases nothing is pinned and the current version keeps
serving. Versions never go backwards in a replica except across an explicit pin or unpin.

Rolling the *worker* back (``POST .../rollback``) is a separate operation: training resumes
from version N's checkpoint. The request is the ``ROLLBACK`` file beside ``PINNED``
(:meth:`SnapshotStore.request_rollback`, atomic, works while Redis is down); the worker that
holds the model's lease picks it up within a loop turn, restores N (weights, optimiser state,
data-norm statistics, counters, label map) and publishes it as a new, higher version whose
metadata says ``rolled_back_from: N``. It continues from the stream position it had reached:
the entries trained after N are not trained again. ``retrain: true`` is refused: the worker
trims the stream below every checkpoint, so what came after N is no longer in the stream (push
it again to retrain it).
"""

from __future__ import annotations

import time
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from .routes_common import (BODY_ERRORS, ApiError, api_state, error_responses, find_slot,
                            inline_schema, json_response, read_json_object, require_key)
from .routes_models import ModelInfo, model_info
from .serving import ModelSlot
from .snapshots import SnapshotError

router = APIRouter(tags=["admin"])

_ADMIN = {401: "the admin API key is missing", 403: "the admin API key is wrong",
          404: "unknown model or version", 422: "invalid path parameter"}


class VersionInfo(BaseModel):
    version: int
    created_at: float | None = None
    samples_trained: int | None = None
    prequential: dict[str, Any] | None = Field(None, description="test-then-train metrics "
                                               "when the version was saved")
    size_bytes: int | None = None
    latest: bool
    pinned: bool
    served: bool
    error: str | None = Field(None, description="why the header could not be read")
    rolled_back_from: int | None = Field(None, description="a rollback published this "
                                         "version from that one")


class VersionList(BaseModel):
    model: str
    latest: int | None
    pinned: int | None
    served: int | None
    rollback_pending: dict[str, Any] | None = Field(None, description="a rollback request the "
                                                    "worker has not carried out yet")
    versions: list[VersionInfo]


class PinRequest(BaseModel):
    version: int = Field(..., ge=1, description="a version listed by GET .../versions")


class PinResponse(ModelInfo):
    pin_seconds: float = Field(..., description="reading and validating the version")


def _describe(slot: ModelSlot) -> dict[str, Any]:
    """Blocking (file reads): every version on disk with the metadata worth choosing by."""
    store = slot.store
    latest = store.latest_version()
    pinned = store.pinned_version()
    served = slot.current.version if slot.current else None
    out = []
    for v in reversed(store.versions()):
        row: dict[str, Any] = {"version": v, "latest": v == latest, "pinned": v == pinned,
                               "served": v == served}
        try:
            meta = store.read_header_metadata(v)
            row.update(created_at=meta.get("created_at"),
                       samples_trained=meta.get("samples_trained"),
                       prequential=meta.get("prequential"))
            if meta.get("rolled_back_from") is not None:
                row["rolled_back_from"] = meta.get("rolled_back_from")
            row["size_bytes"] = store.path(v).stat().st_size
        except (SnapshotError, OSError) as exc:  # pruned meanwhile, or unreadable
            row["error"] = str(exc)
        out.append(row)
    return {"model": slot.name, "latest": latest, "pinned": pinned, "served": served,
            "rollback_pending": store.rollback_request(), "versions": out}


@router.get("/admin/models/{name}/versions", response_model=VersionList,
            summary="Snapshot versions on disk, newest first (admin key)",
            responses=error_responses(401, 403, 404, 422, descriptions=_ADMIN))
async def list_versions(request: Request, name: str) -> Response:
    """Each version's samples trained, prequential accuracy when saved, creation time and
    size, and which one is the newest, pinned and served by this replica."""
    require_key(request, "admin")
    slot = find_slot(request, name)
    return json_response(await anyio.to_thread.run_sync(_describe, slot))


def _version_of(body: dict) -> int:
    """The body's ``version``: a positive integer, else 422."""
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ApiError(422, "bad_request", "'version' must be a positive integer")
    return version


@router.post("/admin/models/{name}/pin", response_model=PinResponse,
             summary="Serve version N until unpinned (admin key)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": inline_schema(PinRequest.model_json_schema())}}}},
             responses=error_responses(*BODY_ERRORS, 401, 403, 404, descriptions={
                 **_ADMIN, 422: "a bad version, or it fails validation; nothing pinned"}))
async def pin_version(request: Request, name: str) -> Response:
    """Validate the version, pin it (every replica follows within one poll) and serve it."""
    require_key(request, "admin")
    slot = find_slot(request, name)
    body, _ = await read_json_object(request)
    version = _version_of(body)
    server = api_state(request).server
    exists = await anyio.to_thread.run_sync(slot.store.path(version).exists)
    if not exists:
        known = await anyio.to_thread.run_sync(slot.store.versions)
        raise ApiError(404, "unknown_version", f"model {slot.name!r} has no snapshot "
                       f"v{version}; on disk: {known[-10:]}")
    t0 = time.perf_counter()
    try:
        served = await server.pin(slot.name, version)
    except SnapshotError as exc:
        if not await anyio.to_thread.run_sync(slot.store.path(version).exists):
            raise ApiError(404, "unknown_version", f"v{version} of {slot.name!r} was deleted "
                           "by retention meanwhile; nothing was pinned") from None
        raise ApiError(422, "invalid_snapshot", f"v{version} fails validation and was not "
                       f"pinned (v{slot.current.version if slot.current else '-'} keeps "
                       f"serving): {exc}") from None
    return json_response({**model_info(slot), "pinned": served.version,
                          "pin_seconds": round(time.perf_counter() - t0, 4)})


@router.delete("/admin/models/{name}/pin", response_model=ModelInfo,
               summary="Follow the newest version again (admin key)",
               responses=error_responses(401, 403, 404, 413, 422, descriptions=_ADMIN))
async def unpin_version(request: Request, name: str) -> Response:
    require_key(request, "admin")
    slot = find_slot(request, name)
    await api_state(request).server.unpin(slot.name)
    return json_response({**model_info(slot), "pinned": None})


class RollbackRequest(BaseModel):
    version: int = Field(..., ge=1, description="a version listed by GET .../versions")
    retrain: bool = Field(False, description="retrain what the stream held after N: refused, "
                          "the worker trims the stream below every checkpoint")


class RollbackResponse(BaseModel):
    model: str
    requested: dict[str, Any] = Field(..., description="the request the worker will carry out "
                                      "(version, id, requested_at)")
    latest: int | None = Field(..., description="the newest version now")
    message: str


@router.post("/admin/models/{name}/rollback", status_code=202, response_model=RollbackResponse,
             summary="Roll the worker back to version N (admin key)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": inline_schema(RollbackRequest.model_json_schema())}}}},
             responses=error_responses(*BODY_ERRORS, 401, 403, 404, descriptions={
                 **_ADMIN, 422: "a bad version, or retrain requested"}))
async def rollback(request: Request, name: str) -> Response:
    """Ask the worker to resume training from version N (202: requested). The worker publishes
    N's state as a new version with ``rolled_back_from: N`` (see GET .../versions); what it
    trained after N is not retrained."""
    require_key(request, "admin")
    slot = find_slot(request, name)
    body, _ = await read_json_object(request)
    version = _version_of(body)
    retrain = body.get("retrain", False)
    if not isinstance(retrain, bool):
        raise ApiError(422, "bad_request", "'retrain' must be true or false")
    if retrain:
        raise ApiError(422, "retrain_unavailable", "the worker trims the stream below every "
                       "checkpoint, so the entries after the version are gone; roll back with "
                       "retrain=false and push the data again to retrain it")
    try:
        req = await anyio.to_thread.run_sync(slot.store.request_rollback, version)
    except SnapshotError:
        known = await anyio.to_thread.run_sync(slot.store.versions)
        raise ApiError(404, "unknown_version", f"model {slot.name!r} has no snapshot "
                       f"v{version}; on disk: {known[-10:]}") from None
    latest = await anyio.to_thread.run_sync(slot.store.latest_version)
    return json_response({"model": slot.name, "requested": req, "latest": latest,
                          "message": "the worker resumes from this version at its next loop "
                          "turn and publishes it as a version above the latest, with "
                          "rolled_back_from set; what it trained after it is not retrained"},
                         202)
