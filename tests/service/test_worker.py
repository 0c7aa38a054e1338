"""Integration tests of the training worker against a real redis-server and real torch."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

import normprop
from service import keys
from service.codec import EntryCodec
from service.snapshots import SnapshotStore, load_network
from service.worker import ModelWorker, Worker, parse_id
from service.worker_metrics import WorkerMetrics

from worker_helpers import (MODEL, make_settings, push, running_worker, small_config, synthetic,
                             wait_until)


def _client(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def _ready(worker: Worker) -> bool:
    mw = worker.models[MODEL]
    return mw.trainer is not None and mw.version >= 1


def _drained(r: redis.Redis) -> bool:
    summary = r.xpending(keys.samples_stream(MODEL), keys.CONSUMER_GROUP)
    groups = r.xinfo_groups(keys.samples_stream(MODEL))
    return summary["pending"] == 0 and groups[0]["lag"] == 0


def test_initial_version_is_published_at_startup(redis_server, tmp_path: Path) -> None:
    settings = make_settings(redis_server.url, tmp_path)
    with running_worker(settings) as worker:
        wait_until(lambda: _ready(worker), what="worker ready")
        store = SnapshotStore(settings.snapshot_dir, MODEL)
        assert store.versions() == [1]
        meta = store.read_metadata(1)
        assert meta["samples_trained"] == 0 and meta["last_stream_id"] == "0-0"
        net = load_network(store.read(1), settings.models[0])  # the API can serve it at once
        assert net(torch.zeros(1, 8)).shape == (1, 3)


def test_trickle_steps_at_batch_size_one(redis_server, tmp_path: Path) -> None:
    cfg = small_config()
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    x, y = synthetic(15)
    with running_worker(settings) as worker:
        wait_until(lambda: _ready(worker), what="worker ready")
        trainer = worker.models[MODEL].trainer
        for i in range(len(x)):
            push(r, cfg, x[i:i + 1], y[i:i + 1])
            wait_until(lambda: trainer.samples_trained == i + 1, timeout=10, every=0.002)
        assert trainer.steps == 15
        lr = trainer.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(normprop.scaled_lr(cfg.lr, 1, cfg.lr_scaling))
        hist = _family(worker.metrics, "normprop_worker_batch_size")
        assert _sample(hist, "normprop_worker_batch_size_bucket", le="1.0") == 15
        assert _sample(hist, "normprop_worker_batch_size_count") == 15


def test_backlog_steps_at_max_batch(redis_server, tmp_path: Path) -> None:
    cfg = small_config(max_batch=16)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    x, y = synthetic(160)
    r.xgroup_create(keys.samples_stream(MODEL), keys.CONSUMER_GROUP, id="0", mkstream=True)
    push(r, cfg, x, y)  # the backlog is there before the worker starts
    with running_worker(settings) as worker:
        wait_until(lambda: _ready(worker) and worker.models[MODEL].trainer.samples_trained == 160,
                   what="backlog trained")
        trainer = worker.models[MODEL].trainer
        assert trainer.steps == 10
        lr = trainer.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(normprop.scaled_lr(cfg.lr, 16, cfg.lr_scaling))
        hist = _family(worker.metrics, "normprop_worker_batch_size")
        assert _sample(hist, "normprop_worker_batch_size_bucket", le="8.0") == 0
        assert _sample(hist, "normprop_worker_batch_size_sum") == 160


BAD_ENTRIES = {
    "wrong_length": {"x": "[1, 2, 3]", "y": "1"},
    "bad_x": {"x": '["a", "b", "c", "d", "e", "f", "g", "h"]', "y": "1"},
    "nonfinite": {"x": "[1, 2, 3, NaN, 5, 6, 7, 8]", "y": "1"},
    "missing_label": {"x": "[1, 2, 3, 4, 5, 6, 7, 8]"},
    "label_out_of_range": {"x": "[1, 2, 3, 4, 5, 6, 7, 8]", "y": "7"},
    "bad_label": {"x": "[1, 2, 3, 4, 5, 6, 7, 8]", "y": "cat"},
    "missing_x": {"y": "1"},
    "oversized": {"x": "[" + ", ".join(["1"] * 5000) + "]", "y": "1"},
}


def test_dead_letters_never_reach_the_model(redis_server, tmp_path: Path) -> None:
    cfg = small_config()
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    stream = keys.samples_stream(MODEL)
    x, y = synthetic(20)
    r.xgroup_create(stream, keys.CONSUMER_GROUP, id="0", mkstream=True)
    push(r, cfg, x[:10], y[:10])
    bad_ids = {reason: r.xadd(stream, fields) for reason, fields in BAD_ENTRIES.items()}
    bad_ids["nonfinite_inf"] = r.xadd(stream, {"x": "[1, 2, 3, Infinity, 5, 6, 7, 8]", "y": "1"})
    push(r, cfg, x[10:], y[10:])
    bad_ids["wrong_length_last"] = r.xadd(stream, BAD_ENTRIES["wrong_length"])
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker) and mw.trainer.samples_trained == 20, what="trained")
        wait_until(lambda: _drained(r), what="everything acked")
        # Trimmed below the checkpoint, even when the newest entries were all dead letters.
        wait_until(lambda: r.xlen(stream) == 0, what="the stream trimmed")
        dead = r.xrange(keys.dead_letter_stream(MODEL))
        by_source = {fields[b"source_id"]: fields for _, fields in dead}
        assert len(dead) == len(bad_ids)
        for reason, eid in bad_ids.items():
            letter = by_source[eid]
            assert letter[b"reason"].decode() == reason.removesuffix("_inf").removesuffix("_last")
            assert letter[b"detail"]
            assert sum(len(v) for v in letter.values()) < 6000  # bounded copy of the original
        assert mw.trainer.samples_trained == 20
        counts = mw.trainer.dead_letters
        assert counts["nonfinite"] == 2
        assert counts["wrong_length"] == 2
        assert all(counts[reason] == 1 for reason in BAD_ENTRIES
                   if reason not in ("nonfinite", "wrong_length"))
        metric = _family(worker.metrics, "normprop_worker_dead_letters")
        assert _sample(metric, "normprop_worker_dead_letters_total", reason="nonfinite") == 2
        # Never trained: no ledger lists a dead-lettered ID.
        trained = _ledger_ids(SnapshotStore(settings.snapshot_dir, MODEL))
        assert not trained & {parse_id(i) for i in bad_ids.values()}
        assert len(trained) == 20


def test_dead_letters_in_binary_backlog(redis_server, tmp_path: Path) -> None:
    """The batch-decoded fast lane (binary entries in a backlog) rejects what EntryCodec does."""
    cfg = small_config(max_batch=8)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    stream = keys.samples_stream(MODEL)
    x, y = synthetic(64)
    nan_row = np.ones(8, dtype="<f4")
    nan_row[3] = np.nan
    bad = {
        "nonfinite": {"xb": nan_row.tobytes(), "y": "1"},
        "label_out_of_range": {"xb": np.ones(8, dtype="<f4").tobytes(), "y": "3"},
        "bad_label": {"xb": np.ones(8, dtype="<f4").tobytes(), "y": "01"},
        "wrong_length": {"xb": np.ones(7, dtype="<f4").tobytes(), "y": "1"},
    }
    r.xgroup_create(stream, keys.CONSUMER_GROUP, id="0", mkstream=True)
    push(r, cfg, x[:20], y[:20])
    bad_ids = {reason: r.xadd(stream, fields) for reason, fields in bad.items()}
    push(r, cfg, x[20:], y[20:])
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker) and mw.trainer.samples_trained == 64, what="trained")
        wait_until(lambda: _drained(r), what="everything acked")
        assert mw.trainer.steps <= 9  # 68 entries read 8 at a time, bad ones left out
        by_source = {f[b"source_id"]: f for _, f in r.xrange(keys.dead_letter_stream(MODEL))}
        for reason, eid in bad_ids.items():
            assert by_source[eid][b"reason"].decode() == reason
            assert by_source[eid][b"xb"] == bad[reason]["xb"]  # the original bytes
    trained = _ledger_ids(SnapshotStore(settings.snapshot_dir, MODEL))
    assert len(trained) == 64 and not trained & {parse_id(i) for i in bad_ids.values()}


def test_nonfinite_loss_is_skipped_and_counted(redis_server, tmp_path: Path) -> None:
    cfg = small_config(task="regression", num_targets=1)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    stream = keys.samples_stream(MODEL)
    codec = EntryCodec(cfg)
    with running_worker(settings) as worker:
        wait_until(lambda: _ready(worker), what="worker ready")
        mw = worker.models[MODEL]
        r.xadd(stream, codec.encode(np.ones(8), [1.0]))
        wait_until(lambda: mw.trainer.samples_trained == 1, what="good sample")
        # A finite float32 target whose squared error overflows: the loss is inf.
        r.xadd(stream, codec.encode(np.ones(8), [3e38]))
        wait_until(lambda: mw.trainer.skipped_steps["nonfinite_loss"] == 1, what="skip")
        r.xadd(stream, codec.encode(np.ones(8), [2.0]))
        wait_until(lambda: mw.trainer.samples_trained == 2, what="training continues")
        assert all(bool(torch.isfinite(p).all()) for p in mw.trainer.model.parameters())
        assert mw.trainer.prequential()["mae"] is not None
        metric = _family(worker.metrics, "normprop_worker_skipped_steps")
        assert _sample(metric, "normprop_worker_skipped_steps_total",
                       reason="nonfinite_loss") == 1


def test_restore_is_exact(redis_server, tmp_path: Path) -> None:
    cfg = small_config(snapshot_every_seconds=60, snapshot_every_steps=10_000)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    x, y = synthetic(300)
    push(r, cfg, x, y)
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker) and mw.trainer.samples_trained == 300, what="trained")
    before = mw.trainer  # stopped: the graceful stop wrote a final checkpoint
    assert mw.version == 2

    fresh = ModelWorker(settings, cfg, WorkerMetrics(), threading.Event(), "other")
    fresh._load_state()
    after = fresh.trainer
    assert fresh.restored_version == 2
    for (k, a), (k2, b) in zip(before.model.state_dict().items(),
                               after.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert float(after.model.data_norm.count) == 300
    momentum_a = {before._param_names[p]: s["momentum_buffer"]
                  for p, s in before.optimizer.state.items()}
    momentum_b = {after._param_names[p]: s["momentum_buffer"]
                  for p, s in after.optimizer.state.items()}
    assert momentum_a.keys() == momentum_b.keys() and momentum_a
    for k in momentum_a:
        assert torch.equal(momentum_a[k], momentum_b[k]), k
    for attr in ("samples_trained", "steps", "skipped_steps", "dead_letters", "score_total",
                 "loss_total", "last_loss"):
        assert getattr(before, attr) == getattr(after, attr), attr
    assert list(before.window) == list(after.window)
    assert before.prequential() == after.prequential()
    assert fresh.high_water == mw.high_water


def test_corrupt_newest_snapshot_falls_back(redis_server, tmp_path: Path) -> None:
    cfg = small_config(snapshot_every_seconds=60, snapshot_every_steps=10_000)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    x, y = synthetic(40)
    push(r, cfg, x[:20], y[:20])
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker) and mw.trainer.samples_trained == 20, what="trained")
    store = SnapshotStore(settings.snapshot_dir, MODEL)
    assert store.versions() == [1, 2]
    path = store.path(2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn write
    push(r, cfg, x[20:], y[20:])
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        # v1 is the restored state; v2's samples were acked when v2 was written, so only the
        # 20 new ones are trained on top of v1 (see docs/WORKER.md, "corrupt snapshots").
        wait_until(lambda: mw.trainer is not None and mw.trainer.samples_trained == 20,
                   what="trained on top of v1")
        assert mw.restored_version == 1
    assert store.read_metadata(3)["parent_version"] == 2  # numbering continues above v2


def test_learns_digits_at_batch_size_one(redis_server, tmp_path: Path) -> None:
    import sklearn.datasets as datasets
    x_all, y_all = datasets.load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_all))
    train, test = order[:1400], order[1400:]
    cfg = small_config(input_shape=[64], num_classes=10, spec="mlp:128,128", max_batch=1,
                       snapshot_every_seconds=0.5, snapshot_every_steps=100_000)
    settings = make_settings(redis_server.url, tmp_path, cfg)
    r = _client(redis_server)
    passes = np.concatenate([train, rng.permutation(train)])
    push(r, cfg, x_all[passes], y_all[passes])
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker) and mw.trainer.samples_trained == len(passes),
                   timeout=90, every=0.1, what="two passes")
        assert mw.trainer.steps == len(passes)  # batch size 1 throughout
    store = SnapshotStore(settings.snapshot_dir, MODEL)
    net = load_network(store.read(store.latest_version()), cfg)
    with torch.no_grad():
        pred = net(torch.tensor(x_all[test], dtype=torch.float32)).argmax(1).numpy()
    accuracy = float((pred == y_all[test]).mean())
    assert accuracy >= 0.9, accuracy
    meta = store.read_metadata(store.latest_version())
    assert meta["prequential"]["window_accuracy"] >= 0.85
    stats = meta["layer_stats"]
    assert [s["name"] for s in stats] == ["layers.0", "layers.1"]
    # Near the canonical N(0, 1) NormProp aims for; learnt gamma/beta move it a little.
    assert all(abs(s["mean"]) < 1.0 and 0.3 < s["std"] < 3.0 for s in stats), stats


def test_reconnects_after_redis_restart(redis_server, tmp_path: Path) -> None:
    cfg = small_config()
    settings = make_settings(redis_server.url, tmp_path, cfg)
    x, y = synthetic(400)
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker), what="worker ready")
        push(_client(redis_server), cfg, x[:200], y[:200])
        wait_until(lambda: mw.trainer.samples_trained == 200, what="first half")
        wait_until(lambda: _drained(_client(redis_server)), what="first half acked")
        time.sleep(1.2)  # appendfsync everysec: let the AOF catch up, as a real crash would not
        redis_server.kill()
        wait_until(lambda: mw.redis_ok is False, timeout=20, what="worker notices")
        assert _gauge(worker.metrics, "normprop_worker_redis_up") == 0
        time.sleep(0.5)
        redis_server.start()
        push(_client(redis_server), cfg, x[200:], y[200:])
        wait_until(lambda: mw.trainer.samples_trained == 400, timeout=40, what="second half")
        wait_until(lambda: _drained(_client(redis_server)), what="second half acked")
        assert mw.redis_ok is True
        assert _gauge(worker.metrics, "normprop_worker_redis_up") == 1
    trained = _ledger_list(SnapshotStore(settings.snapshot_dir, MODEL))
    assert len(trained) == len(set(trained)) == 400


def test_lease_one_trainer_and_takeover(redis_server, tmp_path: Path) -> None:
    cfg = small_config()
    first = make_settings(redis_server.url, tmp_path, cfg, consumer_name="first")
    second = make_settings(redis_server.url, tmp_path, cfg, consumer_name="second")
    r = _client(redis_server)
    x, y = synthetic(300)
    stop_first = threading.Event()
    w1 = Worker(first, stop_first)
    w1.start()
    try:
        wait_until(lambda: _ready(w1), what="first worker ready")
        with running_worker(second) as w2:
            push(r, cfg, x[:200], y[:200])
            wait_until(lambda: w1.models[MODEL].trainer.samples_trained == 200,
                       what="the holder trains")
            time.sleep(0.3)
            assert w2.models[MODEL].trainer is None  # waiting for the lease, training nothing
            assert _gauge(w2.metrics, "normprop_worker_lease_held") == 0
            assert _gauge(w1.metrics, "normprop_worker_lease_held") == 1
            assert r.get(keys.lease_key(MODEL)) == b"first"
            stop_first.set()  # the holder checkpoints, acks, and hands the lease back
            w1.join(30)
            push(r, cfg, x[200:], y[200:])
            mw = w2.models[MODEL]
            wait_until(lambda: mw.trainer is not None and mw.trainer.samples_trained == 300,
                       what="the other worker takes over from the checkpoint")
            assert mw.restored_version is not None and mw.restored_version >= 2
            assert r.get(keys.lease_key(MODEL)) == b"second"
    finally:
        stop_first.set()
        w1.join(30)
    trained = _ledger_list(SnapshotStore(first.snapshot_dir, MODEL))
    assert len(trained) == len(set(trained)) == 300


def test_metrics_endpoint(redis_server, tmp_path: Path) -> None:
    from conftest import free_port

    cfg = small_config()
    settings = make_settings(redis_server.url, tmp_path, cfg, worker_metrics_port=free_port())
    r = _client(redis_server)
    x, y = synthetic(200)
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: _ready(worker), what="worker ready")
        push(r, cfg, x, y)
        r.xadd(keys.samples_stream(MODEL), {"x": "[1]", "y": "0"})
        wait_until(lambda: mw.trainer.samples_trained == 200 and mw.version >= 2,
                   what="trained and checkpointed")
        wait_until(lambda: _drained(r), what="acked")
        time.sleep(0.6)  # one slow-gauge refresh
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = lambda name, **labels: _sample(families[name.removesuffix("_total")  # noqa: E731
                                                    .removesuffix("_count")], name, **labels)
    assert value("normprop_worker_samples_trained_total") == 200
    assert value("normprop_worker_steps_total") >= 200 / cfg.max_batch
    assert value("normprop_worker_batch_size_count") == value("normprop_worker_steps_total")
    assert value("normprop_worker_dead_letters_total", reason="wrong_length") == 1
    assert 0.0 <= value("normprop_worker_prequential_accuracy") <= 1.0
    assert 0.0 <= value("normprop_worker_prequential_window_accuracy") <= 1.0
    assert value("normprop_worker_loss") >= 0
    assert value("normprop_worker_stream_lag") == 0
    assert value("normprop_worker_snapshot_version") >= 2
    assert 0 <= value("normprop_worker_snapshot_age_seconds") < 60
    assert value("normprop_worker_redis_up") == 1
    assert value("normprop_worker_lease_held") == 1
    assert value("normprop_worker_checkpoint_duration_seconds_count") >= 2
    layers = {s.labels["layer"] for s in families["normprop_worker_layer_input_std"].samples}
    assert layers == {"layers.0", "layers.1"}
    for s in families["normprop_worker_layer_input_std"].samples:
        assert s.labels["model"] == MODEL and 0.2 < s.value < 3.0
    for s in families["normprop_worker_layer_input_mean"].samples:
        assert abs(s.value) < 1.0


# -- helpers ---------------------------------------------------------------------------------
def _family(metrics: WorkerMetrics, name: str):
    for fam in metrics.registry.collect():
        if fam.name == name:
            return fam
    raise KeyError(name)


def _sample(family, name: str, **labels: str) -> float:
    for s in family.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def _gauge(metrics: WorkerMetrics, name: str) -> float:
    return _sample(_family(metrics, name), name, model=MODEL)


def _ledger_list(store: SnapshotStore) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in store.versions():
        out += [tuple(row) for row in store.read(v).tensors["ledger.ids"].tolist()]
    return out


def _ledger_ids(store: SnapshotStore) -> set[tuple[int, int]]:
    return set(_ledger_list(store))
