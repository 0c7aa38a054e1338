"""Crash safety: kill -9 the worker process repeatedly while samples stream in.

The proof is from the checkpoints, not from timing: every version names its parent, and the
ledgers along that chain list each trained stream ID; over the whole run they must list every
accepted ID exactly once, the dead-letter stream every malformed one exactly once, nothing may
stay pending, and the stream must be trimmed below the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from service import keys
from service.codec import EntryCodec
from service.snapshots import SnapshotStore

from worker_helpers import MODEL, small_config, synthetic, trained_all, wait_until

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 5000
BAD_EVERY = 100  # every 100th entry is malformed


def _spawn(env: dict[str, str], name: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT,
                            env=env | {"NP_CONSUMER_NAME": name},
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def test_kill9_repeatedly_trains_each_sample_exactly_once(redis_server, tmp_path: Path) -> None:
    cfg = small_config(max_batch=32, snapshot_every_steps=25, snapshot_every_seconds=0.2,
                       keep_snapshots=100_000)
    data_dir = tmp_path / "data"
    env = dict(os.environ,
               NP_REDIS_URL=redis_server.url, NP_MODELS=json.dumps([cfg.model_dump()]),
               NP_DATA_DIR=str(data_dir), NP_WORKER_METRICS_PORT="0", NP_DEVICE="cpu",
               NP_TORCH_THREADS="1", NP_WORKER_BLOCK_MS="50", NP_LEASE_TTL_SECONDS="1",
               NP_REDIS_RETRIES="2", NP_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT))
    r = redis.Redis.from_url(redis_server.url)
    stream = keys.samples_stream(MODEL)
    codec = EntryCodec(cfg)
    x, y = synthetic(TOTAL, seed=1)
    good_ids: list[bytes] = []
    bad_ids: list[bytes] = []
    rng = random.Random(20240601)

    def produce() -> None:
        # Bursts of 1..40 entries with pauses: trickles and backlogs both happen.
        pr = redis.Redis.from_url(redis_server.url)
        i = 0
        while i < TOTAL:
            burst = min(TOTAL - i, rng.randint(1, 40))
            pipe = pr.pipeline(transaction=False)
            kinds = []
            for j in range(i, i + burst):
                if j % BAD_EVERY == BAD_EVERY - 1:
                    pipe.xadd(stream, {"x": "[1, 2]", "y": "0"})
                    kinds.append(False)
                else:
                    pipe.xadd(stream, codec.encode(x[j], int(y[j])))
                    kinds.append(True)
            for ok, eid in zip(kinds, pipe.execute()):
                (good_ids if ok else bad_ids).append(eid)
            i += burst
            time.sleep(rng.uniform(0.02, 0.14))  # about 250 samples/s for ~20 s

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    log = tmp_path / "worker.log"
    kills = kills_mid_training = 0
    store = SnapshotStore(data_dir / "snapshots", MODEL)
    try:
        for attempt in range(6):
            name = f"w{attempt}"
            proc = _spawn(env, name, log)
            # Wait until this incarnation holds the lease (it is past start-up and training),
            # then kill it at a random moment.
            wait_until(lambda: r.get(keys.lease_key(MODEL)) == name.encode() or
                       proc.poll() is not None, timeout=60, what=f"{name} takes the lease")
            assert proc.poll() is None, log.read_text()[-3000:]
            first = store.latest_version() or 0
            time.sleep(rng.uniform(0.05, 2.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            if (store.latest_version() or 0) > first:
                kills_mid_training += 1
        assert kills >= 5
        assert kills_mid_training >= 3  # killed while it was training and checkpointing
        producer.join(120)
        assert not producer.is_alive()

        proc = _spawn(env, "final", log)
        wait_until(lambda: r.get(keys.lease_key(MODEL)) == b"final", timeout=60,
                   what="the last worker takes the lease")

        def drained() -> bool:
            return trained_all(r, store, stream, len(good_ids))

        wait_until(drained, timeout=120, every=0.2, what="the stream drained")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    # The chain of versions, newest to oldest, covers every version on disk.
    versions = store.versions()
    chain = []
    v = store.latest_version()
    while v is not None:
        meta = store.read_metadata(v)
        chain.append(v)
        v = meta["parent_version"]
    assert sorted(chain) == versions, (chain, versions)
    trained: list[tuple[int, int]] = []
    for v in versions:
        trained += [tuple(row) for row in store.read(v).tensors["ledger.ids"].tolist()]
    expected = {tuple(int(p) for p in eid.split(b"-")) for eid in good_ids}
    assert len(trained) == len(set(trained)), "a stream ID was trained twice"
    assert set(trained) == expected, "an accepted sample was never trained"
    meta = store.read_metadata(versions[-1])
    assert meta["samples_trained"] == len(good_ids) == TOTAL - TOTAL // BAD_EVERY
    assert meta["dead_letters"]["wrong_length"] == len(bad_ids)
    dead_sources = [f[b"source_id"] for _, f in r.xrange(keys.dead_letter_stream(MODEL))]
    assert sorted(dead_sources) == sorted(bad_ids)  # each once
    assert r.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0
    # Trimmed below what the newest checkpoint covers, never by length: nothing older is left.
    last = tuple(int(p) for p in meta["last_stream_id"].split("-"))
    remaining = [tuple(int(p) for p in eid.split(b"-")) for eid, _ in r.xrange(stream)]
    assert all(eid > last for eid in remaining)
    assert r.xlen(stream) == 0
