"""Paired benchmark: the MLP's training step under plain, BatchNorm and NormProp, with
confidence intervals for the ratios.

Why a second benchmark: ``bench_layers.py`` prints one median per variant, and on a shared
machine two runs of it differ by more than NormProp and BatchNorm differ at batch 32 (their
difference there is a few percent of a step that is mostly matmuls). This one takes the
variants' steps in a fresh random order every round, times each by the thread's CPU time (not
the time it waited for a core), and bootstraps the rounds for a 95% interval of each ratio of
medians -- resampling whole rounds, so each ratio stays paired. An interval that excludes 1 is
a difference this machine could measure; one that straddles it is not.

Variants (all on the same data, one thread by default):

* ``plain``: Linear + ReLU, ``SGD(fused=True)``;
* ``batchnorm``: Linear (no bias) + BatchNorm1d + ReLU, ``SGD(fused=True)``;
* ``normprop``: NormProp layers, ``ProjectedSGD(backend="native")`` with the layers' Python
  autograd node;
* ``normprop+c++``: the same with the C++ node of ``normprop.native_autograd`` (skipped, with
  the reason, where it cannot be built).

Usage::

    python benchmarks/bench_vs_batchnorm.py                       # batch 32 and 256
    python benchmarks/bench_vs_batchnorm.py --batches 32 --rounds 600
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_layers

from normprop import ProjectedSGD, native_autograd, paper_optimizer

PAIRS = (("batchnorm", "plain"), ("normprop", "plain"), ("normprop+c++", "plain"),
         ("normprop", "batchnorm"), ("normprop+c++", "batchnorm"),
         ("normprop+c++", "normprop"))


def make_steps(batch: int, data: torch.Tensor) -> dict[str, Callable[[], int]]:
    """One training step per variant, each returning its thread CPU time in ns."""
    x = data[:batch].clone()
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    real_node = native_autograd.linear_rows
    names = ["plain", "batchnorm", "normprop"]
    if native_autograd.available():
        names.append("normprop+c++")
    else:
        print(f"normprop+c++ skipped: {native_autograd.unavailable_reason()}")
    steps = {}
    for name in names:
        norm = {"plain": "none", "batchnorm": "batchnorm"}.get(name, "normprop")
        net = bench_layers.make_net(bench_layers.MLP_SPEC, bench_layers.MLP_INPUT, norm, data)
        opt = (ProjectedSGD(net, lr=1e-3, backend="native") if norm == "normprop"
               else paper_optimizer(net, lr=1e-3, fused=True))
        use_node = name == "normprop+c++"

        def step(net=net, opt=opt, use_node=use_node) -> int:
            # The layers ask native_autograd.linear_rows() for the node on every forward.
            native_autograd.linear_rows = real_node if use_node else (lambda: None)
            start = time.thread_time_ns()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            return time.thread_time_ns() - start

        steps[name] = step
    return steps


def run(batch: int, rounds: int, warmup: int, data: torch.Tensor,
        rng: np.random.Generator) -> None:
    steps = make_steps(batch, data)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[int]] = {name: [] for name in steps}
    names = list(steps)
    for _ in range(rounds):
        for name in rng.permutation(names):
            times[name].append(steps[name]())
    us = {name: np.asarray(t) / 1e3 for name, t in times.items()}
    medians = {name: float(np.median(t)) for name, t in us.items()}
    print(f"MLP {bench_layers.MLP_INPUT}-1024-1024-1024-10, batch {batch}: median thread CPU "
          f"time per step over {rounds} shuffled rounds")
    for name, median in medians.items():
        print(f"  {name:13s} {median / 1e3:8.3f} ms")
    picks = rng.integers(0, rounds, size=(2000, rounds))
    print("  ratio of medians, 95% bootstrap interval over rounds:")
    for a, b in PAIRS:
        if a not in us or b not in us:
            continue
        boot = np.median(us[a][picks], axis=1) / np.median(us[b][picks], axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        verdict = "faster" if hi < 1 else "slower" if lo > 1 else "not distinguishable"
        print(f"    {a:13s} / {b:10s} {medians[a] / medians[b]:.4f}  [{lo:.4f}, {hi:.4f}]"
              f"  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="32,256", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=300,
                        help="shuffled rounds per batch size (the first --warmup are not kept)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = bench_layers.tune_malloc()
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}; {malloc}")
    torch.manual_seed(args.seed)
    data = torch.randn(512, bench_layers.MLP_INPUT)
    rng = np.random.default_rng(args.seed)
    for batch in (int(b) for b in args.batches.split(",")):
        run(batch, args.rounds, args.warmup, data, rng)


if __name__ == "__main__":
    main()
