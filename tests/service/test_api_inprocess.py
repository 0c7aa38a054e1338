"""The app factory in-process (``create_app(settings)`` with a test's own settings): readiness
before the first snapshot, the predict key, CORS when configured, and the metrics helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_support import publish

from service.api import create_app
from service.api_metrics import layer_stats_summary
from service.settings import ModelConfig, Settings
from service.snapshots import SnapshotStore

CFG = ModelConfig(name="default", input_shape=[6], num_classes=3, spec="mlp:8")


def _settings(tmp_path: Path, **kw: object) -> Settings:
    # A closed port: these tests never touch Redis.
    return Settings(data_dir=tmp_path, models=[CFG], redis_url="redis://127.0.0.1:9/0",
                    redis_connect_timeout=0.2, redis_socket_timeout=0.2, **kw)


def test_not_ready_until_the_first_snapshot(tmp_path: Path) -> None:
    settings = _settings(tmp_path, admin_api_key="adm")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"] == {"default": None}
        assert client.get("/healthz").status_code == 200
        resp = client.post("/predict", json={"instances": [[0.0] * 6]})
        assert resp.status_code == 503 and resp.json()["error"] == "not_ready"
        assert resp.headers["retry-after"] == "1"
        # Ingest with Redis unreachable: 503, never a 500.
        down = client.post("/ingest", json={"samples": [{"x": [0.0] * 6, "y": 1}]})
        assert down.status_code == 503 and down.json()["error"] == "redis_unavailable"

        publish(SnapshotStore(settings.snapshot_dir, "default"), CFG, 1)
        info = client.post("/admin/models/default/reload", headers={"Authorization": "Bearer adm"})
        assert info.status_code == 200 and info.json()["version"] == 1
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", json={"instances": [[0.0] * 6]}).json()["version"] == 1


def test_predict_key_and_cors(tmp_path: Path) -> None:
    publish(SnapshotStore(tmp_path / "snapshots", "default"), CFG, 2)
    settings = _settings(tmp_path, predict_api_key="p-key",
                         cors_origins=["https://app.example"])
    body = {"instances": [[1.0] * 6]}
    with TestClient(create_app(settings)) as client:
        assert client.post("/predict", json=body).status_code == 401
        assert client.post("/predict", json=body, headers={"X-API-Key": "nope"}).status_code == 403
        ok = client.post("/predict", json=body, headers={"X-API-Key": "p-key",
                                                         "Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.json()["version"] == 2
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        pre = client.options("/predict", headers={"Origin": "https://app.example",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "X-API-Key"})
        assert pre.status_code == 200
        other = client.post("/predict", json=body, headers={"X-API-Key": "p-key",
                                                            "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("stats,expected", [
    ([{"name": "a", "mean": 0.1, "std": 1.0}], [("a", 0.1, 1.0)]),
    ([{"layer": "b", "mean": [0.0, 0.2], "std": [1.0, 3.0]}], [("b", 0.1, 2.0)]),
    ({"c": {"mean": 0.5, "std": None}}, [("c", 0.5, None)]),
    ("garbage", []),
    ([1, 2], []),
])
def test_layer_stats_summary_takes_any_shape(stats: object, expected: list[tuple]) -> None:
    assert layer_stats_summary(stats) == expected


def test_log_level_setting_reaches_the_service_loggers(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import logging

    create_app(_settings(tmp_path, log_level="warning"))
    assert logging.getLogger("service").getEffectiveLevel() == logging.WARNING
    create_app(_settings(tmp_path, log_level="DEBUG"))
    assert logging.getLogger("service.api").isEnabledFor(logging.DEBUG)
    with pytest.raises(ValueError, match="log_level"):
        _settings(tmp_path, log_level="loud")
