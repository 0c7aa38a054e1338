"""End to end on scikit-learn's digits: real redis-server, the worker process and the API process.

Half of the training samples go through ``POST /ingest``, half through raw XADD (the JSON ``x``
field, as ``redis-cli`` would write them). While the worker trains, concurrent ``/predict``
calls all succeed and the version they report rises; once the stream is drained, the served
model's held-out accuracy is at least 90%.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from test_api_support import ROOT, ApiProcess, free_port, stop_process, np_env

from service import keys

EPOCHS = 3
MODEL = {"name": "default", "input_shape": [64], "num_classes": 10, "spec": "mlp:256,256",
         "max_batch": 16, "snapshot_every_seconds": 0.5, "snapshot_every_steps": 100}


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import sklearn.datasets as sklearn
    data = sklearn.load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.target))
    x, y = data.data[order].astype(np.float32), data.target[order]
    n_test = 360
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def test_digits_end_to_end(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x_train, y_train, x_test, y_test = _digits()
    env = np_env(redis_server.url, tmp_path / "data", models=[MODEL],
                 snapshot_poll_seconds="0.1", worker_metrics_port=str(free_port()),
                 max_backlog="100000",
                 # One torch thread: OpenMP threads spin-waiting on a busy 2-core machine made
                 # the worker's steps ~10x slower.
                 torch_threads="1")
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT, env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT)
    api = ApiProcess(env, tmp_path / "api.log")
    client = redis.Redis.from_url(redis_server.url)
    stop = threading.Event()
    per_thread: list[list[int]] = [[], [], []]
    failures: list[str] = []

    def predictor(observed: list[int]) -> None:
        with httpx.Client(base_url=api.url, timeout=10) as http:
            while not stop.is_set():
                r = http.post("/predict", json={"instances": x_test[:4].tolist()})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    observed.append(r.json()["version"])
                time.sleep(0.01)

    threads = [threading.Thread(target=predictor, args=(seen,)) for seen in per_thread]
    try:
        api.wait_ready(path="/readyz", timeout=60)  # the worker published v1
        for t in threads:
            t.start()
        t0 = time.monotonic()
        half = len(x_train) // 2
        stream = keys.samples_stream("default")
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for _ in range(EPOCHS):
                # Interleave the two producers so both halves are trained every epoch.
                chunks = -(-half // 100)
                for via_api, via_xadd in zip(np.array_split(np.arange(half), chunks),
                                             np.array_split(np.arange(half, len(x_train)),
                                                            chunks)):
                    samples = [{"x": x_train[i].tolist(), "y": int(y_train[i])} for i in via_api]
                    r = http.post("/ingest", json={"model": "default", "samples": samples})
                    assert r.status_code == 202, r.text
                    assert r.json()["accepted"] == len(samples)
                    pipe = client.pipeline(transaction=False)
                    for i in via_xadd:
                        pipe.xadd(stream, {"x": json.dumps(x_train[i].tolist()),
                                           "y": str(int(y_train[i]))})
                    pipe.execute()
                    time.sleep(0.02)
        total = EPOCHS * len(x_train)
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=api.url, timeout=30) as http:
            while True:
                info = http.get("/models/default").json()
                if (info["samples_trained"] or 0) >= total:
                    break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, info
                time.sleep(0.3)
            elapsed = time.monotonic() - t0
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(10)
            pred = http.post("/predict", json={"instances": x_test.tolist()}).json()
        observed = [v for seen in per_thread for v in seen]
        labels = np.array([p["label"] for p in pred["predictions"]])
        accuracy = float((labels == y_test).mean())
        print(f"\ndigits: {total} samples trained in {elapsed:.1f}s, served v{pred['version']}, "
              f"held-out accuracy {accuracy:.3f}, {len(observed)} concurrent predictions, "
              f"versions {min(observed)}..{max(observed)}, prequential {info['prequential']}")
        assert not failures, failures[:5]
        assert len(observed) > 20
        for seen in per_thread:  # each client saw the version rise, never fall
            assert seen == sorted(seen) and seen[-1] > seen[0]
        assert info["samples_trained"] == total  # each sample trained exactly once
        assert accuracy >= 0.90
    finally:
        stop.set()
        api.stop()
        stop_process(worker)
        worker_log.close()
        client.close()
