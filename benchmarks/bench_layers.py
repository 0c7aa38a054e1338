"""Layer benchmark: training-step and inference time of the same nets under four normalisations.

Prints, from one run on the same inputs:

* the median training-step time (zero_grad, forward, cross-entropy, backward, SGD step with
  momentum 0.9 and weight decay 5e-4, and -- for NormProp only -- the unit-norm projection of
  section 4.4) of the MLP 784-1024-1024-1024-10 at batch sizes 1, 32, 256 and of the paper's NIN
  (CIFAR-10 shape, 3x32x32) at batch sizes 1 and 50, under ``none`` (plain), ``batchnorm``,
  ``layernorm`` and ``normprop``, each also as a ratio to plain; ``normprop+psgd`` is the same
  NormProp step (the same iterates) taken by :class:`normprop.ProjectedSGD`;
* the median inference time of the folded NormProp net against the plain net's layers.

Every variant of one configuration gets the same input batches, and the variants are timed
round-robin (one step of each in turn) so that noise from other processes on the machine spreads
over all of them instead of landing on one. All nets use the same data layer (global data
normalisation, fitted once), so the ratios compare the hidden layers.

Run::

    python benchmarks/bench_layers.py              # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_layers.py --quick      # fewer repeats
    python benchmarks/bench_layers.py --only mlp   # or: nin
    python benchmarks/bench_layers.py --threads 1 --clock cpu   # on a machine shared with others
    python benchmarks/bench_layers.py --device cuda             # on a GPU (adds larger batches)
    python benchmarks/bench_layers.py --device cuda --cuda-graphs   # each step as a CUDA graph
    python benchmarks/bench_layers.py --device cuda --compile       # torch.compile'd forward
    python benchmarks/bench_layers.py --optimizer fused   # every variant's best one-pass optimiser
    python benchmarks/bench_layers.py --phases            # + forward / backward / step times

The optimisers are compared like for like. ``--optimizer torch`` (default): torch's own ops --
``torch.optim.SGD``'s default step for plain, BatchNorm, LayerNorm and NormProp + projection,
``ProjectedSGD(backend="eager")`` for ``normprop+psgd``. ``--optimizer fused``: every variant's
one-pass step -- ``torch.optim.SGD(fused=True)`` (one kernel for decay, momentum and update)
for the first four, ``ProjectedSGD(backend="native")`` (its C kernel) on the CPU and
``backend="compile"`` on a GPU for ``normprop+psgd``. ``--psgd-backend`` overrides the latter.

On a GPU every timed call ends with ``torch.cuda.synchronize()``, so a step's time is the time
until its kernels have finished, not until they were queued.

BatchNorm cannot take a training step at batch size 1 in PyTorch (``BatchNorm1d`` raises
``ValueError: Expected more than 1 value per channel when training``); that cell prints ``error``.
``BatchNorm2d`` at batch 1 does run -- it then normalises each channel over one image's pixels.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normprop import ProjectedSGD, build_model, fold, paper_optimizer, project_weights_  # noqa: E402

NORMS = ("none", "batchnorm", "layernorm", "normprop", "normprop+psgd")
MLP_SPEC, MLP_INPUT = "mlp:1024,1024,1024", 784


def tune_malloc() -> str:
    """Keep freed tensors in glibc's heap instead of returning them to the OS.

    By default glibc serves a 4 MB gradient with ``mmap`` and gives it back on free, so every
    step faults its pages in again; how many faults a step takes then depends on allocation
    order more than on the network, and it dominates small-batch steps (the same plain MLP step
    measured 4.6 and 9.6 ms in two runs). Raising the mmap and trim thresholds makes every
    variant reuse its memory. Process-wide, equal for all variants; Linux/glibc only.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        return "glibc malloc: mmap threshold 256 MiB, trim threshold 1 GiB" if ok else "mallopt failed"
    except OSError:
        return "glibc not found: default allocator"


DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for queued GPU kernels (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


COMPILE = False


def make_net(spec: str, shape: int | tuple[int, ...], norm: str, data: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    norm = "normprop" if norm == "normprop+psgd" else norm
    net = build_model(spec, shape, 10, norm=norm, data_norm="global")  # type: ignore[arg-type]
    net.data_norm.fit(data)
    return net.to(DEVICE)


def forward_of(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The net itself, or under ``--compile`` its ``torch.compile``d forward (the optimiser
    step and the projection stay eager). NormProp layers take their composite formula when
    compiled, which the compiler fuses (see ``NormPropLayer._use_fast_path``)."""
    return torch.compile(net, dynamic=True) if COMPILE else net


CUDA_GRAPHS = False
OPTIMIZER = "torch"
PSGD_BACKEND = "eager"
#: ``--phases``: per variant, the (forward + loss, backward, optimiser step + projection)
#: seconds of every timed step, to show where a ratio comes from.
PHASES: dict[str, list[tuple[float, float, float]]] | None = None


def step_fn(net: nn.Module, norm: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    # normprop+psgd: the same iterates as normprop (SGD, then projection) from ProjectedSGD.
    fused = OPTIMIZER == "fused"
    if norm == "normprop+psgd":
        opt = ProjectedSGD(net, lr=1e-3, backend=PSGD_BACKEND)
        assert opt.backend == PSGD_BACKEND, (opt.backend, PSGD_BACKEND)
    else:
        opt = paper_optimizer(net, lr=1e-3, fused=fused or None)
    net.train()
    forward = forward_of(net)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        if norm == "normprop":
            project_weights_(net)

    def phased_step() -> None:
        t0 = CLOCK()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        sync()
        t1 = CLOCK()
        loss.backward()
        sync()
        t2 = CLOCK()
        opt.step()
        if norm == "normprop":
            project_weights_(net)
        sync()
        assert PHASES is not None
        PHASES.setdefault(norm, []).append((t1 - t0, t2 - t1, CLOCK() - t2))

    if CUDA_GRAPHS:
        return captured(step)
    return phased_step if PHASES is not None else step


def captured(step: Callable[[], None]) -> Callable[[], None]:
    """The whole step (forward, backward, SGD, projection) captured once as a CUDA graph and
    replayed: no Python and no per-kernel launch cost, so what is left is GPU work -- the
    setting of the paper's GPU timing (Theano compiled the whole step). Warm-up steps on a side
    stream first create the momentum buffers, as torch's whole-network capture recipe requires.
    BatchNorm1d at batch size 1 raises here as in eager mode."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay() -> None:
        # ``step`` stays referenced: its net, optimiser and gradients own the memory the graph
        # reads and writes (freed, it would be handed to the next variant's tensors).
        assert step is not None
        graph.replay()

    return replay


STAT: Callable[[list[float]], float] = statistics.median
CLOCK: Callable[[], float] = time.perf_counter


def round_robin(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2,
                budget_s: float | None = None) -> dict[str, float]:
    """Median (or ``--stat min``) seconds per call of each function, calls interleaved, in a
    new (seeded) order every round: a variant that always ran after the same neighbour would
    inherit its cache and allocator state."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    start = time.perf_counter()
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for k in order:
            fn = fns[k]
            sync()
            t0 = CLOCK()
            fn()
            sync()
            times[k].append(CLOCK() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s and len(times[k]) >= 5:
            break
    return {k: STAT(v) for k, v in times.items()}


def bench_training(name: str, spec: str, shape: int | tuple[int, ...], batches: list[int],
                   repeats: dict[int, int], budget_s: float) -> list[tuple]:
    rows = []
    full = (shape,) if isinstance(shape, int) else shape
    data = torch.randn(512, *full)
    for b in batches:
        g = torch.Generator().manual_seed(b)
        x = (torch.randn(b, *full, generator=g) * 2.0 + 0.5).to(DEVICE)
        y = torch.randint(0, 10, (b,), generator=g).to(DEVICE)
        fns: dict[str, Callable[[], None]] = {}
        errors: dict[str, str] = {}
        for norm in NORMS:
            net = make_net(spec, shape, norm, data)
            try:
                fn = step_fn(net, norm, x, y)
                fn()
            except Exception as exc:  # BatchNorm1d at batch size 1
                errors[norm] = f"{type(exc).__name__}: {exc}"
                continue
            fns[norm] = fn
        if PHASES is not None:
            PHASES.clear()
        med = round_robin(fns, repeats[b], budget_s=budget_s)
        plain = med["none"]
        cells = []
        for norm in NORMS:
            if norm in med:
                cells.append(f"{med[norm] * 1e3:9.2f} ms ({med[norm] / plain:4.2f}x)")
            else:
                cells.append(f"{'error':>20}")
        rows.append((name, b, cells))
        print(f"{name:4s} batch {b:4d} | " + " | ".join(cells), flush=True)
        for norm, err in errors.items():
            print(f"    {norm} at batch {b}: {err}", flush=True)
        if PHASES:
            parts = []
            for norm in NORMS:
                if norm in PHASES:
                    fwd, bwd, opt = (STAT([t[i] for t in PHASES[norm]]) * 1e3 for i in range(3))
                    parts.append(f"{norm} {fwd:.2f} / {bwd:.2f} / {opt:.2f}")
            print("    phases, ms (forward+loss / backward / step): " + "; ".join(parts),
                  flush=True)
    return rows


def bench_inference(name: str, spec: str, shape: int | tuple[int, ...], batches: list[int],
                    repeats: int, budget_s: float) -> None:
    full = (shape,) if isinstance(shape, int) else shape
    data = torch.randn(512, *full)
    plain = make_net(spec, shape, "none", data).eval()
    normprop = make_net(spec, shape, "normprop", data).eval()
    folded = fold(normprop)
    for b in batches:
        x = torch.randn(b, *full, generator=torch.Generator().manual_seed(100 + b)).to(DEVICE)
        with torch.no_grad():
            err = (folded(x) - normprop(x)).abs().max().item()
            fns = {"plain": lambda: plain.layers(x), "folded": lambda: folded(x),
                   "normprop": lambda: normprop(x)}
            med = round_robin(fns, repeats, budget_s=budget_s)
        print(f"{name:4s} batch {b:4d} | plain layers {med['plain'] * 1e3:8.3f} ms | folded "
              f"{med['folded'] * 1e3:8.3f} ms ({med['folded'] / med['plain']:4.2f}x) | unfolded "
              f"normprop {med['normprop'] * 1e3:8.3f} ms ({med['normprop'] / med['plain']:4.2f}x)"
              f" | max |folded - normprop| {err:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", choices=("mlp", "nin"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per-step statistic (min is less sensitive to other processes)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, which leaves out time the process waited "
                             "for a core (use with --threads 1 on a shared machine)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="tuned (default): see tune_malloc(); default: leave glibc as is")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each variant's whole training step as a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each variant's forward (training steps only)")
    parser.add_argument("--optimizer", choices=("torch", "fused"), default="torch",
                        help="torch: torch.optim.SGD's default step, ProjectedSGD "
                             "backend='eager'; fused: SGD(fused=True) for the baselines, "
                             "ProjectedSGD backend='native' (CPU) / 'compile' (GPU)")
    parser.add_argument("--psgd-backend", choices=("eager", "native", "compile", "project"),
                        default=None,
                        help="ProjectedSGD's backend for normprop+psgd (default: see "
                             "--optimizer)")
    parser.add_argument("--phases", action="store_true",
                        help="also print each variant's forward / backward / step times")
    parser.add_argument("--training-only", action="store_true", help="skip the inference part")
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes for both nets (default: per net)")
    args = parser.parse_args()
    global STAT, CLOCK, DEVICE, CUDA_GRAPHS, COMPILE, OPTIMIZER, PSGD_BACKEND
    COMPILE = args.compile
    OPTIMIZER = args.optimizer
    if args.phases:
        global PHASES
        PHASES = {}
    DEVICE = torch.device(args.device)
    gpu = DEVICE.type == "cuda"
    PSGD_BACKEND = args.psgd_backend or (
        "eager" if OPTIMIZER == "torch" else "compile" if gpu else "native")
    CUDA_GRAPHS = args.cuda_graphs
    if CUDA_GRAPHS and not gpu:
        parser.error("--cuda-graphs needs --device cuda")
    STAT = min if args.stat == "min" else statistics.median
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    parser_note = tune_malloc() if args.malloc == "tuned" else "default allocator settings"
    if args.threads:
        torch.set_num_threads(args.threads)
    q = 0.3 if args.quick else 1.0
    where = (torch.cuda.get_device_name(DEVICE) if gpu else
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; {parser_note}")
    print(f"training step: {args.stat} {args.clock} time per step (ratio to plain)"
          f"{', whole step replayed as a CUDA graph' if CUDA_GRAPHS else ''}"
          f"{', forward torch.compile(dynamic=True)' if COMPILE else ''}"
          + (f"; optimisers: {'SGD(fused=True)' if OPTIMIZER == 'fused' else 'SGD'}, "
             f"ProjectedSGD(backend={PSGD_BACKEND!r})"))
    chosen = [int(b) for b in args.batches.split(",")] if args.batches else None
    print(f"{'':15s} | " + " | ".join(f"{n:>20s}" for n in NORMS))
    if args.only in (None, "mlp"):
        mlp_batches = chosen or ([1, 32, 256, 1024] if gpu else [1, 32, 256])
        mlp_repeats = {b: int((400 if gpu else {1: 400, 32: 100}.get(b, 40)) * q)
                       for b in mlp_batches}
        bench_training("MLP", MLP_SPEC, MLP_INPUT, mlp_batches, mlp_repeats, budget_s=60 * q)
    if args.only in (None, "nin"):
        nin_batches = chosen or ([1, 50, 128] if gpu else [1, 50])
        nin_repeats = {b: int((200 if gpu else {1: 60}.get(b, 12)) * q) for b in nin_batches}
        bench_training("NIN", "nin-cifar", (3, 32, 32), nin_batches, nin_repeats, budget_s=90 * q)
    if args.training_only:
        return
    print("inference (eval, no_grad): folded NormProp vs the plain net's layers")
    if args.only in (None, "mlp"):
        bench_inference("MLP", MLP_SPEC, MLP_INPUT, mlp_batches, int(200 * q), budget_s=30 * q)
    if args.only in (None, "nin"):
        bench_inference("NIN", "nin-cifar", (3, 32, 32), nin_batches, int(30 * q),
                        budget_s=40 * q)


if __name__ == "__main__":
    main()
