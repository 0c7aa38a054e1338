"""Delayed labels over real HTTP against a real redis-server: the contract of ``POST /predict``
ids and ``POST /label`` (join, 409 twice, 404 unknown or expired, 422 bad label, 207 mixed,
nothing enqueued on a refusal), what the joined stream entry holds, expiry counting, the
model-wide served metrics, and Redis-down behaviour."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import redis
from test_api_support import (ApiProcess, metric_samples, metric_value, np_env, publish,
                              shared_conftest)

from service import keys
from service.codec import EntryCodec
from service.settings import ModelConfig
from service.snapshots import SnapshotStore

CLS = ModelConfig(name="default", input_shape=[8], num_classes=3, spec="mlp:16",
                  label_ttl_seconds=60)
SHORT = ModelConfig(name="short", input_shape=[8], num_classes=3, spec="mlp:16",
                    label_ttl_seconds=0.4)
REG = ModelConfig(name="reg", input_shape=[4], task="regression", num_targets=2, spec="mlp:8",
                  label_ttl_seconds=60)
PLAIN = ModelConfig(name="plain", input_shape=[8], num_classes=3, spec="mlp:16")


class Env:
    def __init__(self, api: ApiProcess, r: redis.Redis) -> None:
        self.api = api
        self.redis = r
        self.http = httpx.Client(base_url=api.url, timeout=10)

    def stream(self, model: str = "default") -> list[tuple[bytes, dict[bytes, bytes]]]:
        return self.redis.xrange(keys.samples_stream(model))  # type: ignore[return-value]

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        return metric_samples(self.http.get("/metrics").text)


@pytest.fixture(scope="module")
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("labels")
    server = shared_conftest(request.config).RedisServer(tmp / "redis")
    server.start()
    data = tmp / "data"
    for cfg in (CLS, SHORT, REG, PLAIN):
        publish(SnapshotStore(data / "snapshots", cfg.name), cfg, 1)
    api = ApiProcess(np_env(server.url, data, models=[c.model_dump(mode="json")
                                                      for c in (CLS, SHORT, REG, PLAIN)]),
                     tmp / "api.log")
    try:
        api.wait_ready(path="/readyz")
        yield Env(api, redis.Redis.from_url(server.url))
    finally:
        api.stop()
        server.kill()


def _x(n: int, f: int = 8, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(0, 2, size=(n, f)).round(3).tolist()


def test_predict_makes_ids_and_label_joins_once(env: Env) -> None:
    x = _x(3)
    resp = env.http.post("/predict", json={"instances": x})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ids = [p["id"] for p in body["predictions"]]
    assert len(set(ids)) == 3 and all(ids) and body["stored_for_labels"] is True
    before = len(env.stream())

    y = 2
    first = env.http.post("/label", json={"labels": [{"id": ids[0], "y": y}]})
    assert first.status_code == 202, first.text
    res = first.json()["results"][0]
    assert res["result"] == "accepted" and res["version"] == 1
    assert res["correct"] == (body["predictions"][0]["label"] == y)
    assert 0 <= res["delay_seconds"] < 10
    entries = env.stream()
    assert len(entries) == before + 1
    sid, fields = entries[-1]
    assert sid.decode() == res["stream_id"]
    # The joined entry is an ordinary stream entry: the served features, the label, the id.
    sample = EntryCodec(CLS).decode(fields)
    assert np.allclose(sample.x, np.float32(x[0])) and sample.y == y
    assert fields[b"id"].decode() == ids[0]

    again = env.http.post("/label", json={"labels": [{"id": ids[0], "y": 1}]})
    assert again.status_code == 409 and again.json()["results"][0]["result"] == "already_labelled"
    unknown = env.http.post("/label", json={"labels": [{"id": "never-made", "y": 1}]})
    assert unknown.status_code == 404
    assert "expired" in unknown.json()["results"][0]["message"]
    bad = env.http.post("/label", json={"labels": [{"id": ids[1], "y": 7}]})
    assert bad.status_code == 422
    assert bad.json()["results"][0]["result"] == "label_out_of_range"
    assert len(env.stream()) == before + 1  # refusals add nothing

    # One bad id does not reject the batch: per-item results, 207.
    mixed = env.http.post("/label", json={"labels": [
        {"id": ids[1], "y": 0}, {"id": ids[0], "y": 0}, {"id": "nope", "y": 0},
        {"id": ids[2], "y": "x"}, {"id": ids[2], "y": 1}]})
    assert mixed.status_code == 207, mixed.text
    assert [r["status"] for r in mixed.json()["results"]] == [202, 409, 404, 422, 202]
    assert mixed.json()["accepted"] == 2
    assert len(env.stream()) == before + 3


def test_client_ids_and_duplicates(env: Env) -> None:
    resp = env.http.post("/predict", json={"instances": _x(2), "ids": ["order-1", "order-2"]})
    assert resp.status_code == 200, resp.text
    assert [p["id"] for p in resp.json()["predictions"]] == ["order-1", "order-2"]
    dup = env.http.post("/predict", json={"instances": _x(1), "ids": ["order-2"]})
    assert dup.status_code == 409 and dup.json()["error"] == "duplicate_id"
    for bad in (["a"], ["a", "a"], ["a", 3], "ab", ["", "b"]):
        r = env.http.post("/predict", json={"instances": _x(2), "ids": bad})
        assert r.status_code == 422 and r.json()["error"] == "bad_ids", (bad, r.text)
    # A model without label_ttl_seconds: ids echoed, nothing stored, /label refused.
    plain = env.http.post("/predict", json={"model": "plain", "instances": _x(1), "ids": ["p"]})
    assert plain.json()["predictions"][0]["id"] == "p"
    assert "stored_for_labels" not in plain.json()
    assert env.redis.exists(keys.prediction_key("plain", "p")) == 0
    off = env.http.post("/label", json={"model": "plain", "labels": [{"id": "p", "y": 1}]})
    assert off.status_code == 400 and off.json()["error"] == "labels_disabled"
    for body in ({"labels": []}, {"labels": [{"y": 1}]}, {"labels": "x"}):
        r = env.http.post("/label", json=body)
        assert r.status_code == 422, body


def test_expired_predictions_are_counted_once(env: Env) -> None:
    resp = env.http.post("/predict", json={"model": "short", "instances": _x(5)})
    ids = [p["id"] for p in resp.json()["predictions"]]
    ok = env.http.post("/label", json={"model": "short", "labels": [{"id": ids[0], "y": 1}]})
    assert ok.status_code == 202
    time.sleep(1.6)  # past the 0.4 s TTL and at least one sweep
    late = env.http.post("/label", json={"model": "short", "labels": [{"id": ids[1], "y": 1}]})
    assert late.status_code == 404
    m = env.metrics()
    assert metric_value(m, "normprop_served_expired_total", model="short") == 4
    assert metric_value(m, "normprop_served_labelled_total", model="short") == 1
    assert metric_value(m, "normprop_served_pending", model="short") == 0
    assert env.redis.zcard(keys.pending_predictions("short")) == 0


def test_regression_mae_and_shared_counters(env: Env) -> None:
    x = _x(4, f=4)
    body = env.http.post("/predict", json={"model": "reg", "instances": x}).json()
    targets = [[0.5, -1.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]
    labels = [{"id": p["id"], "y": t} for p, t in zip(body["predictions"], targets)]
    assert env.http.post("/label", json={"model": "reg", "labels": labels}).status_code == 202
    got = np.array([p["values"] for p in body["predictions"]])
    mae = float(np.abs(got - np.array(targets)).mean())
    m = env.metrics()
    assert metric_value(m, "normprop_served_mae", model="reg", scope="total") == pytest.approx(mae, rel=1e-5)
    assert metric_value(m, "normprop_served_mae", model="reg", scope="window") == pytest.approx(mae, rel=1e-5)
    assert metric_value(m, "normprop_served_accuracy", model="reg", scope="total") is None
    assert metric_value(m, "normprop_api_labels_total", model="reg", result="accepted") == 4
    hist = metric_value(m, "normprop_api_label_delay_seconds_count", model="reg")
    assert hist == 4


def test_served_accuracy_and_log_loss_match_the_responses(env: Env) -> None:
    start = env.redis.hgetall(keys.served_totals("default"))
    n0 = int(start.get(b"labelled", 0))
    c0 = int(start.get(b"correct", 0))
    body = env.http.post("/predict", json={"instances": _x(20, seed=5)}).json()
    rng = np.random.default_rng(1)
    ys = rng.integers(0, 3, size=20).tolist()
    resp = env.http.post("/label", json={"labels": [{"id": p["id"], "y": y} for p, y in
                                                    zip(body["predictions"], ys)]})
    assert resp.status_code == 202
    correct = sum(p["label"] == y for p, y in zip(body["predictions"], ys))
    m = env.metrics()
    n = metric_value(m, "normprop_served_labelled_total", model="default")
    c = metric_value(m, "normprop_served_correct_total", model="default")
    assert (n, c) == (n0 + 20, c0 + correct)
    assert metric_value(m, "normprop_served_accuracy", model="default", scope="total") == \
        pytest.approx((c0 + correct) / (n0 + 20))
    window = env.redis.lrange(keys.served_window("default"), 0, 19)
    loss = float(np.mean([-np.log(p["probabilities"][y]) for p, y in
                          zip(body["predictions"], ys)]))
    assert np.mean([float(w.split()[1]) for w in window]) == pytest.approx(loss, rel=1e-4)


def test_redis_down_predict_still_answers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    publish(SnapshotStore(data / "snapshots", CLS.name), CLS, 1)
    api = ApiProcess(np_env("redis://127.0.0.1:9/0", data, models=[CLS.model_dump(mode="json")],
                            redis_connect_timeout="0.2", redis_socket_timeout="0.2"),
                     tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        r = httpx.post(api.url + "/predict", json={"instances": _x(2)})
        assert r.status_code == 200 and r.json()["stored_for_labels"] is False
        lab = httpx.post(api.url + "/label", json={"labels": [{"id": "a", "y": 1}]})
        assert lab.status_code == 503 and lab.json()["error"] == "redis_unavailable"
        m = metric_samples(httpx.get(api.url + "/metrics").text)
        assert metric_value(m, "normprop_api_label_store_failures_total", model="default") == 2
    finally:
        api.stop()
