"""Snapshot versions: list, pin and unpin under concurrent prediction load; retention keeps pins.

Real redis-server and real uvicorn processes. While pinned, every response (from requests sent
after the pin answered) names the pinned version, even as newer versions are published; after
the unpin the newest is served again; no request fails throughout. A second replica on the same
data directory follows the pin through the ``PINNED`` file; a missing version answers 404 and a
corrupt one 422, and in both cases the served version does not change.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import torch
from test_api_support import ApiProcess, metric_samples, metric_value, np_env, publish

from service.settings import ModelConfig
from service.snapshots import SnapshotStore

CFG = ModelConfig(name="default", input_shape=[16], num_classes=4, spec="mlp:16")
ADMIN = {"X-API-Key": "pin-admin"}
CLIENTS = 4


def test_prune_never_deletes_the_pinned_version(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, CFG.name)
    for v in range(1, 9):
        publish(store, CFG, v)
    store.pin(2)
    # The worker passes its own protect set (the version it just wrote): the pin still holds.
    store.prune(3, protect={8})
    assert store.versions() == [2, 6, 7, 8]
    assert store.pinned_version() == 2
    store.unpin()
    store.prune(3, protect={8})
    assert store.versions() == [6, 7, 8] and store.pinned_version() is None


def test_pin_and_unpin_under_load(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    store = SnapshotStore(data / "snapshots", CFG.name)
    for v in range(1, 6):
        publish(store, CFG, v)
    publish(store, CFG, 6, corrupt=True)  # never served, never pinnable
    env = np_env(redis_server.url, data, models=[CFG.model_dump(mode="json")],
                 snapshot_poll_seconds="0.05", admin_api_key="pin-admin")
    api = ApiProcess(env, tmp_path / "api.log")
    replica = ApiProcess(env, tmp_path / "replica.log")
    try:
        api.wait_ready(path="/readyz")
        replica.wait_ready(path="/readyz")
        http = httpx.Client(base_url=api.url, timeout=10)
        assert http.get("/models/default").json()["version"] == 5

        listing = http.get("/admin/models/default/versions", headers=ADMIN)
        assert listing.status_code == 200, listing.text
        body = listing.json()
        assert [v["version"] for v in body["versions"]] == [6, 5, 4, 3, 2, 1]
        assert body["latest"] == 6 and body["pinned"] is None and body["served"] == 5
        v3 = next(v for v in body["versions"] if v["version"] == 3)
        assert v3["samples_trained"] == 30 and v3["prequential"]["accuracy"] == 0.5
        assert v3["created_at"] > 0 and v3["size_bytes"] > 0
        assert http.get("/admin/models/default/versions").status_code == 401

        # Refused pins leave everything as it was.
        missing = http.post("/admin/models/default/pin", json={"version": 99}, headers=ADMIN)
        assert missing.status_code == 404 and missing.json()["error"] == "unknown_version"
        bad = http.post("/admin/models/default/pin", json={"version": 6}, headers=ADMIN)
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_snapshot", bad.text
        assert http.post("/admin/models/default/pin", json={"version": "3"},
                         headers=ADMIN).status_code == 422
        assert store.pinned_version() is None
        assert http.get("/models/default").json()["version"] == 5

        x = (torch.randn(2, 16) * 2).tolist()
        stop = threading.Event()
        failures: list[str] = []
        seen: list[list[tuple[float, float, int]]] = [[] for _ in range(CLIENTS)]

        def client(i: int) -> None:
            with httpx.Client(base_url=api.url, timeout=10) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        r = c.post("/predict", json={"instances": x})
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    seen[i].append((t0, time.monotonic(), r.json()["version"]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            pin = http.post("/admin/models/default/pin", json={"version": 3}, headers=ADMIN)
            pinned_at = time.monotonic()
            assert pin.status_code == 200, pin.text
            assert pin.json()["version"] == 3 and pin.json()["pinned"] == 3
            assert store.pinned_version() == 3
            # Newer versions keep arriving while pinned: not served.
            for v in (7, 8, 9):
                time.sleep(0.3)
                publish(store, CFG, v)
            time.sleep(0.5)
            # The replica follows the PINNED file within a poll.
            with httpx.Client(base_url=replica.url, timeout=10) as r:
                info = r.get("/models/default").json()
                assert info["version"] == 3 and info["pinned"] == 3
                assert {r.post("/predict", json={"instances": x}).json()["version"]
                        for _ in range(20)} == {3}
            unpin_sent = time.monotonic()
            unpin = http.delete("/admin/models/default/pin", headers=ADMIN)
            unpinned_at = time.monotonic()
            assert unpin.status_code == 200 and unpin.json()["version"] == 9
            assert unpin.json()["pinned"] is None and store.pinned_version() is None
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)

        assert not failures, failures[:5]
        everything = [s for per in seen for s in per]
        while_pinned = [v for t0, t1, v in everything if t0 > pinned_at and t1 < unpin_sent]
        after = [v for t0, t1, v in everything if t0 > unpinned_at]
        before = [v for t0, t1, v in everything if t1 < pinned_at - 0.05]
        assert len(while_pinned) > 50 and set(while_pinned) == {3}, set(while_pinned)
        assert after and set(after) == {9}, set(after)
        assert before and set(before) <= {3, 5}, set(before)
        # Per client: monotonic except across the pin and the unpin.
        for per in seen:
            versions = [v for _, _, v in per]
            assert versions == sorted(versions, key=lambda v: {5: 0, 3: 1, 9: 2}[v])

        # The replica follows the unpin too; the corrupt version was counted, never served.
        deadline = time.monotonic() + 5
        with httpx.Client(base_url=replica.url, timeout=10) as r:
            while r.get("/models/default").json()["version"] != 9:
                assert time.monotonic() < deadline, "the replica did not follow the unpin"
                time.sleep(0.05)
        metrics = metric_samples(http.get("/metrics").text)
        assert metric_value(metrics, "normprop_api_snapshot_load_failures_total",
                            model="default") >= 1
        # Every version still listed, newest first, none pinned.
        body = http.get("/admin/models/default/versions", headers=ADMIN).json()
        assert body["pinned"] is None and body["served"] == 9 and body["latest"] == 9
    finally:
        api.stop()
        replica.stop()


def test_pin_survives_a_restart_and_redis_being_down(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SnapshotStore(data / "snapshots", CFG.name)
    for v in range(1, 4):
        publish(store, CFG, v)
    store.pin(2)
    # No Redis at all (a closed port): the file alone decides what is served.
    env = np_env("redis://127.0.0.1:9/0", data, models=[CFG.model_dump(mode="json")],
                 redis_connect_timeout="0.2", redis_socket_timeout="0.2")
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        info = httpx.get(api.url + "/models/default").json()
        assert info["version"] == 2 and info["pinned"] == 2
        publish(store, CFG, 4)
        time.sleep(0.6)
        assert httpx.get(api.url + "/models/default").json()["version"] == 2
    finally:
        api.stop()
