"""The API over real HTTP: contract, bad input (4xx JSON, never 500, nothing enters the stream),
body limits, API keys, backlog, two models by configuration, OpenAPI, CORS, metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import redis
import torch
from test_api_support import (ApiProcess, expected_outputs, metric_samples, metric_value,
                              np_env, publish, shared_conftest)

from service import keys
from service.codec import EntryCodec
from service.settings import ModelConfig
from service.snapshots import SnapshotStore

INGEST_KEY = "ingest-secret-1"
ADMIN_KEY = "admin-secret-2"
MAX_BODY = 4096
MAX_INSTANCES = 8
MAX_BACKLOG = 40

DIGITS = ModelConfig(name="default", input_shape=[64], num_classes=10, spec="mlp:32,32")
REG = ModelConfig(name="reg", input_shape=[5], task="regression", num_targets=2, spec="mlp:16")


class Api:
    def __init__(self, proc: ApiProcess, redis_client: redis.Redis, data_dir: Path) -> None:
        self.proc = proc
        self.url = proc.url
        self.redis = redis_client
        self.data_dir = data_dir
        self.http = httpx.Client(base_url=proc.url, timeout=10)

    def stream_len(self, model: str = "default") -> int:
        return int(self.redis.xlen(keys.samples_stream(model)))

    def post_raw(self, path: str, body: bytes, **headers: str) -> httpx.Response:
        return self.http.post(path, content=body,
                              headers={"content-type": "application/json", **headers})


@pytest.fixture(scope="module")
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api_http")
    server = shared_conftest(request.config).RedisServer(tmp / "redis")
    server.start()
    data_dir = tmp / "data"
    for cfg in (DIGITS, REG):
        publish(SnapshotStore(data_dir / "snapshots", cfg.name), cfg, 1)
    env = np_env(server.url, data_dir,
                 models=[DIGITS.model_dump(mode="json"), REG.model_dump(mode="json")],
                 ingest_api_key=INGEST_KEY, admin_api_key=ADMIN_KEY,
                 max_body_bytes=str(MAX_BODY), max_instances=str(MAX_INSTANCES),
                 max_backlog=str(MAX_BACKLOG))
    proc = ApiProcess(env, tmp / "api.log")
    client = redis.Redis.from_url(server.url)
    try:
        proc.wait_ready(path="/readyz")
        yield Api(proc, client, data_dir)
    finally:
        proc.stop()
        client.close()
        server.kill()


def assert_json_error(resp: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    if status is not None:
        assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("message"), str) and len(body["message"]) > 5
    return body


# -- the happy paths -----------------------------------------------------------------------------
def test_health_ready_models_docs(api: Api) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {"default": 1, "reg": 1}
    models = api.http.get("/models").json()
    assert [m["name"] for m in models] == ["default", "reg"]
    info = api.http.get("/models/default").json()
    assert info["version"] == 1 and info["ready"] is True
    assert info["samples_trained"] == 10
    assert info["prequential"]["accuracy"] == 0.5
    assert info["config"]["spec"] == "mlp:32,32"
    assert api.http.get("/docs").status_code == 200
    spec = api.http.get("/openapi.json").json()
    for path in ("/predict", "/ingest", "/models/{name}", "/healthz", "/readyz"):
        assert path in spec["paths"]
    assert "instances" in json.dumps(spec["paths"]["/predict"]["post"]["requestBody"])


def test_predict_classification_matches_snapshot(api: Api) -> None:
    x = torch.randn(3, 64) * 4
    resp = api.http.post("/predict", json={"model": "default", "instances": x.tolist()})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "default" and body["version"] == 1
    expected = expected_outputs(SnapshotStore(api.data_dir / "snapshots", "default"), DIGITS, 1, x)
    assert len(body["predictions"]) == 3
    for pred, probs in zip(body["predictions"], expected):
        assert pred["label"] == int(probs.argmax())
        assert torch.allclose(torch.tensor(pred["probabilities"]), probs, atol=1e-5)
    # The model name may be left out when it is the first declared model; one instance too.
    one = api.http.post("/predict", json={"instance": x[0].tolist()}).json()
    assert one["predictions"][0]["label"] == body["predictions"][0]["label"]


def test_predict_regression_second_model(api: Api) -> None:
    x = torch.randn(2, 5)
    body = api.http.post("/predict", json={"model": "reg", "instances": x.tolist()}).json()
    assert body["model"] == "reg" and body["version"] == 1
    expected = expected_outputs(SnapshotStore(api.data_dir / "snapshots", "reg"), REG, 1, x)
    assert torch.allclose(torch.tensor([p["values"] for p in body["predictions"]]), expected,
                          atol=1e-5)


# -- bad predictions -----------------------------------------------------------------------------
GOOD = [0.5] * 64


def _body(**kw: Any) -> bytes:
    return json.dumps(kw).encode()


BAD_PREDICT = [
    ("malformed json", b'{"instances": [[1, 2', 400, "malformed_json"),
    ("not json at all", b"hello", 400, "malformed_json"),
    ("not an object", b"[1, 2, 3]", 422, "bad_request"),
    ("no instances", _body(model="default"), 422, "bad_request"),
    ("instances not a list", _body(instances="abc"), 422, "bad_request"),
    ("empty instances", _body(instances=[]), 422, "bad_request"),
    ("flat instance", _body(instances=GOOD), 422, "bad_request"),
    ("too few features", _body(instances=[GOOD, GOOD[:63]]), 422, "wrong_length"),
    ("too many features", _body(instances=[GOOD + [1.0]]), 422, "wrong_length"),
    ("nan", b'{"instances": [[NaN' + b", 0" * 63 + b"]]}", 422, "nonfinite"),
    ("infinity", b'{"instances": [[Infinity' + b", 0" * 63 + b"]]}", 422, "nonfinite"),
    ("beyond float32", _body(instances=[[1e39] + GOOD[1:]]), 422, "nonfinite"),
    ("string feature", _body(instances=[["1"] * 64]), 422, "bad_x"),
    ("boolean feature", _body(instances=[[True] + GOOD[1:]]), 422, "bad_x"),
    ("null feature", _body(instances=[[None] + GOOD[1:]]), 422, "bad_x"),
    ("object instance", _body(instances=[GOOD, {"a": 1}]), 422, "bad_x"),
    ("ragged nesting", _body(instances=[[[1, 2], [3]] + GOOD[3:]]), 422, "bad_x"),
    ("too many instances", _body(instances=[GOOD] * (MAX_INSTANCES + 1)), 422,
     "too_many_instances"),
    ("unknown model", _body(model="nope", instances=[GOOD]), 404, "unknown_model"),
    ("model not a string", _body(model=3, instances=[GOOD]), 422, "bad_request"),
]


@pytest.mark.parametrize("case", BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_bad_predict_is_a_clear_4xx(api: Api, case: tuple[str, bytes, int, str]) -> None:
    _, body, status, code = case
    err = assert_json_error(api.post_raw("/predict", body), status)
    assert err["error"] == code, err


def test_bad_instance_is_named_by_index(api: Api) -> None:
    err = assert_json_error(api.http.post("/predict", json={
        "instances": [GOOD, GOOD, GOOD[:10]]}), 422)
    assert err["index"] == 2 and "instance 2" in err["message"] and "64" in err["message"]


def test_wrong_content_type_and_method(api: Api) -> None:
    assert_json_error(api.http.post("/predict", content=b"x=1",
                                    headers={"content-type": "text/plain"}), 415)
    assert_json_error(api.http.get("/predict"), 405)
    assert_json_error(api.http.get("/no/such/route"), 404)
    assert_json_error(api.http.get("/models/nope"), 404)


# -- bad ingest: 422 and nothing enters the stream ----------------------------------------------
def _sample(**kw: Any) -> dict[str, Any]:
    return {"x": GOOD, "y": 3, **kw}


BAD_INGEST = [
    ("label out of range", [_sample(), _sample(y=10)], "label_out_of_range", 1),
    ("negative label", [_sample(y=-1)], "label_out_of_range", 0),
    ("fractional label", [_sample(), _sample(), _sample(y=2.5)], "bad_label", 2),
    ("string label", [_sample(y="3")], "bad_label", 0),
    ("boolean label", [_sample(y=True)], "bad_label", 0),
    ("missing x", [_sample(), {"y": 1}], "missing_x", 1),
    ("missing y", [{"x": GOOD}], "missing_label", 0),
    ("short x", [_sample(x=GOOD[:5])], "wrong_length", 0),
    ("string in x", [_sample(x=["a"] * 64)], "bad_x", 0),
    ("x not a list", [_sample(x=5)], "bad_x", 0),
    ("sample not an object", [_sample(), [1, 2]], "bad_request", 1),
    ("id not a string", [_sample(id=5)], "bad_request", 0),
]


@pytest.mark.parametrize("case", BAD_INGEST, ids=[c[0] for c in BAD_INGEST])
def test_bad_ingest_is_422_and_writes_nothing(api: Api, case: tuple[str, list[Any], str, int]
                                              ) -> None:
    _, samples, code, index = case
    before = api.stream_len()
    resp = api.http.post("/ingest", json={"model": "default", "samples": samples},
                         headers={"X-API-Key": INGEST_KEY})
    err = assert_json_error(resp, 422)
    assert err["error"] == code and err["index"] == index
    assert f"sample {index}" in err["message"]
    assert api.stream_len() == before


@pytest.mark.parametrize("body,status", [
    (b'{"samples": [{"x": [NaN', 400), (b'{"samples": []}', 422), (b'{"samples": 3}', 422),
    (_body(samples=[_sample()] * (MAX_INSTANCES + 1)), 422),
    (_body(model="nope", samples=[_sample()]), 404),
    (b'{"samples": [{"x": [' + b"NaN," * 63 + b'NaN], "y": 1}]}', 422),
])
def test_bad_ingest_requests(api: Api, body: bytes, status: int) -> None:
    before = api.stream_len()
    assert_json_error(api.post_raw("/ingest", body, **{"X-API-Key": INGEST_KEY}), status)
    assert api.stream_len() == before


# -- body limit ----------------------------------------------------------------------------------
def test_body_over_limit_is_413(api: Api) -> None:
    before = api.stream_len()
    big = _body(samples=[_sample()] * 13)
    assert len(big) > MAX_BODY
    # Declared by Content-Length...
    assert_json_error(api.post_raw("/ingest", big, **{"X-API-Key": INGEST_KEY}), 413)
    assert_json_error(api.post_raw("/predict", _body(instances=[[0.123456789] * 64] * 8)), 413)
    # ...and streamed without one (chunked transfer encoding).
    chunks = iter([big[i:i + 1000] for i in range(0, len(big), 1000)])
    resp = httpx.post(api.url + "/ingest", content=chunks,
                      headers={"content-type": "application/json", "X-API-Key": INGEST_KEY})
    assert "content-length" not in resp.request.headers
    assert_json_error(resp, 413)
    assert api.stream_len() == before


# -- API keys ------------------------------------------------------------------------------------
def test_ingest_needs_its_key(api: Api) -> None:
    body = {"model": "default", "samples": [_sample(), _sample(y=7, id="s-2")]}
    before = api.stream_len()
    missing = api.http.post("/ingest", json=body)
    assert_json_error(missing, 401)
    assert "bearer" in missing.headers["www-authenticate"].lower()
    assert_json_error(api.http.post("/ingest", json=body, headers={"X-API-Key": "wrong"}), 403)
    assert_json_error(api.http.post("/ingest", json=body,
                                    headers={"Authorization": "Bearer wrong"}), 403)
    assert_json_error(api.http.post("/ingest", json=body,
                                    headers={"X-API-Key": ADMIN_KEY}), 403)
    assert api.stream_len() == before
    assert INGEST_KEY not in api.proc.log()

    ok = api.http.post("/ingest", json=body, headers={"X-API-Key": INGEST_KEY})
    assert ok.status_code == 202, ok.text
    accepted = ok.json()
    assert accepted["model"] == "default" and accepted["accepted"] == 2
    assert len(accepted["ids"]) == 2
    bearer = api.http.post("/ingest", json=body, headers={"Authorization": f"Bearer {INGEST_KEY}"})
    assert bearer.status_code == 202
    assert api.stream_len() == before + 4
    # What landed is the codec's binary entry format, decodable by the worker.
    entries = api.redis.xrange(keys.samples_stream("default"), accepted["ids"][0],
                               accepted["ids"][1])
    codec = EntryCodec(DIGITS)
    decoded = [codec.decode(fields) for _, fields in entries]
    assert [d.y for d in decoded] == [3, 7] and decoded[0].x.tolist() == GOOD
    assert entries[1][1][b"id"] == b"s-2"


def test_admin_reload_needs_the_admin_key(api: Api) -> None:
    assert_json_error(api.http.post("/admin/models/default/reload"), 401)
    assert_json_error(api.http.post("/admin/models/default/reload",
                                    headers={"X-API-Key": INGEST_KEY}), 403)
    ok = api.http.post("/admin/models/default/reload", headers={"X-API-Key": ADMIN_KEY})
    assert ok.status_code == 200 and ok.json()["version"] == 1
    # Predict needs no key when NP_PREDICT_API_KEY is unset.
    assert api.http.post("/predict", json={"instances": [GOOD]}).status_code == 200


def test_backlog_full_is_429_with_retry_after(api: Api) -> None:
    room = MAX_BACKLOG - api.stream_len()
    assert room > 0
    fill = [{"x": GOOD, "y": 1}] * min(room, MAX_INSTANCES)
    while api.stream_len() + len(fill) <= MAX_BACKLOG:
        assert api.http.post("/ingest", json={"samples": fill},
                             headers={"X-API-Key": INGEST_KEY}).status_code == 202
    before = api.stream_len()
    resp = api.http.post("/ingest", json={"samples": fill}, headers={"X-API-Key": INGEST_KEY})
    err = assert_json_error(resp, 429)
    assert err["error"] == "backlog_full" and int(resp.headers["retry-after"]) >= 1
    assert api.stream_len() == before
    api.redis.delete(keys.samples_stream("default"))


def test_cors_is_off_by_default(api: Api) -> None:
    resp = api.http.options("/predict", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in resp.headers
    resp = api.http.post("/predict", json={"instances": [GOOD]},
                         headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in resp.headers


# -- metrics (last: counts what the tests above did) --------------------------------------------
def test_metrics_scrape_parses_with_plausible_values(api: Api) -> None:
    text = api.http.get("/metrics").text
    m = metric_samples(text)
    latency = [lab for lab, _ in m["normprop_api_request_duration_seconds_count"]]
    assert {"route": "/predict", "method": "POST", "status": "200", "model": "default"} in latency
    assert any(lab["status"] == "422" for lab in latency)
    assert any(lab["status"] == "413" for lab in latency)
    assert metric_value(m, "normprop_api_request_duration_seconds_bucket", route="/predict",
                        status="200", le="+Inf") is not None
    assert metric_value(m, "normprop_api_predictions_total", model="default") >= 5
    assert metric_value(m, "normprop_api_predictions_total", model="reg") == 2
    assert metric_value(m, "normprop_api_ingest_accepted_total", model="default") >= 4
    assert metric_value(m, "normprop_api_ingest_rejected_total", model="default",
                        reason="label_out_of_range") >= 2
    assert metric_value(m, "normprop_api_ingest_rejected_total", model="default",
                        reason="backlog") >= 1
    for model in ("default", "reg"):
        assert metric_value(m, "normprop_api_snapshot_version", model=model) == 1
        age = metric_value(m, "normprop_api_snapshot_age_seconds", model=model)
        assert age is not None and 0 <= age < 600
        assert metric_value(m, "normprop_api_snapshot_load_failures_total", model=model) == 0
        assert metric_value(m, "normprop_api_snapshot_swaps_total", model=model) == 1
        assert metric_value(m, "normprop_api_snapshot_swap_seconds_count", model=model) == 1
        assert metric_value(m, "normprop_snapshot_samples_trained_total", model=model) == 10
        assert metric_value(m, "normprop_snapshot_prequential_accuracy", model=model) == 0.5
        assert metric_value(m, "normprop_snapshot_dead_letters_total", model=model) == 1
        assert metric_value(m, "normprop_snapshot_layer_input_mean", model=model,
                            layer="layers.0") == pytest.approx(0.01)
        std = metric_value(m, "normprop_snapshot_layer_input_std", model=model, layer="layers.1")
        assert std is not None and math.isclose(std, 1.01)
    assert metric_value(m, "normprop_api_redis_up") == 1
