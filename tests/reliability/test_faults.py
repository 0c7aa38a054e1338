"""Fault injection against real processes: redis-server, ``python -m service.worker`` and the
uvicorn API, killed, frozen and restarted while samples stream in and clients predict.

Every claim is counted from the service's own records, never from timing: the worker's
checkpoints name their parent version and list the stream IDs they trained (the ledger), so
the ledgers along the chain from the newest version list every trained ID; retention deletes
old versions, so :class:`Archiver` hard-links each version as it appears. What the tests
measure (injections, losses, recovery times) is printed; run with ``-s`` to see it::

    python3 -m pytest -q -s tests/reliability/test_faults.py

1. the worker SIGKILLed 12 times (4 of them mid-checkpoint-write) under 20,000 samples;
2. Redis SIGKILLed and restarted from its AOF, then restarted from an AOF one second older
   (what ``appendfsync everysec`` can lose when the host dies), under load;
3. Redis frozen (SIGSTOP) for 10 s, then resumed;
4. the API SIGKILLed and restarted under prediction load while the worker keeps publishing.
"""

from __future__ import annotations

import json
import os
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

from _fault_helpers import (Archiver, Predictor, Producer, free_port, service_env, sid,
                            spawn_worker, tail, trained_ids, worker_gauge)
from test_api_support import ApiProcess, stop_process
from worker_helpers import MODEL, small_config, synthetic, wait_until

from service import keys
from service.codec import EntryCodec
from service.snapshots import SnapshotStore, load_network

STREAM = keys.samples_stream(MODEL)
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
    cfg = small_config(max_batch=64, snapshot_every_steps=50, snapshot_every_seconds=0.25,
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

    def produce() -> None:
        # Bursts of 1..120 entries: trickles (batch 1) and backlogs (packed reads) both happen.
        pr = redis.Redis.from_url(redis_server.url)
        i = 0
        while i < WORKER_TOTAL:
            burst = min(WORKER_TOTAL - i, rng.randint(1, 120))
            pipe = pr.pipeline(transaction=False)
            reasons: list[str | None] = []
            for j in range(i, i + burst):
                if j % WORKER_BAD_EVERY == WORKER_BAD_EVERY - 1:
                    fields, reason = _malformed(j // WORKER_BAD_EVERY % 3, codec, x[j])
                    pipe.xadd(STREAM, fields)
                    reasons.append(reason)
                else:
                    # Mostly the binary form; every 7th in the JSON form (EntryCodec's path).
                    pipe.xadd(STREAM, codec.encode(x[j], int(y[j]), binary=j % 7 != 0))
                    reasons.append(None)
            for reason, eid in zip(reasons, pipe.execute()):
                if reason is None:
                    good_ids.append(eid)
                else:
                    bad[eid] = reason
            i += burst
            time.sleep(rng.uniform(0.02, 0.18))  # ~600 samples/s
        pr.close()
        produced.set()

    log = tmp_path / "worker.log"
    kills: list[dict[str, object]] = []
    pinned: int | None = None
    tmp_seen: set[str] = set()

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
                tmp_seen |= left
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
            assert produced.wait(120), "the producer did not finish"
            t_final = time.monotonic()
            proc = spawn_worker(env, "final", log)
            wait_until(lambda: r.get(keys.lease_key(MODEL)) == b"final", timeout=60,
                       what="the last worker takes the lease")

            def drained() -> bool:
                latest = store.latest_version()
                if latest is None:
                    return False
                meta = store.read_header_metadata(latest)
                return (meta.get("samples_trained") == len(good_ids)
                        and r.xpending(STREAM, keys.CONSUMER_GROUP)["pending"] == 0)

            wait_until(drained, timeout=120, every=0.1, what="the stream drained")
            drain_s = time.monotonic() - t_final
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, tail(log)
        finally:
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
    assert tmp_seen and tmp_seen <= temp_files()  # left behind, never renamed into a version

    # Exactly once, from the worker's own records: the ledgers along the version chain.
    newest = store.latest_version()
    assert newest is not None
    proof = trained_ids(archive, MODEL, newest)
    expected = {sid(e) for e in good_ids}
    assert proof.duplicates == 0, f"{proof.duplicates} stream IDs trained twice"
    assert proof.trained_set == expected, (f"{len(expected - proof.trained_set)} accepted "
                                           "samples never trained")
    meta = proof.newest_meta
    assert meta["samples_trained"] == len(good_ids) == WORKER_TOTAL - len(bad)
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

    A. SIGKILL, restart from its own AOF. With ``appendfsync everysec`` Redis has written
       (not fsynced) every acknowledged command to the file before replying, so a process
       crash loses nothing the clients were told was written: the test asserts 0 lost.
    B. SIGKILL, restart from a copy of the AOF taken 1 s before the kill: what everysec loses
       when the *host* dies (the last second was in the page cache, never fsynced). Writes,
       deliveries, acks, trims and dead letters of that second are rolled back under the
       worker's feet. Lost samples must all be from that second; nothing may be trained twice.
    """
    t_start = time.monotonic()
    # keep_snapshots=2: the worker remembers the newest 2 ledgers, fewer than the ~4
    # checkpoints a lost second holds (any keep below that fails the same way without the
    # high-water rule in ModelWorker.process).
    cfg = small_config(max_batch=64, snapshot_every_steps=50, snapshot_every_seconds=0.25,
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
                t_kill = time.monotonic()
                t_kill_ms = int(time.time() * 1000)
                redis_server.kill()
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
                lost = [e for e in accepted if sid(e) > restored]
                # Recovery: the first accepted write, and the worker training a new entry.
                wait_until(lambda: producer.first_accept_after(t_up) is not None, timeout=30,
                           what="ingest recovers")
                first_new = sid(producer.good[-1])
                wait_until(lambda: sid(store.read_header_metadata(store.latest_version())
                                       ["last_stream_id"]) >= first_new,
                           timeout=30, every=0.05, what="the worker trains again")
                faults.append({
                    "fault": fault, "accepted_before": good_before, "lost": len(lost),
                    "lost_ids": lost, "restored": restored, "t_kill_ms": t_kill_ms,
                    "t_copy_ms": t_copy_ms if fault == "host" else None,
                    "accepted_last_2s": accepted_last_2s,
                    "down_s": round(t_up - t_kill, 2),
                    "ingest_recovered_s": round(producer.first_accept_after(t_up) - t_up, 2),
                    "training_recovered_s": round(time.monotonic() - t_up, 2)})
            time.sleep(1.0)
            producer.stop()

            def drained() -> bool:
                groups = r.xinfo_groups(STREAM)
                latest = store.latest_version()
                return (r.xpending(STREAM, keys.CONSUMER_GROUP)["pending"] == 0
                        and groups and groups[0]["lag"] == 0 and latest is not None
                        and sid(store.read_header_metadata(latest)["last_stream_id"])
                        >= max(sid(e) for e in producer.good))

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
    assert process["lost"] == 0, process  # a process crash loses nothing acknowledged
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
    print("\n".join(sorted(set(e[:120] for e in producer.errors))))
    for f in faults:
        f.pop("lost_ids")
        _report("redis SIGKILL", **f)
    _report("redis SIGKILL totals", accepted=len(good), trained=len(trained),
            lost_untrained=len(good - trained), trained_then_lost=len(trained & all_lost),
            ambiguous_writes=producer.ambiguous, refused=producer.refused,
            predictions=len(predictor.outcomes), predictions_failed=len(failed),
            dead_letters=len(dead), runtime_s=round(time.monotonic() - t_start, 1))
