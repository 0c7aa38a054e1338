"""Helpers shared by the worker tests: settings for a small model, a running worker, waiting."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import redis

from service import keys
from service.codec import EntryCodec
from service.settings import ModelConfig, Settings
from service.worker import Worker

MODEL = "m"


def small_config(**overrides: Any) -> ModelConfig:
    """A small classifier on 8 features, quick to train on a shared 2-core machine."""
    base: dict[str, Any] = dict(name=MODEL, input_shape=[8], num_classes=3, spec="mlp:32,32",
                                max_batch=16, snapshot_every_steps=50,
                                snapshot_every_seconds=0.3)
    base.update(overrides)
    return ModelConfig(**base)


def make_settings(redis_url: str, data_dir: Path, config: ModelConfig | None = None,
                  **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(redis_url=redis_url, models=[config or small_config()],
                                data_dir=data_dir, worker_metrics_port=0, worker_block_ms=50,
                                lease_ttl_seconds=2.0, device="cpu", torch_threads=1,
                                consumer_name="test-worker", redis_retries=2,
                                redis_socket_timeout=2.0, redis_connect_timeout=0.5)
    base.update(overrides)
    return Settings(**base)


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, every: float = 0.02,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def trained_all(r: redis.Redis, store: Any, stream: str, n: int) -> bool:
    """The newest checkpoint counts ``n`` trained samples and the stream has nothing pending:
    what "the stream drained" means to the crash and fault tests."""
    latest = store.latest_version()
    if latest is None:
        return False
    meta = store.read_header_metadata(latest)
    return (meta.get("samples_trained") == n
            and r.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0)


@contextlib.contextmanager
def running_worker(settings: Settings) -> Iterator[Worker]:
    """A :class:`Worker` with its model threads running; stopped (gracefully) on exit."""
    stop = threading.Event()
    worker = Worker(settings, stop)
    worker.start()
    try:
        yield worker
    finally:
        stop.set()
        worker.join(30)


def synthetic(n: int, num_features: int = 8, num_classes: int = 3,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable-ish Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(num_classes, num_features))
    y = rng.integers(0, num_classes, size=n)
    x = centres[y] + rng.normal(0, 1, size=(n, num_features))
    return x.astype(np.float32), y


def push(r: redis.Redis, config: ModelConfig, x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """XADD samples (pipelined); returns their stream IDs."""
    codec = EntryCodec(config)
    pipe = r.pipeline(transaction=False)
    for xi, yi in zip(x, y):
        pipe.xadd(keys.samples_stream(config.name), codec.encode(xi, int(yi)))
    return list(pipe.execute())
