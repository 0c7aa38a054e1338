"""Redis down (killed, then frozen): predictions keep being served from the snapshot volume;
ingest answers 503 with Retry-After; both recover by themselves when Redis is back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from test_api_support import ApiProcess, metric_samples, metric_value, np_env, publish

from service import keys
from service.settings import ModelConfig
from service.snapshots import SnapshotStore

CFG = ModelConfig(name="default", input_shape=[64], num_classes=10, spec="mlp:32")
SAMPLE = {"x": [1.0] * 64, "y": 2}


def _redis_up(url: str) -> float | None:
    return metric_value(metric_samples(httpx.get(url + "/metrics").text), "normprop_api_redis_up")


def _outage(http: httpx.Client, seconds: float) -> tuple[int, list[int]]:
    """Predict and ingest for ``seconds``: (predictions served, ingest statuses)."""
    served, ingest = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        p = http.post("/predict", json={"instances": [[0.5] * 64]})
        assert p.status_code == 200, p.text
        served += 1
        i = http.post("/ingest", json={"samples": [SAMPLE]})
        ingest.append(i.status_code)
        if i.status_code == 503:
            assert int(i.headers["retry-after"]) >= 1
            assert i.json()["error"] == "redis_unavailable"
        time.sleep(0.05)
    return served, ingest


def _wait_for_ingest(http: httpx.Client, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if http.post("/ingest", json={"samples": [SAMPLE]}).status_code == 202:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"ingest did not recover within {timeout}s")


def test_redis_outage_keeps_predictions_and_recovers(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    publish(SnapshotStore(tmp_path / "data" / "snapshots", CFG.name), CFG, 1)
    env = np_env(redis_server.url, tmp_path / "data", models=[CFG.model_dump(mode="json")],
                 redis_socket_timeout="0.5", redis_connect_timeout="0.5")
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        http = httpx.Client(base_url=api.url, timeout=10)
        assert http.post("/ingest", json={"samples": [SAMPLE]}).status_code == 202

        # 1. Killed (connection refused).
        redis_server.kill()
        served, ingest = _outage(http, 3.0)
        assert served > 10 and ingest and set(ingest) == {503}, ingest
        assert _redis_up(api.url) == 0
        assert http.get("/readyz").status_code == 200  # serving does not depend on Redis
        redis_server.start()
        recovered = _wait_for_ingest(http, 10)
        assert _redis_up(api.url) == 1

        # 2. Frozen (SIGSTOP: connections hang, the worst case for timeouts).
        redis_server.pause()
        try:
            t0 = time.monotonic()
            served, ingest = _outage(http, 3.0)
            assert served > 5, served
            assert ingest.count(202) <= 1 and 503 in ingest, ingest
            assert time.monotonic() - t0 < 8  # each 503 came within the socket timeout
        finally:
            redis_server.resume()
        _wait_for_ingest(http, 10)
        assert _redis_up(api.url) == 1
        print(f"\ningest recovered {recovered:.2f}s after Redis restarted")

        import redis as redis_lib
        client = redis_lib.Redis.from_url(redis_server.url)
        assert client.xlen(keys.samples_stream("default")) >= 2
        client.close()
        m = metric_samples(http.get("/metrics").text)
        assert metric_value(m, "normprop_api_ingest_rejected_total", model="default",
                            reason="redis_unavailable") >= 2
        http.close()
    finally:
        api.stop()
