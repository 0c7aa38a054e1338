"""Helpers for the hostile-input and security tests (no tests here): a real uvicorn API with
three models and all three API keys, against a private redis-server, and the stream lengths
that prove nothing was written.

The service helpers live in ``tests/service`` (``test_api_support``); this directory has no
``__init__.py``, so that directory is put on ``sys.path`` here, once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import redis

_SERVICE_TESTS = str(Path(__file__).resolve().parents[1] / "service")
if _SERVICE_TESTS not in sys.path:
    sys.path.insert(0, _SERVICE_TESTS)

from test_api_support import (ROOT, ApiProcess, free_port, metric_samples,  # noqa: E402
                              np_env, publish, shared_conftest)

from service import keys  # noqa: E402
from service.settings import ModelConfig  # noqa: E402
from service.snapshots import SnapshotStore  # noqa: E402

INGEST_KEY = "ingest-key-7f3a9c1e5b"
ADMIN_KEY = "admin-key-2d8e4b6a0c"
PREDICT_KEY = "predict-key-9b1c3e5d7f"
KEYS = {"ingest": INGEST_KEY, "admin": ADMIN_KEY, "predict": PREDICT_KEY}

#: Class indices, with delayed labels (so /label joins for real).
DEFAULT = ModelConfig(name="default", input_shape=[4], num_classes=3, spec="mlp:8",
                      label_ttl_seconds=600)
#: Regression with two targets.
REG = ModelConfig(name="reg", input_shape=[3], task="regression", num_targets=2, spec="mlp:8")
#: An open label set of strings, with delayed labels.
OPEN = ModelConfig(name="open", input_shape=[2, 2], classes=["cat", "dog"], open_classes=True,
                   max_classes=4, spec="mlp:8", label_ttl_seconds=600)
MODELS = (DEFAULT, REG, OPEN)


class UvicornApi(ApiProcess):
    """:class:`ApiProcess` with a chosen log level and extra uvicorn arguments."""

    def __init__(self, env: dict[str, str], log_path: Path, log_level: str = "warning",
                 extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.api:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", log_level,
             *(extra_args if extra_args is not None else ["--no-access-log"])],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)


def key_for(path: str) -> str | None:
    """Which role's key a route needs (None: no key)."""
    if path in ("/ingest", "/label"):
        return "ingest"
    if path.startswith("/admin/"):
        return "admin"
    if path == "/predict":
        return "predict"
    return None


@dataclass
class LiveApi:
    proc: UvicornApi
    url: str
    redis: redis.Redis
    data_dir: Path
    http: httpx.Client

    def stream_len(self, model: str = "default") -> int:
        return int(self.redis.xlen(keys.samples_stream(model)))

    def dead_len(self, model: str = "default") -> int:
        return int(self.redis.xlen(keys.dead_letter_stream(model)))

    def lengths(self) -> dict[str, tuple[int, int]]:
        """(samples, dead letters) of every model's streams."""
        return {m.name: (self.stream_len(m.name), self.dead_len(m.name)) for m in MODELS}

    def requests_by_status(self) -> dict[int, int]:
        """Requests the API answered so far, by status, from its own latency histogram."""
        samples = metric_samples(self.http.get("/metrics").text)
        out: dict[int, int] = {}
        for labels, value in samples.get("normprop_api_request_duration_seconds_count", []):
            status = int(labels["status"])
            out[status] = out.get(status, 0) + int(value)
        return dict(sorted(out.items()))


@contextlib.contextmanager
def live_api(request: pytest.FixtureRequest, tmp: Path, log_level: str = "warning",
             uvicorn_args: list[str] | None = None, **extra: Any) -> Iterator[LiveApi]:
    """redis-server + ``python -m uvicorn --factory service.api:create_app`` with
    :data:`MODELS` (version 1 of each published) and the three API keys."""
    server = shared_conftest(request.config).RedisServer(tmp / "redis", appendonly=False)
    server.start()
    data_dir = tmp / "data"
    for cfg in MODELS:
        meta: dict[str, Any] = {}
        if cfg.label_set != "indices":
            meta = {"label_map": list(cfg.classes or []), "output_units": cfg.num_outputs}
        publish(SnapshotStore(data_dir / "snapshots", cfg.name), cfg, 1, **meta)
    env = np_env(server.url, data_dir, models=[m.model_dump(mode="json") for m in MODELS],
                 ingest_api_key=INGEST_KEY, admin_api_key=ADMIN_KEY,
                 predict_api_key=PREDICT_KEY, **extra)
    proc = UvicornApi(env, tmp / "api.log", log_level, uvicorn_args)
    client = redis.Redis.from_url(server.url)
    http = httpx.Client(base_url=proc.url, timeout=30)
    try:
        proc.wait_ready(path="/readyz")
        yield LiveApi(proc, proc.url, client, data_dir, http)
    finally:
        http.close()
        proc.stop()
        client.close()
        server.kill()


def assert_json_error(resp: httpx.Response, status: int, code: str | None = None
                      ) -> dict[str, Any]:
    """A JSON error body ``{"error": code, "message": ...}`` with this status."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and len(body["message"]) > 10, body
    if code is not None:
        assert body["error"] == code, body
    return body
