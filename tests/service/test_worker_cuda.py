"""The worker on a GPU (skipped where torch sees no GPU): it trains there from the stream, its
snapshots are plain CPU tensors that any API replica loads, and a restart resumes exactly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
import torch

from service.snapshots import SnapshotStore, load_network
from service.worker import ModelWorker
from service.worker_metrics import WorkerMetrics

from worker_helpers import MODEL, make_settings, push, running_worker, small_config, synthetic, \
    wait_until

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def test_worker_trains_on_the_gpu_and_snapshots_load_on_cpu(redis_server, tmp_path: Path) -> None:
    cfg = small_config(max_batch=16, snapshot_every_seconds=60, snapshot_every_steps=10_000)
    settings = make_settings(redis_server.url, tmp_path, cfg, device="cuda")
    r = redis.Redis.from_url(redis_server.url)
    x, y = synthetic(1500, seed=5)
    push(r, cfg, x[:1200], y[:1200])
    with running_worker(settings) as worker:
        mw = worker.models[MODEL]
        wait_until(lambda: mw.trainer is not None and mw.trainer.samples_trained == 1200,
                   timeout=120, what="1200 samples trained on the GPU")
        trainer = mw.trainer
        assert trainer.device.type == "cuda" and trainer._pin
        assert all(p.is_cuda for p in trainer.model.parameters())
        held_out = torch.from_numpy(x[1200:])
        trainer.model.eval()
        with torch.no_grad():
            on_gpu = trainer.model(held_out.cuda()).cpu()
        trainer.model.train()
    # Stopping wrote a final checkpoint: CPU tensors, loadable where there is no GPU.
    store = SnapshotStore(settings.snapshot_dir, MODEL)
    snap = store.read(store.latest_version())
    assert all(t.device.type == "cpu" for t in snap.tensors.values())
    cpu_net = load_network(snap, cfg).eval()
    with torch.no_grad():
        on_cpu = cpu_net(held_out)
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4), (on_cpu - on_gpu).abs().max()
    accuracy = (on_cpu.argmax(1).numpy() == y[1200:]).mean()
    assert accuracy > 0.8
    # A restart on the GPU resumes from exactly the stored state.
    fresh = ModelWorker(settings, cfg, WorkerMetrics(), threading.Event(), "other")
    fresh._load_state()
    assert fresh.trainer.device.type == "cuda"
    assert fresh.trainer.samples_trained == 1200
    stored = snap.model_state()  # load_network re-projects for serving; restore does not
    for k, v in fresh.trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), stored[k]), k
