"""Rolling the worker back to version N: ``POST /admin/models/{name}/rollback`` writes the
request, the running worker restores N, publishes it as a new version and trains on from it
(real redis-server, real worker thread, the app in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import redis
import torch
from fastapi.testclient import TestClient

from service import keys
from service.api import create_app
from service.snapshots import SnapshotStore

from worker_helpers import MODEL, make_settings, push, running_worker, small_config, synthetic, \
    wait_until

ADMIN = {"Authorization": "Bearer adm"}


def _trained(store: SnapshotStore, n: int) -> bool:
    latest = store.latest_version()
    return latest is not None and store.read_header_metadata(latest)["samples_trained"] == n


def _ledger(store: SnapshotStore, version: int) -> set[tuple[int, int]]:
    ids = store.read(version).tensors["ledger.ids"]
    return {(int(a), int(b)) for a, b in ids.tolist()}


def _sid(raw: bytes) -> tuple[int, int]:
    ms, seq = raw.decode().split("-")
    return int(ms), int(seq)


def test_rollback_resumes_from_version_n_without_retraining(redis_server,
                                                             tmp_path: Path) -> None:
    cfg = small_config(keep_snapshots=100, snapshot_every_seconds=0.2)
    settings = make_settings(redis_server.url, tmp_path, cfg, admin_api_key="adm")
    r = redis.Redis.from_url(redis_server.url)
    store = SnapshotStore(settings.snapshot_dir, MODEL)
    x, y = synthetic(700, seed=3)
    with running_worker(settings), TestClient(create_app(settings)) as client:
        push(r, cfg, x[:300], y[:300])
        wait_until(lambda: _trained(store, 300), timeout=60, what="300 trained")
        n = store.latest_version()
        assert n is not None
        snap_n = store.read(n)
        after_n = push(r, cfg, x[300:600], y[300:600])
        wait_until(lambda: _trained(store, 600), timeout=60, what="600 trained")
        before = store.latest_version()
        assert before is not None and before > n

        # The endpoint: validation, then 202 and the request the worker picks up.
        assert client.post(f"/admin/models/{MODEL}/rollback", json={"version": n}).status_code == 401
        assert client.post(f"/admin/models/{MODEL}/rollback", json={"version": 10_000},
                           headers=ADMIN).status_code == 404
        refused = client.post(f"/admin/models/{MODEL}/rollback",
                              json={"version": n, "retrain": True}, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"] == "retrain_unavailable"
        resp = client.post(f"/admin/models/{MODEL}/rollback", json={"version": n}, headers=ADMIN)
        assert resp.status_code == 202, resp.text
        assert resp.json()["requested"]["version"] == n

        def rolled() -> int | None:
            for v in reversed(store.versions()):
                if v > before and store.read_header_metadata(v).get("rolled_back_from") == n:
                    return v
            return None

        wait_until(lambda: rolled() is not None and store.rollback_request() is None,
                   timeout=30, what="rollback published")
        rb = rolled()
        assert rb is not None and rb > before
        snap_rb = store.read(rb)
        meta = snap_rb.metadata
        assert meta["parent_version"] == n and meta["rolled_back_version"] >= before
        assert meta["samples_trained"] == 300 and meta["ledger_size"] == 0
        # Exactly N's state: weights, data-norm statistics, momentum.
        for key, t in snap_n.tensors.items():
            if key.startswith(("model.", "optim.")):
                assert torch.equal(snap_rb.tensors[key], t), key
        # The stream position is kept: what came after N is not read again.
        reached = store.read_header_metadata(before)["last_stream_id"]
        assert _sid(meta["last_stream_id"].encode()) >= _sid(reached.encode())
        listed = client.get(f"/admin/models/{MODEL}/versions", headers=ADMIN).json()
        assert any(row.get("rolled_back_from") == n for row in listed["versions"])

        # Training continues from N's weights: the counters go on from N's 300.
        new = push(r, cfg, x[600:], y[600:])
        wait_until(lambda: _trained(store, 400), timeout=60, what="100 more trained")
        later = [v for v in store.versions() if v > rb]
        assert later
        trained_after = set().union(*(_ledger(store, v) for v in later))
        assert trained_after == {_sid(i) for i in new}
        assert not trained_after & {_sid(i) for i in after_n}
        last = store.read(later[-1])
        assert not torch.equal(last.tensors["model.layers.0.weight"],
                               snap_rb.tensors["model.layers.0.weight"])
        wait_until(lambda: r.xlen(keys.samples_stream(MODEL)) == 0, timeout=10,
                   what="stream trimmed")


def _entry(xi: np.ndarray, label: str) -> dict[str, str]:
    """A stream entry as redis-cli writes it: JSON features, the label a bare word."""
    return {"x": json.dumps(xi.tolist()), "y": label}


def test_rollback_of_an_open_label_set_restores_its_label_map(redis_server,
                                                             tmp_path: Path) -> None:
    """Rolled back past a new label, the map and the output layer are N's again; the label
    is new once more when it comes back, and takes the next unit."""
    cfg = small_config(open_classes=True, keep_snapshots=100, snapshot_every_seconds=0.2)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = redis.Redis.from_url(redis_server.url)
    store = SnapshotStore(settings.snapshot_dir, MODEL)
    x, _ = synthetic(30, seed=4)
    stream = keys.samples_stream(MODEL)
    with running_worker(settings):
        for i in range(10):
            r.xadd(stream, _entry(x[i], "ab"[i % 2]))
        wait_until(lambda: _trained(store, 10), timeout=30, what="10 trained")
        n = store.latest_version()
        assert n is not None and store.read_header_metadata(n)["label_map"] == ["a", "b"]
        for i in range(10, 20):
            r.xadd(stream, _entry(x[i], "abc"[i % 3]))
        wait_until(lambda: _trained(store, 20), timeout=30, what="20 trained")
        grown = store.read_header_metadata(store.latest_version())  # type: ignore[arg-type]
        assert grown["label_map"] == ["a", "b", "c"]
        assert grown["output_units"] == 3
        store.request_rollback(n)
        wait_until(lambda: store.rollback_request() is None, timeout=30, what="rollback")
        meta = store.read_header_metadata(store.latest_version())  # type: ignore[arg-type]
        assert meta["rolled_back_from"] == n
        assert meta["label_map"] == ["a", "b"] and meta["output_units"] == 2
        for i in range(20, 30):
            r.xadd(stream, _entry(x[i], "d"))
        wait_until(lambda: _trained(store, 20), timeout=30, what="10 more trained")
        meta = store.read_header_metadata(store.latest_version())  # type: ignore[arg-type]
        assert meta["label_map"] == ["a", "b", "d"] and meta["output_units"] == 3
