"""Stream benchmark: samples/s trained end to end from Redis vs the in-memory training step.

For each max batch size (1 and 64 by default) it measures, in the same process, round-robin:

* ``step``: :func:`normprop.train_step` alone on ready-made tensors (the model's ceiling);
* ``trainer``: :class:`service.trainer.ModelTrainer.train_batch` on decoded samples (adds
  collation, prequential scoring, counters);
* ``stream``: the worker's loop (:meth:`service.worker.ModelWorker.run_once`) on a backlog in a
  private redis-server: XREADGROUP, decode, train, metrics, and the periodic checkpoints
  (safetensors + fsync) with their pipelined XACK and XTRIM -- everything but the producer.

and prints samples/s and the ratio ``stream / step``. The backlog is written before timing
starts (the producer is not what is measured) and the loop runs in the calling thread, so no
polling thread competes for the CPU. Medians over ``--rounds`` rounds.

Run::

    python benchmarks/bench_stream.py                  # default model, batches 1 and 64
    python benchmarks/bench_stream.py --quick
    python benchmarks/bench_stream.py --spec mlp:128,128 --features 19 --classes 7
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import normprop  # noqa: E402
from service import keys  # noqa: E402
from service.codec import EntryCodec, Sample  # noqa: E402
from service.settings import ModelConfig, Settings  # noqa: E402
from service.trainer import ModelTrainer  # noqa: E402
from service.worker import ModelWorker  # noqa: E402
from service.worker_metrics import WorkerMetrics  # noqa: E402


def _data(n: int, features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    return (centres[y] + rng.normal(size=(n, features))).astype(np.float32), y


def bench_step(cfg: ModelConfig, x: np.ndarray, y: np.ndarray, batch: int, steps: int) -> float:
    """Samples/s of train_step alone on pre-built tensors."""
    trainer = ModelTrainer(cfg, torch.device("cpu"))
    trainer.optimizer.param_groups[0]["lr"] = normprop.scaled_lr(cfg.lr, batch, cfg.lr_scaling)
    xs = torch.from_numpy(x)
    ys = torch.from_numpy(y).long()
    batches = [(xs[i:i + batch], ys[i:i + batch])
               for i in range(0, steps * batch, batch)]
    for bx, by in batches[:20]:
        normprop.train_step(trainer.model, trainer.optimizer, bx, by)
    start = time.perf_counter()
    for bx, by in batches:
        normprop.train_step(trainer.model, trainer.optimizer, bx, by)
    return steps * batch / (time.perf_counter() - start)


def bench_trainer(cfg: ModelConfig, x: np.ndarray, y: np.ndarray, batch: int, steps: int) -> float:
    """Samples/s of ModelTrainer.train_batch on decoded samples."""
    trainer = ModelTrainer(cfg, torch.device("cpu"))
    samples = [Sample(x[i], int(y[i])) for i in range(steps * batch)]
    groups = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    for g in groups[:20]:
        trainer.train_batch(g)
    start = time.perf_counter()
    for g in groups:
        trainer.train_batch(g)
    return steps * batch / (time.perf_counter() - start)


def bench_stream(cfg: ModelConfig, url: str, data_dir: Path, x: np.ndarray, y: np.ndarray,
                 batch: int, steps: int) -> float:
    """Samples/s of the worker loop draining a backlog from Redis (checkpoints included)."""
    r = redis.Redis.from_url(url)
    r.flushall()
    shutil.rmtree(data_dir, ignore_errors=True)
    codec = EntryCodec(cfg)
    stream = keys.samples_stream(cfg.name)
    warm = 20 * batch
    total = warm + steps * batch
    pipe = r.pipeline(transaction=False)
    for i in range(total):
        pipe.xadd(stream, codec.encode(x[i % len(x)], int(y[i % len(y)])))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    settings = Settings(redis_url=url, models=[cfg], data_dir=data_dir, device="cpu",
                        worker_metrics_port=0, consumer_name="bench")
    metrics = WorkerMetrics()
    worker = ModelWorker(settings, cfg, metrics, threading.Event(), "bench")
    worker._spare = None
    while worker.trainer is None or worker.trainer.samples_trained < warm:
        worker.run_once()
    before = _checkpoints(metrics)
    start = time.perf_counter()
    while worker.trainer.samples_trained < total:
        worker.run_once()
    elapsed = time.perf_counter() - start
    after = _checkpoints(metrics)
    CHECKPOINTS.append((after[0] - before[0], after[1] - before[1], elapsed))
    worker._shutdown()
    return (total - warm) / elapsed


#: (checkpoints, seconds spent in them, loop seconds) of each stream run.
CHECKPOINTS: list[tuple[float, float, float]] = []


def _checkpoints(metrics: WorkerMetrics) -> tuple[float, float]:
    count = total = 0.0
    for fam in metrics.registry.collect():
        if fam.name == "normprop_worker_checkpoint_duration_seconds":
            for s in fam.samples:
                if s.name.endswith("_count"):
                    count = s.value
                elif s.name.endswith("_sum"):
                    total = s.value
    return count, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=ModelConfig().spec)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: 2-core box)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import RedisServer  # a private redis-server, AOF on as in production

    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    server = RedisServer(tmp / "redis")
    server.start()
    print(f"# bench_stream: {args.spec}, {args.features} features, {args.classes} classes, "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or 'cpu'}"
          f", redis AOF everysec, checkpoint defaults (every 500 steps / 2 s, fsync)")
    print(f"{'max_batch':>9} {'step/s':>10} {'trainer/s':>10} {'stream/s':>10} "
          f"{'stream/step':>11} {'trainer/step':>12}")
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            steps = (1500 if args.quick else 3000) if batch == 1 else (100 if args.quick else 300)
            cfg = ModelConfig(name="bench", input_shape=[args.features],
                              num_classes=args.classes, spec=args.spec, max_batch=batch)
            x, y = _data(steps * batch + 64 * batch, args.features, args.classes)
            res: dict[str, list[float]] = {"step": [], "trainer": [], "stream": []}
            for _ in range(rounds):
                res["step"].append(bench_step(cfg, x, y, batch, steps))
                res["trainer"].append(bench_trainer(cfg, x, y, batch, steps))
                res["stream"].append(bench_stream(cfg, server.url, tmp / "data", x, y, batch,
                                                  steps))
            med = {k: statistics.median(v) for k, v in res.items()}
            n_ck = sum(c[0] for c in CHECKPOINTS)
            ck_share = sum(c[1] for c in CHECKPOINTS) / sum(c[2] for c in CHECKPOINTS)
            ck_mean = sum(c[1] for c in CHECKPOINTS) / max(1, n_ck) * 1e3
            CHECKPOINTS.clear()
            print(f"{batch:>9} {med['step']:>10.0f} {med['trainer']:>10.0f} "
                  f"{med['stream']:>10.0f} {med['stream'] / med['step']:>11.2f} "
                  f"{med['trainer'] / med['step']:>12.2f}   checkpoints: {n_ck:.0f}, "
                  f"{ck_mean:.1f} ms each, {100 * ck_share:.1f}% of the stream time",
                  flush=True)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
