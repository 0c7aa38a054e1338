"""Open and listed label sets: user labels (integers or strings) on the stream, a growing output
layer, dead letters past ``max_classes`` or outside a fixed set, and ``/predict`` and
``/label`` in the user's own labels (real redis-server, real worker thread, app in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import redis
from fastapi.testclient import TestClient

from service import keys
from service.api import create_app
from service.codec import EntryCodec
from service.settings import ModelConfig
from service.snapshots import SnapshotStore, load_network

from worker_helpers import make_settings, running_worker, small_config, synthetic, wait_until

NAMES = ["cat", "dog", "bird"]


def _drained(r: redis.Redis, model: str) -> bool:
    stream = keys.samples_stream(model)
    summary = r.xpending(stream, keys.CONSUMER_GROUP)
    groups = r.xinfo_groups(stream)
    return summary["pending"] == 0 and groups[0]["lag"] == 0


def _latest_meta(store: SnapshotStore) -> dict:
    v = store.latest_version()
    return store.read_header_metadata(v) if v is not None else {}


def test_open_string_labels_grow_predict_and_label(redis_server, tmp_path: Path) -> None:
    cfg = small_config(name="pets", open_classes=True, max_classes=3, label_ttl_seconds=60)
    fixed = small_config(name="fixed", classes=[7, "seven"])
    settings = make_settings(redis_server.url, tmp_path, cfg, admin_api_key="adm")
    settings.models.append(fixed)
    r = redis.Redis.from_url(redis_server.url)
    stream = keys.samples_stream("pets")
    codec = EntryCodec(cfg)
    x, y = synthetic(900, seed=5)
    with running_worker(settings) as worker, TestClient(create_app(settings)) as client:
        wait_until(lambda: worker.models["pets"].trainer is not None, what="worker ready")
        pipe = r.pipeline(transaction=False)
        for i, (xi, yi) in enumerate(zip(x, y)):
            fields = codec.encode(xi, NAMES[int(yi)])  # y as a JSON string: b'"cat"'
            if i % 3 == 0:
                fields["y"] = NAMES[int(yi)].encode()  # a bare word, as redis-cli writes it
            pipe.xadd(stream, fields)
        pipe.execute()
        # A fourth label is past max_classes=3: dead-lettered with its reason.
        r.xadd(stream, {"x": "[" + ",".join(["0"] * 8) + "]", "y": "fish"})
        # The fixed set [7, "seven"]: the integer 7 and the string "seven" are its labels; the
        # string "7" and "eight" are not: dead-lettered unknown_label.
        fixed_stream = keys.samples_stream("fixed")
        r.xadd(fixed_stream, {"x": "[" + ",".join(["1"] * 8) + "]", "y": "7"})
        r.xadd(fixed_stream, {"x": "[" + ",".join(["1"] * 8) + "]", "y": '"seven"'})
        r.xadd(fixed_stream, {"x": "[" + ",".join(["2"] * 8) + "]", "y": '"7"'})
        r.xadd(fixed_stream, {"x": "[" + ",".join(["2"] * 8) + "]", "y": "eight"})
        wait_until(lambda: _drained(r, "pets") and _drained(r, "fixed"), timeout=60,
                   what="drained")
        store = SnapshotStore(settings.snapshot_dir, "pets")
        wait_until(lambda: _latest_meta(store).get("samples_trained") == 900, timeout=30,
                   what="checkpointed")
        meta = _latest_meta(store)
        order = []
        for yi in y:  # first-appearance order
            if NAMES[int(yi)] not in order:
                order.append(NAMES[int(yi)])
        assert meta["label_map"] == order and meta["output_units"] == 3
        assert meta["dead_letters"]["too_many_classes"] == 1
        dead = {e[1][b"reason"] for e in r.xrange(keys.dead_letter_stream("pets"))}
        assert dead == {b"too_many_classes"}
        fixed_dead = [e[1] for e in r.xrange(keys.dead_letter_stream("fixed"))]
        assert sorted((d[b"y"], d[b"reason"]) for d in fixed_dead) == [
            (b'"7"', b"unknown_label"), (b"eight", b"unknown_label")]
        wait_until(lambda: _latest_meta(SnapshotStore(settings.snapshot_dir, "fixed"))
                   .get("samples_trained") == 2, what="fixed trained")
        fixed_meta = _latest_meta(SnapshotStore(settings.snapshot_dir, "fixed"))
        assert fixed_meta["label_map"] == [7, "seven"]

        # /predict answers in the user's labels, probabilities in 'classes' order.
        client.post("/admin/models/pets/reload", headers={"Authorization": "Bearer adm"})
        test_x, test_y = synthetic(1100, seed=5)[0][900:], synthetic(1100, seed=5)[1][900:]
        resp = client.post("/predict", json={"model": "pets", "instances": test_x.tolist()})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["classes"] == order
        preds = [p["label"] for p in body["predictions"]]
        assert set(preds) <= set(NAMES)
        acc = np.mean([p == NAMES[int(t)] for p, t in zip(preds, test_y)])
        assert acc > 0.9
        for p in body["predictions"]:
            assert len(p["probabilities"]) == 3
            assert order[int(np.argmax(p["probabilities"]))] == p["label"]
        # The delayed-label path takes the user's labels too.
        pid = body["predictions"][0]["id"]
        joined = client.post("/label", json={"model": "pets", "labels": [
            {"id": pid, "y": NAMES[int(test_y[0])]}]})
        assert joined.status_code == 202, joined.text
        assert joined.json()["results"][0]["correct"] == (preds[0] == NAMES[int(test_y[0])])
        bad = client.post("/label", json={"model": "pets", "labels": [
            {"id": body["predictions"][1]["id"], "y": True}]})
        assert bad.status_code == 422
        # A listed set answers in its labels too.
        client.post("/admin/models/fixed/reload", headers={"Authorization": "Bearer adm"})
        listed = client.post("/predict", json={"model": "fixed", "instances": [[1.0] * 8]})
        assert listed.json()["classes"] == [7, "seven"]
        assert listed.json()["predictions"][0]["label"] in (7, "seven")


def test_grown_snapshot_loads_and_restores(tmp_path: Path) -> None:
    """The API and a restarted worker build the grown layer from the snapshot's label map."""
    import torch

    from service.codec import Sample
    from service.trainer import ModelTrainer

    cfg = ModelConfig(name="g", input_shape=[4], open_classes=True, spec="mlp:8")
    t = ModelTrainer(cfg, torch.device("cpu"))
    rng = np.random.default_rng(0)
    for label in ["a", 2, "b", "c", "a", 5]:
        t.train_batch([Sample(rng.normal(size=4).astype(np.float32), t.index_of(label))])
    assert t.label_map == ["a", 2, "b", "c", 5] and t.output_units == 5
    store = SnapshotStore(tmp_path, "g")
    store.write(1, t.checkpoint_tensors(), t.metadata())
    snap = store.read(1)
    net = load_network(snap, cfg)
    assert net(torch.zeros(1, 4)).shape == (1, 5)
    t2 = ModelTrainer(cfg, torch.device("cpu"))
    t2.restore(snap)
    assert t2.label_map == t.label_map and t2.index_of(5) == 4 and t2.index_of("d") == 5
    stored = store.read(1).model_state()
    for key, value in t.model.state_dict().items():
        assert torch.equal(value, stored[key]), key
    # The new unit: unit-norm row, gamma 1, beta 0, zero momentum; the old rows unchanged.
    out = t2.model.layers[-1]
    assert out.weight.shape[0] == 6
    # (ProjectedSGD keeps trained rows un-normalised; only their direction matters.)
    assert torch.allclose(out.weight[5].norm(), torch.tensor(1.0))
    assert out.gamma[5].item() == 1.0 and out.beta[5].item() == 0.0
    assert torch.equal(out.weight[:5], t.model.layers[-1].weight)
    buf = t2.optimizer.state[out.weight]["momentum_buffer"]
    assert buf.shape == (6, 8) and torch.count_nonzero(buf[5]) == 0
