"""``POST /predict``: answers from the version a model serves at the moment the request reads it.

The body is parsed by hand (one ``json.loads`` and one numpy conversion) rather than through a
pydantic model: per-request overhead is most of a small model's latency (DESIGN section 7).
The pydantic models below document the contract in OpenAPI.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from .routes_common import (BODY_ERRORS, ApiError, Features, api_state, error_responses,
                            find_slot, inline_schema, json_response, read_json_object,
                            require_key)
from .routes_labels import prediction_ids, store_predictions
from .serving import InstanceError, ModelServer, parse_instances

router = APIRouter(tags=["predict"])


class PredictRequest(BaseModel):
    """Instances to predict; each a list of ``num_features`` numbers (or nested, for images)."""

    model: str = Field("default", description="a declared model's name")
    instances: list[Features] = Field(..., description="one or more instances, at most "
                                      "NP_MAX_INSTANCES", examples=[[[0.0] * 4]])
    ids: list[str] | None = Field(None, description="optional: your id per instance, for "
                                  "POST /label (made and returned when the model keeps "
                                  "predictions for labels)")


class Prediction(BaseModel):
    label: int | str | None = Field(None, description="classification: the most probable "
                                    "class (a model with classes/open_classes: your own label; "
                                    "null before any label was trained)")
    probabilities: list[float] | None = Field(None, description="classification: per class "
                                              "(in the order of the response's 'classes' when "
                                              "it has them, else by class index)")
    value: float | None = Field(None, description="regression with one target")
    values: list[float] | None = Field(None, description="regression with several targets")
    id: str | None = Field(None, description="the id to label this prediction with")


class PredictResponse(BaseModel):
    model: str
    version: int = Field(..., description="the snapshot version that answered every instance")
    predictions: list[Prediction]
    classes: list[int | str] | None = Field(None, description="models with classes/open_classes:"
                                            " the label of each probability, in order")
    stored_for_labels: bool | None = Field(None, description="models with label_ttl_seconds: "
                                           "false if Redis was down (cannot be labelled)")


@router.post("/predict", response_model=PredictResponse, summary="Predict with a model",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": inline_schema(PredictRequest.model_json_schema())}}}},
             responses=error_responses(
                 *BODY_ERRORS, 401, 403, 404, 409, 503, descriptions={
                     401: "the predict API key is missing (only when NP_PREDICT_API_KEY is set)",
                     403: "the predict API key is wrong",
                     409: "an id already awaits a label or was labelled",
                     422: "bad instances (names the instance and reason)",
                     503: "the model has no snapshot yet; retry after Retry-After"}))
async def predict(request: Request) -> Response:
    """Class probabilities and label (or regression values) per instance, and the version."""
    state = api_state(request)
    require_key(request, "predict")
    body, raw = await read_json_object(request)
    slot = find_slot(request, body.get("model"))
    instances = body.get("instances")
    if instances is None and "instance" in body:
        instances = [body["instance"]]
    if instances is None:
        raise ApiError(422, "bad_request", "the body needs 'instances': a list of instances")
    if isinstance(instances, list) and instances and not isinstance(instances[0], list):
        raise ApiError(422, "bad_request", "'instances' must be a list of instances (lists of "
                       "numbers); for one instance send [[...]] or use 'instance'")
    if isinstance(instances, list) and len(instances) > state.settings.max_instances:
        raise ApiError(422, "too_many_instances", f"{len(instances)} instances; at most "
                       f"{state.settings.max_instances} per request")
    try:
        x = parse_instances(slot.codec, instances, b"true" in raw or b"false" in raw)
    except InstanceError as exc:
        extra = {"index": exc.index} if exc.index is not None else {}
        raise ApiError(422, exc.reason, str(exc), **extra) from None
    served = slot.current  # read once: this request is answered wholly by this version
    if served is None:
        raise ApiError(503, "not_ready", f"model {slot.name!r} has no snapshot yet",
                       headers={"Retry-After": "1"})
    n = x.shape[0]
    if served.runs_inline(n, state.settings.predict_inline_budget_seconds):
        out = ModelServer.infer(served, x, slot.config)
    else:
        out = await anyio.to_thread.run_sync(ModelServer.infer, served, x, slot.config)
    ids = None
    stored = None
    if "ids" in body or slot.config.label_ttl_seconds is not None:
        ids = prediction_ids(body, n)
        if slot.config.label_ttl_seconds is not None:
            stored = await store_predictions(state, slot, served, x, out, ids)
    state.metrics.predictions.labels(slot.name).inc(n)
    label_map = served.label_map
    if slot.config.task == "classification" and label_map is not None:
        # The user's own labels; an open set with no label trained yet answers null.
        labels = ([label_map[i] for i in out.argmax(axis=1).tolist()] if label_map
                  else [None] * n)
        predictions = [{"label": lab, "probabilities": p} for lab, p in zip(labels, out.tolist())]
    elif slot.config.task == "classification":
        labels = out.argmax(axis=1).tolist()
        predictions = [{"label": lab, "probabilities": p} for lab, p in zip(labels, out.tolist())]
    elif slot.config.num_targets == 1:
        predictions = [{"value": v} for v in out[:, 0].tolist()]
    else:
        predictions = [{"values": v} for v in out.tolist()]
    response: dict[str, Any] = {"model": slot.name, "version": served.version,
                                "predictions": predictions}
    if label_map is not None:
        response["classes"] = list(label_map)
    if ids is not None:
        for p, pid in zip(predictions, ids):
            p["id"] = pid
    if stored is not None:
        # False: Redis was unavailable; answered, but these cannot be labelled later.
        response["stored_for_labels"] = stored
    return json_response(response)
