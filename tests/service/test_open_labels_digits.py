"""Class-incremental digits: the worker process learns a class that first appears after 2,000
samples, keeps the other classes' accuracy, and keeps its label map across a kill -9.

Labels are the digits' names ("zero", ..., "nine") on an open label set. "nine" first appears
after 2,000 samples of the other nine classes; then the stream mixes it in at its natural share
(one sample in ten) until 1,000 of it have streamed. The worker is killed (SIGKILL) mid-stream once a
checkpoint holds "nine", and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import redis
import torch

from service import keys
from service.codec import EntryCodec
from service.settings import ModelConfig
from service.snapshots import SnapshotStore, load_network

from worker_helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NEW = 9
FIRST_PHASE = 2000
NEW_SAMPLES = 1000
CFG = ModelConfig(name="digits", input_shape=[64], open_classes=True, max_classes=10,
                  spec="mlp:128,128", max_batch=16, snapshot_every_seconds=0.3,
                  snapshot_every_steps=50, keep_snapshots=1000)


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import sklearn.datasets as sklearn
    data = sklearn.load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x, y = data.data[order].astype(np.float32), data.target[order]
    return x[360:], y[360:], x[:360], y[:360]


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def _predict(store: SnapshotStore, version: int, x: np.ndarray) -> list[str]:
    snap = store.read(version)
    net = load_network(snap, CFG)
    labels = snap.metadata["label_map"]
    with torch.no_grad():
        out = net(torch.from_numpy(x))[:, :len(labels)]
    return [labels[i] for i in out.argmax(1).tolist()]


def _push(r: redis.Redis, codec: EntryCodec, x: np.ndarray, y: np.ndarray) -> None:
    pipe = r.pipeline(transaction=False)
    for xi, yi in zip(x, y):
        pipe.xadd(keys.samples_stream(CFG.name), codec.encode(xi, NAMES[int(yi)]))
    pipe.execute()


def _latest(store: SnapshotStore) -> dict:
    v = store.latest_version()
    return store.read_header_metadata(v) if v else {}


def test_a_class_appearing_late_is_learned_and_kept_across_kill9(redis_server,
                                                                 tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = _digits()
    rng = np.random.default_rng(1)
    old_idx = np.flatnonzero(y_train != NEW)
    new_idx = np.flatnonzero(y_train == NEW)
    phase1 = rng.choice(old_idx, FIRST_PHASE)
    # Phase 2: 1,000 of the new class, each followed by nine of the others (the new class at
    # its natural share; oversampling it would make the model over-predict it).
    phase2 = np.stack([rng.choice(new_idx, NEW_SAMPLES)] +
                      [rng.choice(old_idx, NEW_SAMPLES) for _ in range(9)], 1).reshape(-1)
    env = dict(os.environ, NP_REDIS_URL=redis_server.url, NP_MODELS=json.dumps([CFG.model_dump()]),
               NP_DATA_DIR=str(tmp_path / "data"), NP_WORKER_METRICS_PORT="0", NP_DEVICE="cpu",
               NP_TORCH_THREADS="1", NP_WORKER_BLOCK_MS="50", NP_LEASE_TTL_SECONDS="1",
               NP_CONSUMER_NAME="w", PYTHONPATH=str(ROOT))
    r = redis.Redis.from_url(redis_server.url)
    codec = EntryCodec(CFG)
    store = SnapshotStore(tmp_path / "data" / "snapshots", CFG.name)
    log = tmp_path / "worker.log"
    worker = _spawn(env, log)
    try:
        _push(r, codec, x_train[phase1], y_train[phase1])
        wait_until(lambda: _latest(store).get("samples_trained") == FIRST_PHASE, timeout=120,
                   every=0.1, what="phase 1 trained")
        before = store.latest_version()
        assert before is not None
        meta = store.read_header_metadata(before)
        assert sorted(meta["label_map"]) == sorted(NAMES[:NEW]) and meta["output_units"] == 9
        old_test = y_test != NEW
        pred_before = _predict(store, before, x_test[old_test])
        acc_before = np.mean([p == NAMES[t] for p, t in zip(pred_before, y_test[old_test])])
        assert acc_before > 0.85, acc_before

        # The new class arrives; once a checkpoint has it, kill -9 mid-stream.
        half = len(phase2) // 2
        _push(r, codec, x_train[phase2[:half]], y_train[phase2[:half]])
        wait_until(lambda: "nine" in _latest(store).get("label_map", []), timeout=60,
                   every=0.05, what="a checkpoint with the new class")
        map_at_kill = _latest(store)["label_map"]
        assert map_at_kill == meta["label_map"] + ["nine"]
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        _push(r, codec, x_train[phase2[half:]], y_train[phase2[half:]])
        # One label past max_classes=10: dead-lettered, the layer does not grow.
        r.xadd(keys.samples_stream(CFG.name), {"x": json.dumps([0.0] * 64), "y": "ten"})
        worker = _spawn(env, log)
        total = FIRST_PHASE + len(phase2)
        wait_until(lambda: _latest(store).get("samples_trained") == total, timeout=180,
                   every=0.1, what="phase 2 trained")
        final = store.latest_version()
        assert final is not None
        meta = store.read_header_metadata(final)
        assert meta["label_map"] == map_at_kill and meta["output_units"] == 10
        wait_until(lambda: r.hget(keys.dead_letter_counts(CFG.name), "too_many_classes") == b"1",
                   what="the dead letter")

        pred = _predict(store, final, x_test)
        new_mask = y_test == NEW
        recall = np.mean([p == "nine" for p in np.array(pred)[new_mask]])
        assert recall >= 0.8, recall
        acc_after = np.mean([p == NAMES[t] for p, t in zip(np.array(pred)[old_test],
                                                           y_test[old_test])])
        assert acc_after >= acc_before - 0.02, (acc_before, acc_after)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
