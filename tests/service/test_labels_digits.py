"""The online-learning loop end to end: digits through predict-then-label with random delays.

A real redis-server, the worker process and two API processes sharing them. Client threads
predict on one API and, after a random delay, label on either (some ids on both at once: the
join is atomic, exactly one wins). Then:

* the served-accuracy metric (from either API) equals the accuracy the client computes from the
  responses it received, and the labelled/expired counts match;
* every labelled id is trained exactly once: the worker's snapshot ledgers hold exactly the
  stream entries ``/label`` returned, each once, and ``samples_trained`` equals their number;
* the model learns from the labels alone (held-out accuracy well above chance after one pass).
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_api_support import ROOT, ApiProcess, free_port, stop_process, metric_samples, metric_value, np_env

from service.snapshots import SnapshotStore

MODEL = {"name": "default", "input_shape": [64], "num_classes": 10, "spec": "mlp:64",
         "max_batch": 16, "snapshot_every_seconds": 0.3, "snapshot_every_steps": 100,
         "keep_snapshots": 100_000, "label_ttl_seconds": 120}
CLIENTS = 4
PER_CLIENT = 300
BATCH = 4


def _digits() -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets as sklearn
    data = sklearn.load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    return data.data[order].astype(np.float32), data.target[order]


def test_predict_then_label_two_apis(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x_all, y_all = _digits()
    data = tmp_path / "data"
    env = np_env(redis_server.url, data, models=[MODEL], snapshot_poll_seconds="0.1",
                 worker_metrics_port=str(free_port()), torch_threads="1")
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT, env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT)
    apis = [ApiProcess(env, tmp_path / "api0.log"), ApiProcess(env, tmp_path / "api1.log")]
    lock = threading.Lock()
    served: dict[str, tuple[int, int]] = {}      # id -> (predicted label, true label)
    accepted: dict[str, str] = {}                # id -> stream entry ID
    conflicts: list[str] = []
    failures: list[str] = []
    raced = 0

    def client(c: int) -> None:
        nonlocal raced
        rng = random.Random(c)
        https = [httpx.Client(base_url=a.url, timeout=30) for a in apis]
        idx = list(range(c * PER_CLIENT, (c + 1) * PER_CLIENT))
        waiting: list[tuple[float, str, int]] = []
        try:
            for start in range(0, len(idx) + 1, BATCH):
                chunk = idx[start:start + BATCH]
                if chunk:
                    r = https[rng.randrange(2)].post(
                        "/predict", json={"instances": x_all[chunk].tolist()})
                    if r.status_code != 200:
                        failures.append(f"predict {r.status_code} {r.text[:200]}")
                        continue
                    for p, i in zip(r.json()["predictions"], chunk):
                        with lock:
                            served[p["id"]] = (p["label"], int(y_all[i]))
                        waiting.append((time.monotonic() + rng.uniform(0, 0.4), p["id"],
                                        int(y_all[i])))
                now = time.monotonic()
                due = [w for w in waiting if w[0] <= now or not chunk]
                waiting = [w for w in waiting if w not in due]
                if not due:
                    time.sleep(0.01)
                    continue
                if rng.random() < 0.15:
                    # The same label on both APIs at once: exactly one may join.
                    _, pid, y = due.pop()
                    out: list[httpx.Response] = []
                    ts = [threading.Thread(target=lambda h=h: out.append(
                        h.post("/label", json={"labels": [{"id": pid, "y": y}]})))
                        for h in https]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    codes = sorted(r.status_code for r in out)
                    with lock:
                        raced += 1
                        if codes != [202, 409]:
                            failures.append(f"race on {pid}: {codes}")
                        for r in out:
                            if r.status_code == 202:
                                accepted[pid] = r.json()["results"][0]["stream_id"]
                            else:
                                conflicts.append(pid)
                    if not due:
                        continue
                r = https[rng.randrange(2)].post(
                    "/label", json={"labels": [{"id": pid, "y": y} for _, pid, y in due]})
                if r.status_code != 202:
                    failures.append(f"label {r.status_code} {r.text[:200]}")
                    continue
                with lock:
                    for res in r.json()["results"]:
                        accepted[res["id"]] = res["stream_id"]
        finally:
            for h in https:
                h.close()

    try:
        for a in apis:
            a.wait_ready(path="/readyz", timeout=60)  # the worker published v1
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        elapsed = time.monotonic() - t0
        assert not failures, failures[:5]
        n = CLIENTS * PER_CLIENT
        assert len(served) == n and set(accepted) == set(served)
        assert raced > 0 and len(conflicts) == raced

        # Served accuracy: what the client saw, exactly, from either API.
        correct = sum(p == y for p, y in served.values())
        for a in apis:
            m = metric_samples(httpx.get(a.url + "/metrics").text)
            assert metric_value(m, "normprop_served_labelled_total", model="default") == n
            assert metric_value(m, "normprop_served_correct_total", model="default") == correct
            assert metric_value(m, "normprop_served_accuracy", model="default",
                                scope="total") == pytest.approx(correct / n, abs=1e-12)
            assert metric_value(m, "normprop_served_expired_total", model="default") == 0
            assert metric_value(m, "normprop_served_pending", model="default") == 0
        window_acc = metric_value(m, "normprop_served_accuracy", model="default", scope="window")
        print(f"\n{n} predict-then-label in {elapsed:.1f}s; served accuracy total "
              f"{correct / n:.3f}, window {window_acc:.3f}; {raced} raced labels")

        # Trained exactly once: wait for the worker to checkpoint everything labelled.
        store = SnapshotStore(data / "snapshots", "default")
        deadline = time.monotonic() + 60
        while True:
            latest = store.latest_version()
            meta = store.read_metadata(latest) if latest else {}
            if meta.get("samples_trained", 0) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert meta.get("samples_trained") == n, meta.get("samples_trained")
        ledger: list[str] = []
        for v in store.versions():
            ids = store.read(v).tensors.get("ledger.ids")
            if ids is not None:
                ledger += [f"{a}-{b}" for a, b in ids.tolist()]
        assert len(ledger) == len(set(ledger)) == n
        assert set(ledger) == set(accepted.values())
        assert sum(meta.get("dead_letters", {}).values()) == 0
        # The model learnt from the labels alone: held-out digits, newest version (chance 0.1).
        deadline = time.monotonic() + 10
        while httpx.get(apis[0].url + "/models/default").json()["version"] < latest:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        held_x, held_y = x_all[n:], y_all[n:]
        pred = httpx.post(apis[0].url + "/predict", json={"instances": held_x.tolist()},
                          timeout=30).json()["predictions"]
        held_acc = float(np.mean([p["label"] == t for p, t in zip(pred, held_y)]))
        print(f"held-out accuracy after one pass over {n} labels: {held_acc:.3f}")
        assert held_acc > 0.6  # one pass (0.89-0.93 measured with the default lr): far above chance
    finally:
        for a in apis:
            a.stop()
        stop_process(worker)
        worker_log.close()
