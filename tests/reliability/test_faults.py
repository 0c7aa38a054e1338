"""Fault injection against real processes: redis-server, ``python -m service.worker`` and the
uvicorn API, killed, frozen and restarted while samples stream in and clients predict.

Every claim is counted from the service's own records, never from timing: the worker's
checkpoints name their parent version and list the stream IDs they trained (the ledger), so
the ledgers along the chain from the newest version list every trained ID; retention deletes
old versions, so :class:`Archiver` hard-links each version as it appears. What the tests
measure (injections, losses, recovery times) is printed; run with ``-s`` to see it::

    python3 -m pytest -q -s tests/reliability/test_faults.py

1. the worker SIGKILLed 12 times under 20,000+ samples: 3 mid-checkpoint-write, 3 between a
   checkpoint and its XACK (the ``NP_FAULT_SNAPSHOT_WRITE_DELAY_SECONDS`` hook in
   service/snapshots.py holds each window open), 6 at random moments; retention checked;
2. Redis SIGKILLed and restarted from its AOF; then a host crash: Redis and the worker killed,
   Redis restarted from an AOF one second older (what ``appendfsync everysec`` can lose), under
   load, with /predict in a loop;
3. Redis frozen (SIGSTOP) for 10 s, then resumed, with a MONITOR counting every write;
4. the API SIGKILLed and restarted 3 times under prediction load while the worker publishes;
5. Redis stalled just past the socket timeout: a retried write runs twice in Redis, and the
   worker's dead-letter write still counts once.

Checkpoints in tests 2-4 are time-based (every 0.25 s): a version then lives at least
``keep_snapshots`` x 0.25 s, ample for the archiver to link it.
"""

from __future__ import annotations

import random
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from _fault_helpers import (Archiver, Monitor, Predictor, Producer, free_port, service_env,
                            sid, spawn_worker, tail, trained_ids, worker_gauge)
from test_api_support import ApiProcess
from worker_helpers import MODEL, small_config, synthetic, trained_all, wait_until

from service import keys
from service.codec import EntryCodec
from service.snapshots import SnapshotStore, load_network

STREAM = keys.samples_stream(MODEL)


def _covered(r: redis.Redis, store: SnapshotStore, newest_id: object) -> bool:
    """Nothing pending, no lag, and the newest checkpoint reaches ``newest_id``."""
    groups = r.xinfo_groups(STREAM)
    latest = store.latest_version()
    return bool(r.xpending(STREAM, keys.CONSUMER_GROUP)["pending"] == 0
                and groups and groups[0]["lag"] == 0 and latest is not None
                and sid(store.read_header_metadata(latest)["last_stream_id"]) >= newest_id)
DEAD = keys.dead_letter_stream(MODEL)


def _report(title: str, **numbers: object) -> None:
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


def _malformed(kind: int, codec: EntryCodec, x: np.ndarray) -> tuple[dict[str, bytes], str]:
    """Three malformed entries a producer might write: (fields, expected dead-letter reason).
    The first goes through EntryCodec's slow path, the other two through the packed lane."""
    if kind == 0:
        return {b"x": b"[1, 2]", b"y": b"0"}, "wrong_length"
    if kind == 1:
        bad = x.astype("<f4").copy()
        bad[3] = np.nan
        return {b"xb": bad.tobytes(), b"y": b"1"}, "nonfinite"
    return {b"xb": x.astype("<f4").tobytes(), b"y": b"7"}, "label_out_of_range"


# -- 1. worker SIGKILL, mid-write included ----------------------------------------------------

WORKER_TOTAL = 20_000
WORKER_BAD_EVERY = 250          # 80 malformed entries
WORKER_KILLS = 12
# Incarnations run with the snapshot write-delay hook, killed in one of its two windows:
MID_WRITE_KILLS = {1, 5, 9}      # temporary file written and fsynced, not renamed yet
AFTER_WRITE_KILLS = {3, 7, 11}   # version published (LATEST), its entries not acked yet
KEEP = 4


def test_worker_sigkill_mid_write_exactly_once(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t_start = time.monotonic()
    cfg = small_config(max_batch=64, snapshot_every_steps=100, snapshot_every_seconds=0.25,
                       keep_snapshots=KEEP)
    data_dir = tmp_path / "data"
    env = service_env(redis_server.url, data_dir, cfg)
    store = SnapshotStore(data_dir / "snapshots", MODEL)
    archive = tmp_path / "archive" / MODEL
    r = redis.Redis.from_url(redis_server.url)
    codec = EntryCodec(cfg)
    x, y = synthetic(WORKER_TOTAL, seed=5)
    good_ids: list[bytes] = []
    bad: dict[bytes, str] = {}
    rng = random.Random(20260501)
    produced = threading.Event()
    kills_done = threading.Event()
    total = [0]

    def produce() -> None:
        # Bursts of 1..120 entries: trickles (batch 1) and backlogs (packed reads) both happen.
        # At least WORKER_TOTAL entries, and on until the last kill: a hooked incarnation needs
        # something to train, or it never starts the checkpoint write it is to be killed in.
        pr = redis.Redis.from_url(redis_server.url)
        i = 0
        while i < WORKER_TOTAL or not kills_done.is_set():
            burst = rng.randint(1, 120)
            if i < WORKER_TOTAL:
                burst = min(WORKER_TOTAL - i, burst)
            pipe = pr.pipeline(transaction=False)
            reasons: list[str | None] = []
            for j in range(i, i + burst):
                xj, yj = x[j % WORKER_TOTAL], int(y[j % WORKER_TOTAL])
                if j % WORKER_BAD_EVERY == WORKER_BAD_EVERY - 1:
                    fields, reason = _malformed(j // WORKER_BAD_EVERY % 3, codec, xj)
                    pipe.xadd(STREAM, fields)
                    reasons.append(reason)
                else:
                    # Mostly the binary form; every 7th in the JSON form (EntryCodec's path).
                    pipe.xadd(STREAM, codec.encode(xj, yj, binary=j % 7 != 0))
                    reasons.append(None)
            for reason, eid in zip(reasons, pipe.execute()):
                if reason is None:
                    good_ids.append(eid)
                else:
                    bad[eid] = reason
            i += burst
            time.sleep(rng.uniform(0.02, 0.18))  # ~600 samples/s
        total[0] = i
        pr.close()
        produced.set()

    log = tmp_path / "worker.log"
    kills: list[dict[str, object]] = []
    pinned: int | None = None
    tmp_seen: dict[str, float] = {}  # temporary file -> when a kill left it

    def temp_files() -> set[str]:
        return {p.name for p in store.dir.glob(".tmp-*.safetensors")}

    producer = threading.Thread(target=produce, daemon=True)
    proc = None
    with Archiver(store, archive) as archiver:
        producer.start()
        try:
            for k in range(WORKER_KILLS):
                name = f"w{k}"
                hooked = k in MID_WRITE_KILLS | AFTER_WRITE_KILLS
                extra = {"NP_FAULT_SNAPSHOT_WRITE_DELAY_SECONDS": "0.6"} if hooked else {}
                t_spawn = time.monotonic()
                proc = spawn_worker(env, name, log, **extra)
                wait_until(lambda: r.get(keys.lease_key(MODEL)) == name.encode()
                           or proc.poll() is not None, timeout=60, what=f"{name} takes the lease")
                assert proc.poll() is None, tail(log)
                t_lease = time.monotonic()
                latest_at_lease = store.latest_version() or 0
                before = temp_files()
                if hooked:
                    # The hook holds the fsynced temporary file for 0.6 s before its rename...
                    wait_until(lambda: bool(temp_files() - before), timeout=30, every=0.002,
                               what=f"{name} starts a checkpoint write")
                    if k in AFTER_WRITE_KILLS:
                        # ... and sleeps 0.6 s after LATEST names the new version.
                        writing = temp_files() - before
                        wait_until(lambda: not (writing & temp_files())
                                   and (store.latest_version() or 0) > latest_at_lease,
                                   timeout=10, every=0.002, what=f"{name} publishes")
                else:
                    time.sleep(rng.uniform(0.05, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                left = temp_files() - before
                tmp_seen.update(dict.fromkeys(left - tmp_seen.keys(), time.time()))
                latest = store.latest_version()
                # LATEST names a whole, valid version whatever the moment of the kill.
                assert latest is not None
                snap = store.read(latest)
                load_network(snap, cfg)
                # Evidence of a kill between a checkpoint's write and its XACK: entries the
                # newest ledger covers are still pending (the next worker acks and skips them).
                pending = {e["message_id"] for e in r.xpending_range(
                    STREAM, keys.CONSUMER_GROUP, "-", "+", 100_000)}
                covered = {f"{a}-{b}".encode() for a, b in snap.tensors["ledger.ids"].tolist()}
                kills.append({"name": name, "window": "mid_write" if k in MID_WRITE_KILLS else
                              "after_write" if k in AFTER_WRITE_KILLS else "random",
                              "mid_write": bool(left),
                              "start_s": round(t_lease - t_spawn, 2), "latest": latest,
                              "published": latest - latest_at_lease,
                              "pending": len(pending), "covered_unacked": len(pending & covered)})
                if k == 3 and pinned is None:
                    pinned = store.latest_version()
                    assert pinned is not None
                    store.pin(pinned)  # retention must keep it, whatever keep_snapshots says
            kills_done.set()
            assert produced.wait(120), "the producer did not finish"
            t_final = time.monotonic()
            proc = spawn_worker(env, "final", log)
            wait_until(lambda: r.get(keys.lease_key(MODEL)) == b"final", timeout=60,
                       what="the last worker takes the lease")

            def drained() -> bool:
                return trained_all(r, store, STREAM, len(good_ids))

            wait_until(drained, timeout=120, every=0.1, what="the stream drained")
            drain_s = time.monotonic() - t_final
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, tail(log)
        finally:
            kills_done.set()  # a failure above must not leave the producer running
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)

    # Kills: at least 10; each hooked one landed in its window (the evidence: a temporary file
    # left behind; or a published checkpoint whose entries are still pending).
    mid = [k for k in kills if k["mid_write"]]
    after = [k for k in kills if k["covered_unacked"]]
    assert len(kills) >= 10
    assert all(k["mid_write"] for k in kills if k["window"] == "mid_write"), kills
    assert all(k["covered_unacked"] for k in kills if k["window"] == "after_write"), kills
    assert len(mid) >= len(MID_WRITE_KILLS) and len(after) >= len(AFTER_WRITE_KILLS)
    # Left behind, never renamed into a version. SnapshotStore.prune deletes one a minute
    # old, which the first can be by now on a slow machine: the younger ones must be there.
    now = time.time()
    assert tmp_seen and {n for n, t in tmp_seen.items() if now - t < 50} <= temp_files()

    # Exactly once, from the worker's own records: the ledgers along the version chain.
    newest = store.latest_version()
    assert newest is not None
    proof = trained_ids(archive, MODEL, newest)
    expected = {sid(e) for e in good_ids}
    assert proof.duplicates == 0, f"{proof.duplicates} stream IDs trained twice"
    assert proof.trained_set == expected, (f"{len(expected - proof.trained_set)} accepted "
                                           "samples never trained")
    meta = proof.newest_meta
    assert total[0] >= WORKER_TOTAL
    assert meta["samples_trained"] == len(good_ids) == total[0] - len(bad)
    reasons = {reason: list(bad.values()).count(reason) for reason in set(bad.values())}
    assert {k: v for k, v in meta["dead_letters"].items() if v} == reasons
    dead_sources = [f[b"source_id"] for _, f in r.xrange(DEAD)]
    assert sorted(dead_sources) == sorted(bad), "a dead letter is missing or doubled"
    counts = {k.decode(): int(v) for k, v in r.hgetall(keys.dead_letter_counts(MODEL)).items()}
    assert counts == reasons
    assert r.xpending(STREAM, keys.CONSUMER_GROUP)["pending"] == 0
    last = sid(meta["last_stream_id"])
    assert all(sid(eid) > last for eid, _ in r.xrange(STREAM))  # trimmed below the checkpoint
    assert r.xlen(STREAM) == 0

    # Retention: keep_snapshots versions plus the pinned one, whatever the crashes left.
    on_disk = store.versions()
    assert pinned in on_disk
    assert len(on_disk) <= KEEP + 1, on_disk
    assert len(proof.chain) > len(on_disk)  # retention did delete versions meanwhile

    # The leftover temporary files break nothing: an API started now serves LATEST.
    assert temp_files()
    store.unpin()
    api = ApiProcess(service_env(redis_server.url, data_dir, cfg), tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        body = httpx.post(api.url + "/predict", json={"instances": [x[0].tolist()]}).json()
        assert body["version"] == store.latest_version() == newest, body
    finally:
        api.stop()
    r.close()
    print("\n" + "\n".join(map(str, kills)))
    _report("worker SIGKILL", kills=len(kills), mid_write=len(mid),
            mid_write_unhooked=sum(1 for k in mid if k["window"] == "random"),
            leftover_tmp=len(tmp_seen), accepted=len(good_ids), dead=len(bad),
            trained=len(proof.trained), duplicates=proof.duplicates,
            lost=len(expected - proof.trained_set), versions=len(proof.chain),
            on_disk=len(on_disk), max_on_disk=archiver.max_on_disk,
            pending_at_kills=sum(int(k["pending"]) for k in kills),  # type: ignore[call-overload]
            kills_after_write_before_ack=len(after),
            covered_unacked_at_kills=sum(int(k["covered_unacked"]) for k in kills),  # type: ignore[call-overload]
            kills_after_publishing=sum(1 for k in kills if k["published"]),
            start_to_lease_median_s=statistics.median(float(k["start_s"]) for k in kills),
            final_drain_s=round(drain_s, 2), runtime_s=round(time.monotonic() - t_start, 1))


# -- 2. Redis SIGKILL, restart from the AOF ---------------------------------------------------

def _aof_dir(redis_server) -> Path:  # type: ignore[no-untyped-def]
    return redis_server.workdir / "appendonlydir"


def _last_generated(r: redis.Redis) -> tuple[int, int]:
    """The stream's last ID as Redis restored it (retrying while it loads the AOF)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return sid(r.xinfo_stream(STREAM)["last-generated-id"])
        except redis.exceptions.BusyLoadingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_redis_sigkill_and_aof_restart(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two Redis crashes under load, with a worker training and an API answering /predict:

    A. SIGKILL, restart from its own AOF. With ``appendfsync everysec`` Redis normally writes
       (not fsyncs) each command to the file before it replies, so a process crash loses
       nothing -- except while a background fsync is slow: Redis then postpones its writes for
       up to 2 s and replies meanwhile (seen here on a busy disk). Lost samples must all be from
       the last 2 s before the kill.
    B. The host dies: Redis and the worker SIGKILLed together, Redis restarted from a copy of
       its AOF taken 1 s before (what everysec loses then: the last second was in the page
       cache, never fsynced), a new worker restarted from the checkpoints on disk. Writes,
       deliveries, acks, trims and dead letters of that second are rolled back. Lost samples
       must all be from that second; nothing may be trained twice.
    """
    t_start = time.monotonic()
    # keep_snapshots=2, 4 checkpoints a second: the second the AOF loses holds more checkpoints
    # than retention keeps (the worker used to remember only the newest keep_snapshots ledgers
    # and retrained 15-40 entries here; it now remembers the last worker.COVERED_SECONDS).
    cfg = small_config(max_batch=64, snapshot_every_steps=1000, snapshot_every_seconds=0.25,
                       keep_snapshots=2)
    data_dir = tmp_path / "data"
    metrics_port = free_port()
    env = service_env(redis_server.url, data_dir, cfg, worker_metrics_port=str(metrics_port))
    store = SnapshotStore(data_dir / "snapshots", MODEL)
    archive = tmp_path / "archive" / MODEL
    log = tmp_path / "worker.log"
    r = redis.Redis.from_url(redis_server.url)
    worker = spawn_worker(env, "w", log)
    api = ApiProcess(service_env(redis_server.url, data_dir, cfg), tmp_path / "api.log")
    predictor = producer = None
    faults: list[dict[str, object]] = []
    try:
        with Archiver(store, archive):
            wait_until(lambda: store.latest_version() is not None, timeout=60,
                       what="the worker publishes v1")
            api.wait_ready(path="/readyz")
            predictor = Predictor(api.url, cfg.num_features).start()
            producer = Producer(redis_server.url, api.url, cfg, seed=7).start()
            for fault in ("process", "host"):
                time.sleep(2.5)
                good_before = len(producer.good)
                if fault == "host":
                    saved = tmp_path / "aof-1s-old"
                    shutil.copytree(_aof_dir(redis_server), saved)
                    t_copy_ms = int(time.time() * 1000)
                    time.sleep(1.0)
                if fault == "host":
                    worker.kill()
                    worker.wait(10)
                redis_server.kill()
                t_kill = time.monotonic()
                t_kill_ms = int(time.time() * 1000)  # Redis is dead: no ID after this
                accepted_last_2s = producer.accepted_since(t_kill - 2.0)
                time.sleep(1.0)  # down: ingest answers 503, predictions go on from memory
                producer.hold()
                if fault == "host":
                    shutil.rmtree(_aof_dir(redis_server))
                    shutil.copytree(saved, _aof_dir(redis_server))
                accepted = list(producer.good) + list(producer.bad)
                redis_server.start()
                t_up = time.monotonic()
                restored = _last_generated(r)
                producer.release()
                if fault == "host":
                    worker = spawn_worker(env, "w2", log)
                lost = [e for e in accepted if sid(e) > restored]
                # Recovery: the first accepted write, and the worker training a new entry.
                wait_until(lambda: producer.first_accept_after(t_up) is not None, timeout=30,
                           what="ingest recovers")
                first_new = sid(producer.good[-1])
                wait_until(lambda: sid(store.read_header_metadata(store.latest_version())
                                       ["last_stream_id"]) >= first_new,
                           timeout=30, every=0.05, what="the worker trains again")
                wait_until(lambda: any(c[2] == 202 and c[0] >= t_up
                                       for c in list(producer.api_calls)),
                           timeout=30, what="POST /ingest recovers")
                api_back = min(c[1] for c in producer.api_calls if c[2] == 202 and c[0] >= t_up)
                faults.append({
                    "fault": fault, "api_ingest_recovered_s": round(api_back - t_up, 2), "accepted_before": good_before, "lost": len(lost),
                    "lost_ids": lost, "restored": restored, "t_kill_ms": t_kill_ms,
                    "t_copy_ms": t_copy_ms if fault == "host" else None,
                    "accepted_last_2s": accepted_last_2s,
                    "down_s": round(t_up - t_kill, 2),
                    "ingest_recovered_s": round(producer.first_accept_after(t_up) - t_up, 2),
                    "training_recovered_s": round(time.monotonic() - t_up, 2)})
            time.sleep(1.0)
            producer.stop()

            newest_id = max(sid(e) for e in producer.good)

            def drained() -> bool:
                return _covered(r, store, newest_id)

            wait_until(drained, timeout=60, every=0.1, what="the stream drained")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0, tail(log)
            predictor.stop()
    finally:
        for thing in (producer, predictor):
            if thing is not None:
                thing.stop()
        if worker.poll() is None:
            worker.kill()
        api.stop()

    # /predict answered throughout both outages, from memory.
    failed = [o for o in predictor.outcomes if o.status != 200]
    assert not failed, failed[:5]

    # The worker's records against what Redis kept.
    proof = trained_ids(archive, MODEL, store.latest_version())
    trained = proof.trained_set
    good = {sid(e) for e in producer.good}
    assert proof.duplicates == 0, f"{proof.duplicates} entries trained twice"
    assert len(trained - good) <= producer.ambiguous, "trained something never written"
    process, host = faults
    # A process crash loses at most what Redis postponed writing: the last 2 s.
    for eid in process["lost_ids"]:  # type: ignore[union-attr]
        assert sid(eid)[0] >= process["t_kill_ms"] - 2500, eid  # type: ignore[operator]
    all_lost = {sid(e) for f in faults for e in f["lost_ids"]}  # type: ignore[union-attr]
    assert good - trained <= all_lost, "a surviving entry was never trained"
    # What the host crash lost is exactly what was written after the copy: bounded by the
    # window (the copy's own time and the kill) and by what was accepted in the last 2 s.
    assert host["lost"] <= host["accepted_last_2s"]
    for eid in host["lost_ids"]:  # type: ignore[union-attr]
        assert host["t_copy_ms"] - 1000 <= sid(eid)[0] <= host["t_kill_ms"], eid  # type: ignore[operator]
    assert proof.newest_meta["samples_trained"] == len(proof.trained)
    dead = [sid(f[b"source_id"]) for _, f in r.xrange(DEAD)]
    assert len(dead) == len(set(dead)), "a dead letter was written twice"
    surviving_bad = {sid(e) for e in producer.bad} - all_lost
    assert set(dead) == surviving_bad, "a malformed entry that survived was not dead-lettered"
    r.close()
    for f in faults:
        f.pop("lost_ids")
        _report("redis SIGKILL", **f)
    _report("redis SIGKILL totals", accepted=len(good), trained=len(trained),
            lost_untrained=len(good - trained), trained_then_lost=len(trained & all_lost),
            ambiguous_writes=producer.ambiguous, refused=producer.refused,
            predictions=len(predictor.outcomes), predictions_failed=len(failed),
            dead_letters=len(dead), runtime_s=round(time.monotonic() - t_start, 1))


# -- 3. Redis frozen (SIGSTOP) ----------------------------------------------------------------

FREEZE_SECONDS = 10.0
SOCKET_TIMEOUT = 1.0


def test_redis_frozen_then_resumed(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP: connections are accepted and commands hang, the worst case for timeouts.

    Every Redis client of the service has a socket timeout (``NP_REDIS_SOCKET_TIMEOUT``, 1 s
    here), so nothing hangs: /predict answers from memory (< 2 s each, none failed), /ingest
    answers 503 within its retries' timeouts, /readyz and the worker's ``redis_up`` say Redis
    is gone, and both recover by themselves after SIGCONT, in the same processes. A MONITOR
    counts what Redis really wrote, per sample: each accepted sample once, each refused one
    never, and what timed out (commands Redis runs when it wakes up) at most once.
    """
    t_start = time.monotonic()
    from service.settings import Settings
    from service.worker import ModelWorker
    from service.worker_metrics import WorkerMetrics

    # The worker's blocking read never outlasts its socket timeout (else a BLOCK would read as
    # a dead connection): BLOCK is capped at half of it, whatever NP_WORKER_BLOCK_MS says.
    probe = Settings(redis_url=redis_server.url, redis_socket_timeout=SOCKET_TIMEOUT,
                     worker_block_ms=10_000, data_dir=tmp_path / "probe",
                     models=[small_config()])
    mw = ModelWorker(probe, probe.models[0], WorkerMetrics(), threading.Event(), "probe")
    assert mw.block_ms == SOCKET_TIMEOUT * 1000 / 2
    mw.redis.close()

    cfg = small_config(max_batch=64, snapshot_every_steps=1000, snapshot_every_seconds=0.25,
                       keep_snapshots=3)
    data_dir = tmp_path / "data"
    metrics_port = free_port()
    timeouts = dict(redis_socket_timeout=str(SOCKET_TIMEOUT), redis_retries="2")
    env = service_env(redis_server.url, data_dir, cfg, worker_metrics_port=str(metrics_port),
                      **timeouts)
    api_env = service_env(redis_server.url, data_dir, cfg, **timeouts)
    store = SnapshotStore(data_dir / "snapshots", MODEL)
    archive = tmp_path / "archive" / MODEL
    log = tmp_path / "worker.log"
    r = redis.Redis.from_url(redis_server.url)
    monitor = Monitor(redis_server.url, STREAM)
    worker = spawn_worker(env, "w", log)
    api = ApiProcess(api_env, tmp_path / "api.log")
    predictor = producer = prober = None
    ready_during: list[dict[str, object]] = []
    gauge_during: list[float | None] = []
    try:
        with Archiver(store, archive):
            wait_until(lambda: store.latest_version() is not None, timeout=60,
                       what="the worker publishes v1")
            api.wait_ready(path="/readyz")
            wait_until(lambda: worker_gauge(metrics_port, "normprop_worker_redis_up") == 1,
                       timeout=30, what="the worker's metrics")
            predictor = Predictor(api.url, cfg.num_features).start()
            producer = Producer(redis_server.url, api.url, cfg, seed=11, pause=0.05).start()
            # /ingest alone, often, to time its answers while Redis is frozen.
            prober = Producer(redis_server.url, api.url, cfg, seed=12, pause=0.05, batch=4,
                              mode="api", prefix="a").start()
            time.sleep(2.0)
            t_freeze = time.monotonic()
            redis_server.pause()
            try:
                while time.monotonic() - t_freeze < FREEZE_SECONDS:
                    time.sleep(0.5)
                    ready = httpx.get(api.url + "/readyz", timeout=5)
                    ready_during.append({**ready.json(), "t": time.monotonic() - t_freeze,
                                         "http": ready.status_code})
                    gauge_during.append(worker_gauge(metrics_port, "normprop_worker_redis_up"))
            finally:
                redis_server.resume()
            t_resume = time.monotonic()
            wait_until(lambda: producer.first_accept_after(t_resume) is not None, timeout=30,
                       what="ingest recovers")
            ingest_recovered = producer.first_accept_after(t_resume) - t_resume  # type: ignore[operator]
            wait_until(lambda: any(c[2] == 202 and c[0] >= t_resume
                                   for c in list(prober.api_calls)),
                       timeout=30, what="POST /ingest recovers")
            api_ingest_recovered = min(c[1] for c in prober.api_calls
                                       if c[2] == 202 and c[0] >= t_resume) - t_resume
            wait_until(lambda: worker_gauge(metrics_port, "normprop_worker_redis_up") == 1,
                       timeout=30, what="the worker reconnects")
            worker_recovered = time.monotonic() - t_resume
            first_new = sid(producer.good[-1])
            wait_until(lambda: sid(store.read_header_metadata(store.latest_version())
                                   ["last_stream_id"]) >= first_new,
                       timeout=30, every=0.05, what="the worker trains again")
            training_recovered = time.monotonic() - t_resume
            wait_until(lambda: httpx.get(api.url + "/readyz", timeout=5).json()["redis"],
                       timeout=10, what="/readyz reports Redis back")
            ready_after_s = time.monotonic() - t_resume
            time.sleep(1.0)
            producer.stop()
            prober.stop()
            newest_id = max(sid(e) for e in producer.good + prober.good)

            def drained() -> bool:
                return _covered(r, store, newest_id)

            wait_until(drained, timeout=60, every=0.1, what="the stream drained")
            # Same processes throughout: nothing was restarted.
            assert worker.poll() is None and api.proc.poll() is None
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0, tail(log)
            predictor.stop()
    finally:
        for thing in (producer, prober, predictor):
            if thing is not None:
                thing.stop()
        if worker.poll() is None:
            worker.kill()
        api.stop()
        monitor.stop()

    during = predictor.between(t_freeze, t_resume)
    # /predict: answered throughout from memory, each within 2 s.
    failed = [o for o in predictor.outcomes if o.status != 200]
    assert not failed, failed[:5]
    assert len(during) >= 50, len(during)
    slowest_predict = max(o.t1 - o.t0 for o in predictor.outcomes)
    assert slowest_predict < 2.0, slowest_predict
    # /ingest: 503 while frozen, each answer within the API's retries' socket timeouts
    # (api.py retries once: 2 x 1 s, plus slack for a loaded machine).
    calls = producer.api_calls + prober.api_calls
    frozen_calls = [c for c in calls if t_freeze + 0.1 < c[0] < t_resume - 3]
    assert len(frozen_calls) >= 20 and {c[2] for c in frozen_calls} == {503}, frozen_calls
    slowest_ingest = max(c[1] - c[0] for c in calls)
    assert slowest_ingest < 2 * SOCKET_TIMEOUT + 1.5, slowest_ingest
    # /readyz tells the truth: still ready (it serves from memory), Redis reported down.
    late = [d for d in ready_during if d["t"] > 3 * SOCKET_TIMEOUT + 1]
    assert late and all(d["http"] == 200 and d["status"] == "ready" and d["redis"] is False
                        for d in late), ready_during
    # The worker's own gauge said so too, and it came back by itself.
    assert 0 in gauge_during[len(gauge_during) // 2:], gauge_during

    # Exactly once, from the worker's records and from what Redis really wrote.
    writes = monitor.writes
    state = producer.tag_state | prober.tag_state
    twice = {t: n for t, n in writes.items() if n > 1}
    assert not twice, f"{len(twice)} samples written twice (a retried MULTI): {list(twice)[:5]}"
    assert all(writes.get(t) == 1 for t, s in state.items() if s == "accepted")
    assert not any(writes.get(t) for t, s in state.items() if s == "refused")
    proof = trained_ids(archive, MODEL, store.latest_version())
    assert proof.duplicates == 0
    good = {sid(e) for e in producer.good + prober.good}
    assert good <= proof.trained_set, "an accepted sample was never trained"
    written_ambiguous = sum(1 for t, s in state.items() if s == "ambiguous" and writes.get(t))
    bad_written = [t for t in writes if t in producer.bad_tags]
    # Everything Redis wrote was trained once (or dead-lettered once): none lost, none extra.
    assert len(proof.trained) == sum(writes.values()) - len(bad_written)
    dead = [f[b"id"].decode() for _, f in r.xrange(DEAD)]
    assert sorted(dead) == sorted(bad_written)
    r.close()
    _report("redis SIGSTOP", frozen_s=round(t_resume - t_freeze, 1),
            predictions_during=len(during), predictions_failed=len(failed),
            slowest_predict_s=round(slowest_predict, 3),
            ingest_503_during=sum(1 for c in frozen_calls if c[2] == 503),
            slowest_ingest_s=round(slowest_ingest, 2),
            ambiguous_samples=producer.ambiguous + prober.ambiguous,
            ambiguous_written=written_ambiguous,
            ingest_recovered_s=round(ingest_recovered, 2),
            api_ingest_recovered_s=round(api_ingest_recovered, 2),
            worker_redis_up_s=round(worker_recovered, 2),
            training_recovered_s=round(training_recovered, 2),
            readyz_redis_true_s=round(ready_after_s, 2), accepted=len(good), trained=len(proof.trained),
            runtime_s=round(time.monotonic() - t_start, 1))



# -- 4. API SIGKILL and restart under load ----------------------------------------------------

API_RESTARTS = 3


def test_api_sigkill_restart_serves_newest(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The API SIGKILLed and started again (same port) 3 times while a client predicts in a
    loop and the worker keeps publishing: each time the new process answers with a version at
    least LATEST on disk when it started (newer than what the killed one served), every
    prediction after its first success succeeds, and it keeps following LATEST."""
    t_start = time.monotonic()
    cfg = small_config(max_batch=64, snapshot_every_steps=1000, snapshot_every_seconds=0.25,
                       keep_snapshots=3)
    data_dir = tmp_path / "data"
    env = service_env(redis_server.url, data_dir, cfg)
    store = SnapshotStore(data_dir / "snapshots", MODEL)
    log = tmp_path / "worker.log"
    worker = spawn_worker(env, "w", log)
    api = ApiProcess(env, tmp_path / "api-0.log")
    port = api.port
    predictor = producer = None
    cycles: list[dict[str, object]] = []
    try:
        wait_until(lambda: store.latest_version() is not None, timeout=60,
                   what="the worker publishes v1")
        api.wait_ready(path="/readyz")
        producer = Producer(redis_server.url, None, cfg, seed=13, mode="raw").start()
        predictor = Predictor(api.url, cfg.num_features).start()
        for k in range(API_RESTARTS):
            time.sleep(1.5)
            served_before = max(o.version or 0 for o in predictor.outcomes if o.status == 200)
            api.proc.kill()
            api.proc.wait(10)
            t_kill = time.monotonic()
            api.stop()
            time.sleep(0.5)  # down: predictions fail (connection refused), counted apart
            latest_at_start = store.latest_version()
            t_up = time.monotonic()
            api = ApiProcess(env, tmp_path / f"api-{k + 1}.log", port=port)
            wait_until(lambda: any(o.status == 200 for o in predictor.between(t_up, 1e18)),
                       timeout=60, what="the restarted API answers")
            first = next(o for o in predictor.between(t_up, 1e18) if o.status == 200)
            latest_at_first = store.latest_version()
            # It keeps following LATEST: a response at least as new as LATEST read now.
            target = store.latest_version()
            t_follow = time.monotonic()
            wait_until(lambda: any((o.version or 0) >= target
                                   for o in predictor.between(t_follow, 1e18)),
                       timeout=10, what="the restarted API follows LATEST")
            time.sleep(0.5)
            after = [o for o in predictor.between(first.t0, 1e18)]
            cycles.append({"served_before": served_before, "latest_at_start": latest_at_start,
                           "first_version": first.version, "latest_at_first": latest_at_first,
                           "failed_down": sum(1 for o in predictor.between(t_kill - 0.2, first.t0)
                                              if o.status != 200),
                           "failed_after": sum(1 for o in after if o.status != 200),
                           "after": len(after),
                           "restart_to_first_success_s": round(first.t1 - t_up, 2),
                           "kill_to_first_success_s": round(first.t1 - t_kill, 2)})
        producer.stop()
        predictor.stop()
    finally:
        for thing in (producer, predictor):
            if thing is not None:
                thing.stop()
        api.stop()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except Exception:  # noqa: BLE001
                worker.kill()

    for c in cycles:
        # The newest snapshot, not the one the killed process had: the worker went on meanwhile.
        assert c["first_version"] >= c["latest_at_start"], c  # type: ignore[operator]
        assert c["first_version"] > c["served_before"], c  # type: ignore[operator]
        assert c["failed_after"] == 0 and c["after"] > 20, c  # type: ignore[operator]
        _report("API SIGKILL", **c)
    # Before the first kill, nothing failed either.
    first_kill = min(o.t0 for o in predictor.outcomes if o.status != 200)
    assert all(o.status == 200 for o in predictor.outcomes if o.t0 < first_kill)
    _report("API SIGKILL totals", restarts=len(cycles),
            predictions=len(predictor.outcomes),
            failed_while_down=sum(int(c["failed_down"]) for c in cycles),  # type: ignore[call-overload]
            failed_after_restart=sum(int(c["failed_after"]) for c in cycles),  # type: ignore[call-overload]
            restart_to_first_success_median_s=statistics.median(
                float(c["restart_to_first_success_s"]) for c in cycles),  # type: ignore[arg-type]
            runtime_s=round(time.monotonic() - t_start, 1))

def test_writes_retried_across_a_stall_count_once(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Redis stalls (SIGSTOP) a little longer than the socket timeout: the client gives up on
    the first try and redis-py's retry sends the command again on a new connection -- and when
    Redis wakes up it runs both, the first try's bytes being already in its socket buffer.

    The worker's dead-letter write is a script that XACKs first and writes only if that acked
    the entry, so however many tries Redis runs, one dead letter is written and counted. The
    same write as a plain MULTI (what the worker sent before) is written once per try Redis
    runs. The API's ingest MULTI goes through a client that never retries (ApiState.
    redis_writes), so it runs once and the caller is told 503 write_unconfirmed. Counts are
    printed; the MONITOR says how many tries Redis ran.
    """
    import asyncio

    from service import worker as worker_mod
    from service.api import _redis_client
    from service.settings import Settings

    timeout = 0.5
    settings = Settings(redis_url=redis_server.url, redis_socket_timeout=timeout,
                        redis_connect_timeout=timeout, redis_retries=2, data_dir=tmp_path,
                        models=[small_config()])
    r = redis.Redis.from_url(redis_server.url)
    client = worker_mod.connect(settings)  # the worker's client: 2 retries on timeouts
    group = keys.CONSUMER_GROUP
    client.xgroup_create(STREAM, group, id="0", mkstream=True)
    eid = client.xadd(STREAM, {"x": "[1, 2]", "y": "0", "id": "bad"})
    client.xreadgroup(group, "c", {STREAM: ">"})  # pending, as the worker holds it
    script = client.register_script(worker_mod._DEAD_LETTER)
    client.script_load(worker_mod._DEAD_LETTER)
    counts = keys.dead_letter_counts(MODEL)
    probe = "np:{m}:probe"
    monitor = Monitor(redis_server.url, probe)
    dead_monitor = Monitor(redis_server.url, DEAD)

    def dead_letter() -> None:
        script(keys=[STREAM, DEAD, counts],
               args=[group, 1000, eid, "wrong_length", 3, "source_id", eid, "id", "dead",
                     "reason", "wrong_length"])

    def plain_multi() -> None:  # the old dead-letter write: MULTI XADD ... XACK ... EXEC
        pipe = client.pipeline(transaction=True)
        pipe.xadd(probe, {"id": "multi"})
        pipe.xack(STREAM, group, eid)
        pipe.execute()

    def stall() -> threading.Timer:
        redis_server.pause()
        wake = threading.Timer(1.5 * timeout, redis_server.resume)
        wake.start()
        return wake

    answers: dict[str, str] = {}
    for name, call in (("dead_letter", dead_letter), ("plain_multi", plain_multi)):
        client.ping()  # a live pooled connection: the first try goes out on it
        wake = stall()
        try:
            call()
            answers[name] = "ok"
        except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError) as exc:
            answers[name] = type(exc).__name__
        finally:
            wake.join()

    async def api_ingest() -> None:  # what POST /ingest sends (service/routes_ingest.py)
        api_client = _redis_client(settings, retries=0)  # ApiState.redis_writes
        await api_client.ping()
        wake = stall()
        try:
            async with api_client.pipeline(transaction=True) as pipe:
                pipe.xadd(probe, {"id": "api"})
                await pipe.execute()
            answers["api_ingest"] = "ok"
        except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError) as exc:
            answers["api_ingest"] = type(exc).__name__
        finally:
            wake.join()
            await api_client.aclose()

    asyncio.run(api_ingest())
    time.sleep(0.5)  # Redis runs what the timed-out connections had sent
    monitor.stop()
    dead_monitor.stop()
    # The invariant: one dead letter, counted once, the entry acked -- whatever ran twice.
    assert r.xlen(DEAD) == 1 and r.hget(counts, "wrong_length") == b"1"
    # The ingest write is sent once (no retry): the caller hears "write unconfirmed" for a
    # write Redis runs once when it wakes, never twice.
    assert monitor.writes.get("api", 0) == 1, monitor.writes
    assert answers["api_ingest"] == "TimeoutError"
    assert r.xpending(STREAM, group)["pending"] == 0
    client.close()
    r.close()
    _report("writes retried across a stall", answers=answers,
            dead_letter_script_runs=dead_monitor.commands.get("EVALSHA", 0), dead_letters=1,
            plain_multi_writes=monitor.writes.get("multi", 0),
            api_ingest_writes=monitor.writes.get("api", 0))
