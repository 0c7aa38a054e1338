"""Host time of the worker's training step: ``ModelTrainer.train_tensors`` at a small batch.

At batch size 1 the default model's step is host-bound -- Python and per-op dispatch, not
arithmetic -- so this is the number the library's host-time work moves. It prints microseconds
per step for each of ``--repeats`` timed blocks (their minimum is the least disturbed by other
processes); run it alternately on two checkouts to compare them (docs/LIBRARY.md, fourth pass),
or with ``--profile`` for where the time goes.

Run::

    python benchmarks/bench_trainer_step.py                    # default model, batch 1
    python benchmarks/bench_trainer_step.py --batch 8 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.settings import ModelConfig  # noqa: E402
from service.trainer import ModelTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="mlp:256,256")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--optimizer-backend", default="auto",
                        choices=("auto", "eager", "native", "compile", "project"))
    parser.add_argument("--profile", action="store_true", help="cProfile one block instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(input_shape=[args.features], num_classes=args.classes, spec=args.spec)
    trainer = ModelTrainer(cfg, torch.device("cpu"), optimizer_backend=args.optimizer_backend)
    rng = np.random.default_rng(0)
    n = args.steps
    x = torch.from_numpy(rng.standard_normal((n, args.batch, args.features), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, args.classes, (n, args.batch)))
    for i in range(min(n, 500)):  # warm-up: allocator, kernel build, caches
        trainer.train_tensors(x[i], y[i])
    print(f"# {args.spec}, {args.features} features, batch {args.batch}, torch "
          f"{torch.__version__}, ProjectedSGD backend {trainer.optimizer.backend!r}")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for i in range(n):
            trainer.train_tensors(x[i], y[i])
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        return
    blocks = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(n):
            trainer.train_tensors(x[i], y[i])
        blocks.append((time.perf_counter() - start) / n * 1e6)
    print("us per step:", ", ".join(f"{b:.1f}" for b in blocks), f"(min {min(blocks):.1f})")


if __name__ == "__main__":
    main()
