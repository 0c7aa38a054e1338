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
polling thread competes for the CPU. The three run round-robin in chunks of steps (200 at batch
size 1, 20 at 64), so load from other processes on a shared machine falls on all of them alike.

Run::

    python benchmarks/bench_stream.py                  # default model, batches 1 and 64
    python benchmarks/bench_stream.py --quick
    python benchmarks/bench_stream.py --spec mlp:128,128 --features 19 --classes 7
    python benchmarks/bench_stream.py --device cuda    # all three on the GPU (pinned copies)
    python benchmarks/bench_stream.py --optimizer-backend eager   # torch ops for the step

On a GPU each runner synchronises at the end of its chunk, so queued kernels are counted.
"""

from __future__ import annotations

import argparse
import platform
import shutil
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


DEVICE = torch.device("cpu")
#: ``--optimizer-backend``: ProjectedSGD's backend in all three runners.
BACKEND = "auto"


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class StepRunner:
    """``normprop.train_step`` alone on ready-made tensors (the model's ceiling)."""

    def __init__(self, cfg: ModelConfig, x: np.ndarray, y: np.ndarray, batch: int) -> None:
        self.trainer = ModelTrainer(cfg, DEVICE, optimizer_backend=BACKEND)
        lr = normprop.scaled_lr(cfg.lr, batch, cfg.lr_scaling)
        self.trainer.optimizer.param_groups[0]["lr"] = lr
        xs, ys = torch.from_numpy(x).to(DEVICE), torch.from_numpy(y).long().to(DEVICE)
        self.batches = [(xs[i:i + batch], ys[i:i + batch]) for i in range(0, len(x), batch)]
        self.batch, self.pos = batch, 0

    def advance(self, steps: int) -> tuple[int, float]:
        start = time.perf_counter()
        for _ in range(steps):
            bx, by = self.batches[self.pos % len(self.batches)]
            normprop.train_step(self.trainer.model, self.trainer.optimizer, bx, by,
                                project=False)  # the trainer's ProjectedSGD projects itself
            self.pos += 1
        sync()
        return steps * self.batch, time.perf_counter() - start


class TrainerRunner:
    """``ModelTrainer.train_batch`` on decoded samples (adds collation, scoring, counters)."""

    def __init__(self, cfg: ModelConfig, x: np.ndarray, y: np.ndarray, batch: int) -> None:
        self.trainer = ModelTrainer(cfg, DEVICE, optimizer_backend=BACKEND)
        samples = [Sample(x[i], int(y[i])) for i in range(len(x))]
        self.groups = [samples[i:i + batch] for i in range(0, len(samples), batch)]
        self.batch, self.pos = batch, 0

    def advance(self, steps: int) -> tuple[int, float]:
        start = time.perf_counter()
        for _ in range(steps):
            self.trainer.train_batch(self.groups[self.pos % len(self.groups)])
            self.pos += 1
        sync()
        return steps * self.batch, time.perf_counter() - start


class StreamRunner:
    """The worker loop (``ModelWorker.run_once``) draining a backlog from Redis, checkpoints
    (safetensors + fsync, XACK, XTRIM) included. The backlog is written up front."""

    def __init__(self, cfg: ModelConfig, url: str, data_dir: Path, x: np.ndarray, y: np.ndarray,
                 batch: int, total_steps: int) -> None:
        r = redis.Redis.from_url(url)
        r.flushall()
        shutil.rmtree(data_dir, ignore_errors=True)
        codec = EntryCodec(cfg)
        stream = keys.samples_stream(cfg.name)
        pipe = r.pipeline(transaction=False)
        # Each advance may overshoot by one read (up to 64 entries): leave slack at the end.
        for i in range(total_steps * batch + 64 * (total_steps // 20 + 4)):
            pipe.xadd(stream, codec.encode(x[i % len(x)], int(y[i % len(y)])))
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        settings = Settings(redis_url=url, models=[cfg], data_dir=data_dir,
                            device=DEVICE.type,  # type: ignore[arg-type]
                            optimizer_backend=BACKEND,  # type: ignore[arg-type]
                            worker_metrics_port=0, consumer_name="bench")
        self.metrics = WorkerMetrics()
        self.worker = ModelWorker(settings, cfg, self.metrics, threading.Event(), "bench")
        self.batch = batch

    def advance(self, steps: int) -> tuple[int, float]:
        w = self.worker
        before = w.trainer.samples_trained if w.trainer else 0
        target = before + steps * self.batch
        start = time.perf_counter()
        while w.trainer is None or w.trainer.samples_trained < target:
            w.run_once()
        sync()
        return w.trainer.samples_trained - before, time.perf_counter() - start

    def checkpoints(self) -> tuple[float, float]:
        count = total = 0.0
        for fam in self.metrics.registry.collect():
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: 2-core box)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--optimizer-backend", default="auto",
                        choices=("auto", "eager", "native", "compile", "project"),
                        help="ProjectedSGD's backend (NP_OPTIMIZER_BACKEND); auto: native on "
                             "the CPU, project on a GPU")
    args = parser.parse_args()
    global DEVICE, BACKEND
    DEVICE = torch.device(args.device)
    BACKEND = args.optimizer_backend
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import RedisServer  # a private redis-server, AOF on as in production

    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    server = RedisServer(tmp / "redis")
    server.start()
    print(f"# bench_stream: {args.spec}, {args.features} features, {args.classes} classes, "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or 'cpu'}"
          f"{', ' + torch.cuda.get_device_name(DEVICE) if DEVICE.type == 'cuda' else ''}"
          f", redis AOF everysec, checkpoint defaults (every 500 steps / 2 s, fsync)"
          f", ProjectedSGD backend {args.optimizer_backend!r}")
    print(f"{'max_batch':>9} {'step/s':>10} {'trainer/s':>10} {'stream/s':>10} "
          f"{'stream/step':>11} {'trainer/step':>12}")
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            steps = (2000 if args.quick else 6000) if batch == 1 else (200 if args.quick else 600)
            chunk = 200 if batch == 1 else 20
            cfg = ModelConfig(name="bench", input_shape=[args.features],
                              num_classes=args.classes, spec=args.spec, max_batch=batch)
            x, y = _data(4096 * batch if batch > 1 else 4096, args.features, args.classes)
            warm = 2 * chunk
            runners = {"step": StepRunner(cfg, x, y, batch),
                       "trainer": TrainerRunner(cfg, x, y, batch),
                       "stream": StreamRunner(cfg, server.url, tmp / "data", x, y, batch,
                                              steps + warm + chunk)}
            for runner in runners.values():  # start-up, first checkpoint, warm caches
                runner.advance(warm)
            ck0 = runners["stream"].checkpoints()  # type: ignore[attr-defined]
            done = {k: 0 for k in runners}
            spent = {k: 0.0 for k in runners}
            # Round-robin in chunks: load from other processes lands on all three alike.
            for _ in range(steps // chunk):
                for name, runner in runners.items():
                    n, t = runner.advance(chunk)
                    done[name] += n
                    spent[name] += t
            rate = {k: done[k] / spent[k] for k in runners}
            ck1 = runners["stream"].checkpoints()  # type: ignore[attr-defined]
            n_ck = ck1[0] - ck0[0]
            ck_ms = (ck1[1] - ck0[1]) / max(1.0, n_ck) * 1e3
            ck_share = (ck1[1] - ck0[1]) / spent["stream"]
            runners["stream"].worker._shutdown()  # type: ignore[attr-defined]
            print(f"{batch:>9} {rate['step']:>10.0f} {rate['trainer']:>10.0f} "
                  f"{rate['stream']:>10.0f} {rate['stream'] / rate['step']:>11.2f} "
                  f"{rate['trainer'] / rate['step']:>12.2f}   checkpoints: {n_ck:.0f}, "
                  f"{ck_ms:.1f} ms each, {100 * ck_share:.1f}% of the stream time", flush=True)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
